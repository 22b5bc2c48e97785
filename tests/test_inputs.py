"""Bad input to pretrain_pref is one clear error before any expensive work: flags, output
locations, data files and checkpoints. Most cases stop before a process group exists, so
they run in-process in milliseconds."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_pref.arguments import ConfigError, parse_run_config
from megatron_pref.checkpointing import CheckpointError
from megatron_pref.data import demo_task
from megatron_pref.data.errors import DataError
from megatron_pref.model import ParallelConfig
from tests.test_training import MODEL_FLAGS, _demo_subset, _train, data_flags

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", demo_task.demo_tokenizer_path()]


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return str(path)


@pytest.mark.parametrize("args,message", [
    (["--min-lr", "1", "--lr", "0.001"], "--min-lr 1.0 is above --lr 0.001"),
    (["--adam-beta1", "2"], r"--adam-beta1 must be in \[0, 1\), got 2.0"),
    (["--norm-epsilon", "-1"], "--norm-epsilon must be > 0"),
    (["--init-method-std", "0"], "--init-method-std must be > 0"),
    (["--rotary-percent", "0"], r"--rotary-percent must be in \(0, 1\]"),
    (["--hidden-dropout", "1"], r"--hidden-dropout must be in \[0, 1\)"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], "needs --pipeline-model-parallel-size > 1"),
    (["--num-layers-per-virtual-pipeline-stage", "0", "--pipeline-model-parallel-size", "2"], "must be >= 1"),
    (["--num-layers", "6", "--num-layers-per-virtual-pipeline-stage", "2", "--pipeline-model-parallel-size", "2"],
     "--num-layers 6 is not divisible by --pipeline-model-parallel-size 2 x --num-layers-per-virtual-pipeline-stage 2"),
    (["--train-iters", "abc"], r"argument --train-iters: invalid int value: 'abc' \(see --help\)"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--valid-data-path", "v.jsonl"], "--valid-data-path needs --data-path"),
    (["--tokenizer-model", "t.model"], "--tokenizer-model needs --data-path"),
])
def test_bad_flags_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(args)


def test_one_virtual_stage_per_rank_is_the_plain_schedule():
    run = parse_run_config(["--num-layers", "4", "--pipeline-model-parallel-size", "2",
                            "--num-layers-per-virtual-pipeline-stage", "2"])
    assert run.parallel.virtual_pipeline_model_parallel_size is None
    run = parse_run_config(["--num-layers", "4", "--pipeline-model-parallel-size", "2",
                            "--num-layers-per-virtual-pipeline-stage", "1"])
    assert run.parallel.virtual_pipeline_model_parallel_size == 2


def test_output_locations_are_checked_before_any_work(tmp_path, a_file):
    for flag in ("--save", "--tensorboard-dir", "--ref-cache-dir", "--wandb-save-dir"):
        with pytest.raises(ConfigError, match=f"{flag} {a_file}: exists and is not a directory"):
            parse_run_config([flag, a_file])
        with pytest.raises(ConfigError, match=f"{flag} {a_file}/sub/dir: {a_file} is not a directory"):
            parse_run_config([flag, os.path.join(a_file, "sub", "dir")])
    with pytest.raises(ConfigError, match=f"--metrics-file {tmp_path}: is a directory"):
        parse_run_config(["--metrics-file", str(tmp_path)])
    # Control: missing directories below a writable one are fine (they are created later).
    run = parse_run_config(["--save", str(tmp_path / "new" / "ckpt"), "--metrics-file", str(tmp_path / "m" / "x.jsonl")])
    assert run.checkpoint.save.endswith("ckpt")


def test_wandb_without_credentials_is_refused_unless_offline(monkeypatch):
    from types import SimpleNamespace

    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "login", lambda **kwargs: False)
    for mode in ("online", "offline"):
        monkeypatch.setattr(wandb, "setup", lambda mode=mode: SimpleNamespace(settings=SimpleNamespace(mode=mode)))
        if mode == "online":
            with pytest.raises(ConfigError, match="--wandb-project: no wandb API key"):
                parse_run_config(["--wandb-project", "p"])
        else:
            assert parse_run_config(["--wandb-project", "p"]).log.wandb_project == "p"


def test_wandb_offline_settings_file_needs_no_credentials(tmp_path):
    """`wandb offline` writes ./wandb/settings, not WANDB_MODE: the mode wandb resolves counts."""
    pytest.importorskip("wandb")
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    code = "from megatron_pref.arguments import parse_run_config; parse_run_config(['--wandb-project', 'p'])"
    ok = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-1000:]
    (tmp_path / "wandb" / "settings").unlink()  # control: online without a key is refused
    refused = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "no wandb API key" in refused.stderr


def test_seq_length_beyond_learned_positions_is_refused():
    from megatron_pref.training import train

    flags = ["--position-embedding-type", "learned_absolute", "--max-position-embeddings", "64"]
    with pytest.raises(ConfigError, match="--seq-length 128 exceeds the model's 64 learned positions"):
        train(parse_run_config(flags + ["--seq-length", "128"]))


# --------------------------------------------------------------------------- data files


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("inputs")
    _demo_subset(directory, "a.jsonl", 20)
    lines = Path(demo_task.demo_data_path("train")).read_text().splitlines()
    (directory / "b.ndjson").write_text("\n".join(lines[20:50]) + "\n")
    renamed = [json.loads(line) for line in lines[50:60]]
    (directory / "renamed.jsonl").write_text("".join(
        json.dumps({"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n" for r in renamed))
    for name, source in (("p1", "a.jsonl"), ("p2", "b.ndjson")):
        subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_pref_data.py"), "--input", str(directory / source),
                        "--output-prefix", str(directory / name), *TOKENIZER, "--workers", "1"],
                       check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return directory


def _build(args):
    from megatron_pref.training import build_data

    return build_data(parse_run_config(args + TOKENIZER + MODEL_FLAGS))


def test_every_data_path_is_read(data_dir):
    """Several raw files (any reader suffix) and several preprocessed prefixes: all pairs."""
    raw = _build(["--data-path", str(data_dir / "a.jsonl"), str(data_dir / "b.ndjson")])
    assert len(raw.train) == 50
    prefixes = _build(["--data-path", str(data_dir / "p1"), str(data_dir / "p2")])
    assert len(prefixes.train) == 50
    # The concatenation reads prefix 2's pairs after prefix 1's, with the raw files' tokens.
    for i in (0, 19, 20, 49):
        assert prefixes.train[i].chosen_ids.tolist() == raw.train[i].chosen_ids.tolist()
        assert prefixes.train[i].pair_id == i
    assert prefixes.train.lengths().shape == (50, 3)


def test_field_map_and_strict_apply_to_raw_splits_only(data_dir):
    field_map = ["--data-field-map", "q=prompt,good=chosen,bad=rejected"]
    bundle = _build(["--data-path", str(data_dir / "renamed.jsonl"), "--valid-data-path",
                     str(data_dir / "renamed.jsonl")] + field_map)
    assert len(bundle.train) == 10 and len(bundle.valid) == 10  # the map applies to the validation file too
    with pytest.raises(DataError, match="--data-field-map: for raw .jsonl/.parquet files only"):
        _build(["--data-path", str(data_dir / "p1")] + field_map)
    with pytest.raises(DataError, match="--strict: for raw"):
        _build(["--data-path", str(data_dir / "p1"), "--valid-data-path", str(data_dir / "p2"), "--strict"])
    # Raw training files with a preprocessed validation prefix: the flags serve the raw split.
    mixed = _build(["--data-path", str(data_dir / "renamed.jsonl"), "--valid-data-path", str(data_dir / "p2")]
                   + field_map)
    assert len(mixed.train) == 10 and len(mixed.valid) == 30
    with pytest.raises(DataError, match="either raw .jsonl/.parquet files or preprocessed prefixes"):
        _build(["--data-path", str(data_dir / "p1"), str(data_dir / "a.jsonl")])


def test_no_usable_pair_names_the_reason(tmp_path):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}] * 3
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"--data-path: no usable pairs \(3 rows -> 0 pairs .*identical=3"):
        _build(["--data-path", str(path)])


@pytest.mark.parametrize("damage,message", [
    ("idx", r"p1.idx/.bin cannot be read"),
    ("bin", r"p1.bin holds \d+ bytes, the index needs \d+"),
    ("pairs.npy", r"p1.pairs.npy: cannot be read"),
    ("meta.json", r"p1.meta.json: Expecting value"),
])
def test_damaged_preprocessed_data_is_one_error(data_dir, tmp_path, damage, message):
    for suffix in ("bin", "idx", "pairs.npy", "meta.json"):
        shutil.copy(data_dir / f"p1.{suffix}", tmp_path / f"p1.{suffix}")
    target = tmp_path / f"p1.{damage}"
    if damage == "meta.json":
        target.write_text("garbage")
    else:
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    with pytest.raises(DataError, match=message):
        _build(["--data-path", str(tmp_path / "p1")])


def test_damaged_reference_cache_is_recomputed(tmp_path):
    from megatron_pref.reference import load_cached_table, save_cached_table

    key = {"data": "x"}
    save_cached_table(tmp_path, key, np.zeros((4, 2), dtype=np.float32))
    assert load_cached_table(tmp_path, key, 4) is not None  # control: intact, used
    table = next(p for p in tmp_path.iterdir() if p.suffix == ".npy")
    with open(table, "r+b") as f:
        f.truncate(20)
    assert load_cached_table(tmp_path, key, 4) is None
    key_file = next(p for p in tmp_path.iterdir() if p.suffix == ".json")
    key_file.write_text("[1]")
    assert load_cached_table(tmp_path, key, 4) is None


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron_pref.testing import run_on_ranks

    directory = tmp_path_factory.mktemp("ckpt")
    train_file = _demo_subset(directory, "t.jsonl", 16)
    argv = data_flags(train_file, train_file) + MODEL_FLAGS + [
        "--loss", "dpo", "--train-iters", "1", "--eval-interval", "100", "--save", str(directory / "ck"),
        "--ref-cache-dir", str(directory / "cache")]
    run_on_ranks(_train, 1, ParallelConfig(), argv, init_parallel=False)  # a process of its own
    return directory, argv


def _damaged(checkpoint, tmp_path, damage):
    directory, argv = checkpoint
    copy = tmp_path / "ck"
    shutil.copytree(directory / "ck", copy)
    damage(copy, copy / "iter_0000001")
    return argv, str(copy)


def _edit_config(path, **model):
    config = json.loads(path.read_text())
    config["model"].update(model)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (lambda ck, it: (it / "common.pt").unlink(), "iter_0000001 is not a complete dist checkpoint \\(no common.pt\\)"),
    (lambda ck, it: (it / ".metadata").unlink(), "no .metadata"),
    (lambda ck, it: (it / "common.pt").write_bytes(b"PK\x03\x04 truncated"), "common.pt cannot be read"),
    (lambda ck, it: (it / "metadata.json").write_text("garbage"), "iter_0000001/metadata.json: Expecting value"),
    (lambda ck, it: (ck / "latest").write_bytes(b"\xff\xfe"), "cannot read latest"),
    (lambda ck, it: (ck / "latest").write_text("iter_0000009"), "latest names 'iter_0000009', which does not exist"),
    (lambda ck, it: _edit_config(ck / "megatron_pref_config.json", num_layers="x"),
     "model config field num_layers = 'x' is not an int"),
], ids=["no-common", "no-metadata", "bad-common", "bad-metadata-json", "bad-latest", "missing-iteration", "bad-config"])
def test_damaged_checkpoint_is_one_error_before_any_model(checkpoint, tmp_path, damage, message):
    from megatron_pref.training import train

    argv, damaged = _damaged(checkpoint, tmp_path, damage)
    with pytest.raises(CheckpointError, match=message):
        train(parse_run_config(argv + ["--load", damaged]))


def test_reference_checkpoint_of_another_architecture_is_refused(checkpoint, tmp_path):
    from megatron_pref.training import train

    argv, other = _damaged(checkpoint, tmp_path, lambda ck, it: _edit_config(ck / "megatron_pref_config.json",
                                                                               ffn_hidden_size=128))
    with pytest.raises(CheckpointError, match=r"--ref-load .* another architecture than the policy: ffn_hidden_size 128 != 64"):
        train(parse_run_config(argv + ["--ref-load", other]))
    with pytest.raises(CheckpointError, match=r"--ref-load .*: no 'latest' file"):
        train(parse_run_config(argv + ["--ref-load", str(tmp_path)]))


def test_damaged_tensor_data_names_the_cause(checkpoint, tmp_path):
    """Only reading the tensors finds a truncated data file; the line says what failed (torch's
    own message names only the failing ranks)."""
    from megatron_pref.testing import run_on_ranks

    def truncate(ck, iteration):
        data = sorted(iteration.glob("*.distcp"))[0]
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)

    argv, damaged = _damaged(checkpoint, tmp_path, truncate)
    with pytest.raises(RuntimeError, match=r"cannot load the checkpoint's tensors \(EOFError: a file of the "
                                           r"checkpoint ends early"):
        run_on_ranks(_train, 1, ParallelConfig(), argv + ["--load", damaged], init_parallel=False)


# --------------------------------------------------------------------------- optional packages


def _absent(monkeypatch, package):
    """Make ``package`` not installed for this test: a finder in front that refuses it, and its
    modules out of sys.modules (find_spec and import look there first)."""
    from tests.wrapped_launch import BlockModules

    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BlockModules([package])] + sys.meta_path)


def _optional_package_cases(tmp_path):
    parquet, jsonl = tmp_path / "d.parquet", tmp_path / "d.jsonl"
    parquet.write_bytes(b"")
    jsonl.write_text("")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    logging = "pip install -e '.[logging]'"
    return [
        (["--tensorboard-dir", str(tmp_path / "tb")], "tensorboard", f"--tensorboard-dir needs tensorboard ({logging})"),
        (["--wandb-project", "p"], "wandb", f"--wandb-project needs wandb ({logging})"),
        (["--data-path", str(jsonl), "--valid-data-path", str(parquet)] + TOKENIZER, "pyarrow",
         f"--valid-data-path {parquet} needs pyarrow (pip install pyarrow)"),
        (["--data-path", str(jsonl), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
          str(tmp_path / "hf")], "transformers",
         "--tokenizer-type HuggingFaceTokenizer needs transformers (pip install transformers)"),
        (["--transformer-impl", "transformer_engine"], "transformer_engine",
         "--transformer-impl transformer_engine needs transformer_engine (pip install -e '.[gpu]', or use the Docker image)"),
    ]


def test_a_flag_whose_optional_package_is_missing_is_one_line(tmp_path, monkeypatch):
    """Each flag that needs an optional package names it and its pip install when it is missing,
    at parse time (tensorboard used to fail after the reference pass, with a traceback)."""
    import importlib.util
    from types import SimpleNamespace

    if importlib.util.find_spec("wandb") is not None:  # the control needs no credentials
        import wandb

        monkeypatch.setattr(wandb, "setup", lambda: SimpleNamespace(settings=SimpleNamespace(mode="offline")))
    for flags, package, line in _optional_package_cases(tmp_path):
        if importlib.util.find_spec(package) is not None and package != "transformer_engine":
            parse_run_config(flags)  # control: installed, accepted
        with monkeypatch.context() as patch:
            _absent(patch, package)
            with pytest.raises(ConfigError) as refused:
                parse_run_config(flags)
        assert str(refused.value) == line


def test_preprocess_names_the_missing_package(tmp_path, monkeypatch, capsys):
    from megatron_pref.data.preprocess import main

    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    cases = [(["--input", str(parquet)] + TOKENIZER, "pyarrow", f"--input {parquet} needs pyarrow"),
             (["--input", demo_task.demo_data_path("train"), "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", str(tmp_path / "hf")], "transformers",
              "--tokenizer-type HuggingFaceTokenizer needs transformers (pip install transformers)")]
    for argv, package, needle in cases:
        with monkeypatch.context() as patch:
            _absent(patch, package)
            assert main(argv + ["--output-prefix", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    # Control: with pyarrow the empty Parquet file gets as far as reading it.
    assert main(cases[0][0] + ["--output-prefix", str(tmp_path / "out")]) == 2
    assert "needs pyarrow" not in capsys.readouterr().err


def test_missing_tensorboard_stops_pretrain_before_any_work(tmp_path):
    """The command users run, with tensorboard not installed: one line, exit 2, no training."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TEST_BLOCK_MODULES="tensorboard")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "wrapped_launch.py"), str(REPO / "pretrain_pref.py"),
                          "--tensorboard-dir", str(tmp_path / "tb"), "--train-iters", "1", "--no-progress-bar"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ["error: --tensorboard-dir needs tensorboard (pip install -e '.[logging]')"]
    assert out.stdout == "" and not (tmp_path / "tb").exists()
