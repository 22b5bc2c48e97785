"""Bad input to pretrain_pref is one clear error before any expensive work: flags, output
locations, data files and checkpoints. Most cases stop before a process group exists, so
they run in-process in milliseconds."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_pref.arguments import ConfigError, parse_run_config
from megatron_pref.checkpointing import CheckpointError
from megatron_pref.data import demo_task
from megatron_pref.data.errors import DataError
from megatron_pref.model import ParallelConfig
from tests.test_training import (MODEL_FLAGS, _demo_subset, _train, data_flags, run_cli, run_training,  # noqa: F401
                                 tiny, torchrun_cli)  # tiny: a fixture

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", demo_task.demo_tokenizer_path()]


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return str(path)


# --------------------------------------------------------------------------- the bad-input table
#
# One row per bad input found (add one with every bug): pretrain_pref.py's flags, the start of
# the one stderr line it must print, its exit status, and the paths (under the working directory
# the row runs in) that must not exist afterwards. Rows run in-process through pretrain_pref.main,
# the entry point torchrun starts; all of them stop before any process group exists.
# In flags, {tmp} is the row's working directory and {data} the module's data directory.


def _write_rows_without_scores(tmp, request):
    lines = Path(demo_task.demo_data_path("train")).read_text().splitlines()[:12]
    rows = [{k: v for k, v in json.loads(line).items() if not k.startswith("score")} for line in lines]
    (tmp / "noscores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _checkpoint_with(**model):
    def prepare(tmp, request):
        directory, _ = request.getfixturevalue("checkpoint")
        shutil.copytree(directory / "ck", tmp / "ck")
        _edit_config(tmp / "ck" / "megatron_pref_config.json", **model)
    return prepare


def _save_dir_of_another_model(tmp, request):
    """{tmp}/ck: a checkpoint megatron-pref initialised; {tmp}/other: one of a converted Llama."""
    directory, _ = request.getfixturevalue("checkpoint")
    for name in ("ck", "other"):
        shutil.copytree(directory / "ck", tmp / name)
    config_path = tmp / "other" / "megatron_pref_config.json"
    config = json.loads(config_path.read_text())
    config["source"] = {"format": "huggingface", "architecture": "LlamaForCausalLM", "hf_dir": "/models/llama",
                        "hf_config": {"bos_token_id": 5, "eos_token_id": 7}}
    config_path.write_text(json.dumps(config))


def _damage_tensor_bytes(iteration_dir):
    """256 bytes of the first tensor file overwritten in place (at 1,000,000, or mid-file for a
    smaller one): same length, same name, same mtime (issue 16 item 3)."""
    data = sorted(Path(iteration_dir).glob("*.distcp"))[0]
    status = os.stat(data)
    with open(data, "r+b") as f:
        f.seek(min(1_000_000, status.st_size // 2))
        original = f.read(256)
        f.seek(-len(original), os.SEEK_CUR)
        f.write(bytes(255 - b for b in original))
    os.utime(data, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert os.path.getsize(data) == status.st_size


def _damaged_checkpoint(tmp, request):
    directory, _ = request.getfixturevalue("checkpoint")
    shutil.copytree(directory / "ck", tmp / "ck")
    _damage_tensor_bytes(tmp / "ck" / "iter_0000001")


def _shuffled_bin(tmp, request):
    """A preprocessed dataset whose .bin holds the same bytes in another order (same length)."""
    for suffix in ("bin", "idx", "pairs.npy", "meta.json"):
        shutil.copy(request.getfixturevalue("data_dir") / f"p1.{suffix}", tmp / f"p1.{suffix}")
    tokens = np.fromfile(tmp / "p1.bin", dtype=np.uint16)
    np.random.default_rng(0).permutation(tokens).tofile(tmp / "p1.bin")


def _row(argv, first_line, code=2, absent=(), prepare=None, cwd=None, id=None):
    """``first_line``: a regex for the start of the one stderr line. ``absent``: paths relative to
    the working directory; ``runs`` (the default output location) is always checked."""
    return pytest.param(argv, first_line, code, ("runs",) + tuple(absent), prepare, cwd, id=id)


BAD_INPUTS = [
    _row(["--min-lr", "1", "--lr", "0.001"], "error: --min-lr 1.0 is above --lr 0.001", id="min-lr-above-lr"),
    _row(["--adam-beta1", "2"], r"error: --adam-beta1 must be in \[0, 1\), got 2.0", id="adam-beta1-range"),
    _row(["--norm-epsilon", "-1"], "error: --norm-epsilon must be > 0", id="norm-epsilon-negative"),
    _row(["--init-method-std", "0"], "error: --init-method-std must be > 0", id="init-method-std-0"),
    _row(["--rotary-percent", "0"], r"error: --rotary-percent must be in \(0, 1\]", id="rotary-percent-0"),
    _row(["--hidden-dropout", "1"], r"error: --hidden-dropout must be in \[0, 1\)", id="hidden-dropout-1"),
    _row(["--num-layers-per-virtual-pipeline-stage", "1"], "error: .*needs --pipeline-model-parallel-size > 1", id="vpp-without-pp"),
    _row(["--num-layers-per-virtual-pipeline-stage", "0", "--pipeline-model-parallel-size", "2"],
         "error: --num-layers-per-virtual-pipeline-stage must be >= 1", id="vpp-0"),
    _row(["--num-layers", "6", "--num-layers-per-virtual-pipeline-stage", "2", "--pipeline-model-parallel-size", "2"],
         "error: --num-layers 6 is not divisible by --pipeline-model-parallel-size 2 x "
         "--num-layers-per-virtual-pipeline-stage 2", id="vpp-layers-not-divisible"),
    _row(["--train-iters", "abc"], r"error: argument --train-iters: invalid int value: 'abc' \(see --help\)", id="train-iters-not-int"),
    _row(["--no-such-flag"], "error: unrecognized arguments: --no-such-flag", id="unknown-flag"),
    _row(["--valid-data-path", "v.jsonl"], "error: --valid-data-path needs --data-path", id="valid-data-path-without-data-path"),
    _row(["--tokenizer-model", "t.model"], "error: --tokenizer-model needs --data-path", id="tokenizer-model-without-data-path"),
    # issue 16 item 4: an empty MLP trained silently
    _row(["--ffn-hidden-size", "0", "--save", "{tmp}/out"], "error: --ffn-hidden-size must be positive, got 0$",
         absent=["out"], id="ffn-hidden-size-0"),
    # item 7: model-shape flags, all checked before any data, process group or model
    _row(["--ffn-hidden-size", "-5"], "error: --ffn-hidden-size must be positive, got -5$", id="ffn-hidden-size-negative"),
    _row(["--kv-channels", "0"], "error: --kv-channels must be positive, got 0$", id="kv-channels-0"),
    _row(["--kv-channels", "31"], r"error: RoPE needs an even rotary dimension >= 2: the head dimension 31 "
                                  r"\(--kv-channels\) x --rotary-percent 1.0 = 31$", id="kv-channels-odd-rope"),
    _row(["--kv-channels", "30", "--rotary-percent", "0.5"], "error: RoPE needs an even rotary dimension .* = 15$",
         id="rotary-dimension-odd"),
    _row(["--hidden-size", "130"], "error: --hidden-size 130 is not divisible by --num-attention-heads 4$",
         id="hidden-size-not-divisible"),
    _row(["--hidden-size", "120", "--num-attention-heads", "8"],
         r"error: RoPE needs an even rotary dimension >= 2: the head dimension 15 \(--hidden-size / "
         r"--num-attention-heads\)", id="head-dim-odd-rope"),
    _row(["--num-query-groups", "3"], "error: --num-attention-heads 4 is not divisible by --num-query-groups 3$",
         id="query-groups-not-dividing-heads"),
    _row(["--num-query-groups", "0"], "error: --num-query-groups must be positive, got 0$", id="query-groups-0"),
    _row(["--rotary-base", "0"], "error: --rotary-base must be positive, got 0$", id="rotary-base-0"),
    _row(["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "255"],
         "error: --ffn-hidden-size 255 is not divisible by --tensor-model-parallel-size 2$", id="ffn-not-divisible-by-tp"),
    _row(["--tensor-model-parallel-size", "8"], "error: --num-attention-heads 4 is not divisible by "
                                                "--tensor-model-parallel-size 8$", id="heads-not-divisible-by-tp"),
    _row(["--tensor-model-parallel-size", "4", "--num-query-groups", "2"],
         "error: --num-query-groups 2 is not divisible by --tensor-model-parallel-size 4$", id="groups-not-divisible-by-tp"),
    # ... and the architecture a --load checkpoint brings is checked the same way
    _row(["--load", "{tmp}/ck"], r"error: --load {tmp}/ck: bad model config in .*: RoPE needs an even rotary dimension",
         prepare=_checkpoint_with(kv_channels=31), id="checkpoint-kv-channels-odd"),
    _row(["--load", "{tmp}/ck", "--tensor-model-parallel-size", "2"],
         "error: --ffn-hidden-size 63 is not divisible by --tensor-model-parallel-size 2$",
         prepare=_checkpoint_with(ffn_hidden_size=63), id="checkpoint-ffn-not-divisible-by-tp"),
    # item 8: the default reference cache (./runs/last/...) is probed like --ref-cache-dir
    _row(["--train-iters", "1"], r"error: the default reference cache \(--ref-cache-dir\) runs/last/reference_cache: "
                                 r"cannot write in /proc: .* \(give --ref-cache-dir or --save a writable directory",
         cwd="/proc", id="default-reference-cache-unwritable"),
    # item 12: --spo-target-from-scores needs scores: raw files and preprocessed prefixes
    _row(["--loss", "spo", "--spo-target-from-scores", "--data-path", "{tmp}/noscores.jsonl", "--valid-data-path",
          "{tmp}/noscores.jsonl", "--save", "{tmp}/out", *TOKENIZER, *MODEL_FLAGS],
         "error: --spo-target-from-scores: --data-path {tmp}/noscores.jsonl has no score_chosen/score_rejected fields",
         absent=["out"], prepare=_write_rows_without_scores, id="spo-scores-missing-raw"),
    _row(["--loss", "spo", "--spo-target-from-scores", "--data-path", "{data}/p_noscores", "--valid-data-path",
          "{data}/a.jsonl", *TOKENIZER, *MODEL_FLAGS],
         "error: --spo-target-from-scores: --data-path {data}/p_noscores has no score_chosen/score_rejected",
         id="spo-scores-missing-preprocessed"),
    _row(["--loss", "spo", "--spo-target-from-scores", "--data-path", "{data}/a.jsonl", "--valid-data-path",
          "{tmp}/noscores.jsonl", *TOKENIZER, *MODEL_FLAGS],
         "error: --spo-target-from-scores: --valid-data-path {tmp}/noscores.jsonl has no score_chosen",
         prepare=_write_rows_without_scores, id="spo-scores-missing-valid"),
    # item 2: saving into another model's checkpoint directory would inherit its provenance
    _row(["--load", "{tmp}/ck", "--save", "{tmp}/other", "--train-iters", "2"],
         r"error: --save {tmp}/other holds a checkpoint of another model \(LlamaForCausalLM converted from "
         r"/models/llama\) than this run's \(--load {tmp}/ck: a model initialised by megatron-pref\); save into "
         r"another directory$", prepare=_save_dir_of_another_model, id="save-into-another-models-checkpoint"),
    # item 13
    _row(["--seed", "-1"], r"error: --seed must be in \[0, 2\*\*32 - 1\], got -1$", id="seed-negative"),
    _row(["--seed", str(2**32)], r"error: --seed must be in \[0, 2\*\*32 - 1\], got 4294967296$", id="seed-too-large"),
    # item 10: the collective timeout (Megatron-LM's flag), passed to init_process_group
    _row(["--distributed-timeout-minutes", "0"], "error: --distributed-timeout-minutes must be >= 1, got 0$",
         id="distributed-timeout-0"),
    # item 3: damaged bytes of a checkpoint or a dataset, same length (only truncation was caught)
    _row(["--load", "{tmp}/ck", "--finetune", "--train-iters", "1"],
         r"error: --load {tmp}/ck/iter_0000001/__0_0.distcp: checksum mismatch \(the file changed after it was "
         r"written\); pass --no-verify-checksums to load it anyway$", prepare=_damaged_checkpoint,
         id="checkpoint-bytes-damaged"),
    _row(["--ref-load", "{tmp}/ck", "--loss", "dpo", "--train-iters", "1", "--ref-cache-dir", "{tmp}/cache",
          *MODEL_FLAGS],
         r"error: --ref-load {tmp}/ck/iter_0000001/__0_0.distcp: checksum mismatch", absent=["cache"],
         prepare=_damaged_checkpoint, id="reference-checkpoint-bytes-damaged"),
    _row(["--load", "{tmp}/ck", "--finetune", "--train-iters", "1"],
         r"error: --load {tmp}/ck/iter_0000001/checksums.json: cannot be read",
         prepare=lambda tmp, request: (_damaged_checkpoint(tmp, request),
                                       (tmp / "ck" / "iter_0000001" / "checksums.json").write_text("{")),
         id="checkpoint-checksums-unreadable"),
    _row(["--data-path", "{tmp}/p1", "--valid-data-path", "{tmp}/p1", *TOKENIZER, *MODEL_FLAGS],
         r"error: {tmp}/p1.bin: checksum mismatch \(the file changed after it was written\); pass "
         r"--no-verify-checksums to load it anyway$", prepare=_shuffled_bin, id="dataset-bin-shuffled"),
]


def _pretrain_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_pref", REPO / "pretrain_pref.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("argv,first_line,code,absent,prepare,cwd", BAD_INPUTS)
def test_bad_input_table(argv, first_line, code, absent, prepare, cwd, tmp_path, monkeypatch, capsys, request):
    import re

    places = {"tmp": str(tmp_path)}
    if any("{data}" in a for a in argv):
        places["data"] = str(request.getfixturevalue("data_dir"))
    if prepare is not None:
        prepare(tmp_path, request)
    before = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(cwd or tmp_path)

    def no_process_group(*args, **kwargs):  # "before any expensive work", checked
        raise AssertionError("the bad input reached the process group")

    monkeypatch.setattr("megatron_pref.parallel.initialize", no_process_group)
    got = _pretrain_main()([a.format(**places) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.match(first_line.format(**{k: re.escape(v) for k, v in places.items()}), lines[0]), lines[0]
    for path in absent:
        assert not (tmp_path / path).exists(), path
    assert sorted(os.listdir(tmp_path)) == before  # nothing written at all


@pytest.mark.parametrize("save", ["ck", "copy"])
def test_saving_the_same_model_again_gets_past_the_save_dir_check(save, checkpoint, tmp_path, monkeypatch):
    """The control of the save-into-another-model row: a resume into its own directory, or into a
    copy of it, is not refused (it reaches the process group)."""
    directory, argv = checkpoint
    shutil.copytree(directory / "ck", tmp_path / "ck")
    shutil.copytree(directory / "ck", tmp_path / "copy")
    monkeypatch.chdir(tmp_path)

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr("megatron_pref.parallel.initialize", reached)
    with pytest.raises(Reached):
        _pretrain_main()([str(tmp_path / save) if a == str(directory / "ck") else a for a in argv]
                         + ["--load", str(tmp_path / "ck"), "--train-iters", "2", "--override-opt_param-scheduler"])


_RAISE_IN_TRAIN_PATH = """
import runpy, sys
import megatron_pref.parallel as parallel
def initialize(*args, **kwargs):  # an internal invariant failing inside train()
    raise ValueError("logits (2, 3) and labels (2, 4) disagree")
parallel.initialize = initialize
sys.argv = ["pretrain_pref.py"]
runpy.run_path("pretrain_pref.py", run_name="__main__")
"""


def test_only_user_errors_become_one_line(tmp_path, monkeypatch, capsys):
    """A bug (here a ValueError from inside train(), like the shape check of
    logprobs.token_logprobs) keeps its traceback and Python's exit 1; bad input (every
    UserError subclass, raised at the same place) is one line with exit 2."""
    from megatron_pref.convert.errors import ConversionError
    from megatron_pref.errors import UserError

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _RAISE_IN_TRAIN_PATH], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: logits (2, 3) and labels (2, 4) disagree"
    assert "error: logits" not in proc.stderr

    monkeypatch.chdir(tmp_path)
    main = _pretrain_main()
    for error in (ConfigError, DataError, CheckpointError, ConversionError, UserError):  # the control
        def bad_input(*args, **kwargs):
            raise error(f"a bad {error.__name__}")

        monkeypatch.setattr("megatron_pref.parallel.initialize", bad_input)
        assert main([]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: a bad {error.__name__}"]
    assert all(issubclass(e, UserError) for e in (ConfigError, DataError, CheckpointError, ConversionError))

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


def test_preflight_resolves_once_and_leaves_the_run_unchanged(tmp_path, monkeypatch):
    """preflight resolves the architecture once (with the tokenizer's vocabulary) and returns an
    immutable plan holding what it resolved ("auto" layers); the run is not changed. The
    counter would see the two resolutions train() made before preflight.py, and the equality
    its rewrite of run.precision.transformer_impl."""
    import copy
    import dataclasses

    from megatron_pref import preflight as preflight_module
    from megatron_pref.model import default_transformer_impl

    calls = []
    resolve = preflight_module.resolve_model_config
    monkeypatch.setattr(preflight_module, "resolve_model_config", lambda *a: calls.append(a[1]) or resolve(*a))
    run = parse_run_config(data_flags(_demo_subset(tmp_path, "train.jsonl", 16), _demo_subset(tmp_path, "v.jsonl", 4))
                           + MODEL_FLAGS + ["--loss", "dpo"])
    before = copy.deepcopy(run)
    plan = preflight_module.preflight(run, 1)
    assert run == before and run.precision.transformer_impl == "auto"
    assert plan.precision.transformer_impl == default_transformer_impl()
    assert calls == [plan.data.tokenizer.vocab_size] and plan.model.vocab_size == plan.data.tokenizer.vocab_size
    assert plan.reference == {"kind": "init", "seed": run.seed} and plan.saved_state is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.model = None


def test_seq_length_beyond_learned_positions_is_refused():
    from megatron_pref.training import train

    flags = ["--position-embedding-type", "learned_absolute", "--max-position-embeddings", "64"]
    with pytest.raises(ConfigError, match="--seq-length 128 exceeds the model's 64 learned positions"):
        train(parse_run_config(flags + ["--seq-length", "128"]))


def test_flags_without_effect_are_one_warning_line_each(tmp_path, capsys):
    """--save-interval without --save, --eval-interval/--eval-iters without validation data:
    Megatron-LM ignores them silently; here one line says so (and the run goes on)."""
    train_file = _demo_subset(tmp_path, "t.jsonl", 8)
    data = ["--data-path", train_file, *TOKENIZER]
    parse_run_config(data + ["--save-interval", "5", "--eval-interval", "10", "--eval-iters", "2"])
    assert capsys.readouterr().err.splitlines() == [
        "warning: --save-interval 5 has no effect without --save: no checkpoint is written",
        "warning: --eval-interval 10 has no effect without --valid-data-path: no evaluation runs",
        "warning: --eval-iters 2 has no effect without --valid-data-path: no evaluation runs"]
    # Controls: with --save and a validation split, or on the demo (which has one), no warning.
    parse_run_config(data + ["--valid-data-path", train_file, "--save", str(tmp_path / "ck"), "--save-interval", "5",
                             "--eval-interval", "10"])
    parse_run_config(["--eval-interval", "10"])
    assert capsys.readouterr().err == ""


def test_default_reference_cache_is_probed_only_when_used(tmp_path, monkeypatch):
    """The default ./runs/last/reference_cache is probed when a precomputed reference will be
    cached there; --save, --ref-cache-dir, --ref-logprobs online or a reference-free loss move
    or remove it (then an unwritable working directory is fine)."""
    monkeypatch.chdir("/proc")
    with pytest.raises(ConfigError, match=r"the default reference cache \(--ref-cache-dir\) runs/last/reference_cache"):
        parse_run_config([])
    for flags in (["--save", str(tmp_path / "ck")], ["--ref-cache-dir", str(tmp_path / "c")],
                  ["--ref-logprobs", "online"], ["--loss", "simpo"]):
        parse_run_config(flags)
    assert not os.listdir(tmp_path)


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
    rows = [{k: v for k, v in json.loads(line).items() if not k.startswith("score")} for line in lines[60:72]]
    (directory / "noscores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from megatron_pref.data.preprocess import main as preprocess  # in-process (one worker): no start-up cost

    assert preprocess(["--input", str(directory / "noscores.jsonl"), "--output-prefix", str(directory / "p_noscores"),
                       *TOKENIZER, "--workers", "1"]) == 0
    for name, source in (("p1", "a.jsonl"), ("p2", "b.ndjson")):
        subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_pref_data.py"), "--input", str(directory / source),
                        "--output-prefix", str(directory / name), *TOKENIZER, "--workers", "1"],
                       check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return directory


def _build(args):
    from megatron_pref.data.bundle import build_data

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
        _build(["--data-path", str(tmp_path / "p1"), "--no-verify-checksums"])
    if damage != "meta.json":  # the checksums that .meta.json records catch it first (issue 16 item 3)
        with pytest.raises(DataError, match=rf"p1.{damage}: \d+ bytes, \d+ when it was written \(truncated"):
            _build(["--data-path", str(tmp_path / "p1")])


def test_shuffled_dataset_reads_only_without_the_check(data_dir, tmp_path, request, capsys):
    """Controls for the table's dataset-bin-shuffled row: with --no-verify-checksums the same
    shuffled .bin opens and yields other tokens without a word; data preprocessed before
    checksums were recorded opens with one warning line."""
    _shuffled_bin(tmp_path, request)
    valid = ["--valid-data-path", str(data_dir / "p2")]
    shuffled = _build(["--data-path", str(tmp_path / "p1"), "--no-verify-checksums"] + valid)
    intact = _build(["--data-path", str(data_dir / "p1")] + valid)
    assert len(shuffled.train) == len(intact.train)
    assert any(shuffled.train[i].chosen_ids.tolist() != intact.train[i].chosen_ids.tolist()
               for i in range(len(intact.train)))
    assert capsys.readouterr().err == ""
    for suffix in ("bin", "idx", "pairs.npy"):
        shutil.copy(data_dir / f"p1.{suffix}", tmp_path / f"p1.{suffix}")
    meta = json.loads((data_dir / "p1.meta.json").read_text())
    del meta["checksums"]
    (tmp_path / "p1.meta.json").write_text(json.dumps(meta))
    assert len(_build(["--data-path", str(tmp_path / "p1")] + valid).train) == len(intact.train)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path}/p1.meta.json: no checksums (preprocessed before they were recorded): the dataset is "
        "read unverified"]


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
    from megatron_pref.forked_ranks import run_on_ranks

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
    from megatron_pref.forked_ranks import run_on_ranks

    def truncate(ck, iteration):
        data = sorted(iteration.glob("*.distcp"))[0]
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)

    argv, damaged = _damaged(checkpoint, tmp_path, truncate)
    # The recorded checksums catch it first, before any process group (issue 16 item 3) ...
    from megatron_pref.training import train

    with pytest.raises(CheckpointError, match=r"__0_0.distcp: \d+ bytes, \d+ when it was written \(truncated"):
        train(parse_run_config(argv + ["--load", damaged]))
    # ... and without them, reading the tensors does.
    with pytest.raises(RuntimeError, match=r"cannot load the checkpoint's tensors \(EOFError: a file of the "
                                           r"checkpoint ends early"):
        run_on_ranks(_train, 1, ParallelConfig(), argv + ["--load", damaged, "--no-verify-checksums"],
                     init_parallel=False)


class _ProcessGroupReached(Exception):
    pass


def _run_until_process_group(argv, monkeypatch) -> None:
    """pretrain_pref.main through every check, stopped where the process groups would start."""
    def stop(*args, **kwargs):
        raise _ProcessGroupReached

    with monkeypatch.context() as patch, pytest.raises(_ProcessGroupReached):
        patch.setattr("megatron_pref.parallel.initialize", stop)
        _pretrain_main()(argv)


def test_every_checkpoint_file_is_checksummed_when_saved(checkpoint):
    """checksums.json lists every file of the iteration directory, with its size and XXH3-128."""
    import xxhash

    iteration = checkpoint[0] / "ck" / "iter_0000001"
    manifest = json.loads((iteration / "checksums.json").read_text())
    files = sorted(p.name for p in iteration.iterdir() if p.name != "checksums.json")
    assert sorted(manifest["files"]) == files and any(f.endswith(".distcp") for f in files)
    for name in files:
        data = (iteration / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "digest": xxhash.xxh3_128(data).hexdigest()}


def test_damaged_checkpoint_loads_only_without_the_check(checkpoint, tmp_path, monkeypatch, capsys):
    """Controls for the table's checkpoint-bytes-damaged row: the same damaged copy passes every
    other check with --no-verify-checksums, and then loads and trains without a word (the
    silent failure the check prevents); an intact copy passes with the check."""
    from megatron_pref.forked_ranks import run_on_ranks

    argv, damaged = _damaged(checkpoint, tmp_path, lambda ck, iteration: _damage_tensor_bytes(iteration))
    _run_until_process_group(argv + ["--load", damaged, "--no-verify-checksums"], monkeypatch)
    _run_until_process_group(argv + ["--load", str(checkpoint[0] / "ck")], monkeypatch)
    assert capsys.readouterr().err == ""
    result = run_on_ranks(_train, 1, ParallelConfig(), argv + ["--load", damaged, "--no-verify-checksums",
                                                               "--finetune"], init_parallel=False)[0]
    assert result["iteration"] == 1


def test_checkpoint_without_checksums_loads_with_one_warning(checkpoint, tmp_path, monkeypatch, capsys):
    """A checkpoint saved before checksums were recorded (no checksums.json): one warning line."""
    argv, old = _damaged(checkpoint, tmp_path, lambda ck, it: (it / "checksums.json").unlink())
    _run_until_process_group(argv + ["--load", old], monkeypatch)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --load {old}/iter_0000001: no checksums.json (saved before checksums were recorded): its files "
        "are loaded unverified"]


# --------------------------------------------------------------------------- scores and small splits


def test_pairs_without_score_signal_are_counted_in_one_warning(tmp_path, capsys):
    """--spo-target-from-scores skips pairs without both scores or with score_chosen <=
    score_rejected: one warning line with the counts, before any process group."""
    from megatron_pref.data.bundle import build_data
    from megatron_pref.preflight import check_scores

    lines = [json.loads(line) for line in Path(demo_task.demo_data_path("train")).read_text().splitlines()[:10]]
    for row in lines[:3]:
        del row["score_rejected"]
    lines[3]["score_chosen"] = lines[3]["score_rejected"] = 2.0
    path = tmp_path / "some_scores.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    flags = ["--data-path", str(path), "--valid-data-path", str(path), *TOKENIZER, *MODEL_FLAGS, "--loss", "spo"]
    run = parse_run_config(flags + ["--spo-target-from-scores"])
    data = build_data(run)
    capsys.readouterr()
    check_scores(run, data)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: --spo-target-from-scores: 4 of 10 pairs of {flag} carry no training signal (3 without "
                   "both scores, 1 with score_chosen <= score_rejected): they are skipped, and still count in the "
                   "per-pair mean" for flag in ("--data-path", "--valid-data-path")]
    check_scores(parse_run_config(flags), data)  # control: a constant target needs no scores
    assert capsys.readouterr().err == ""


def test_split_errors_name_their_flag(tmp_path):
    """The loaders' errors name the flag of their data: a training set smaller than a global batch,
    a validation set without a usable pair (every pair longer than --seq-length)."""
    from megatron_pref.data.bundle import build_data
    from megatron_pref.training import _pair_loader

    short = _demo_subset(tmp_path, "short.jsonl", 4)
    rows = [json.loads(line) for line in Path(short).read_text().splitlines()]
    long_rows = [dict(r, prompt=r["prompt"] + " 1" * 200) for r in rows]
    long_file = tmp_path / "long.jsonl"
    long_file.write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    data = build_data(parse_run_config(["--data-path", short, "--valid-data-path", str(long_file), *TOKENIZER,
                                        *MODEL_FLAGS]))
    with pytest.raises(DataError, match=r"^--data-path: only 4 usable pairs, fewer than a global batch of 8 .*"
                                        r"\(lower --global-batch-size, or give more pairs\)$"):
        _pair_loader("--data-path", data.train, seq_length=64, global_batch_pairs=8)
    with pytest.raises(DataError, match=r"^--valid-data-path: no usable pairs \(0/4 pairs usable .*too_long=4"):
        _pair_loader("--valid-data-path", data.valid, seq_length=64, global_batch_pairs=2, dp_size=2,
                     evaluation_only=True)
    # Control: one usable pair is a validation set, even at two data-parallel ranks.
    loader = _pair_loader("--valid-data-path", data.train, seq_length=64, global_batch_pairs=2, dp_size=2, dp_rank=1,
                          evaluation_only=True)
    assert loader.num_usable_pairs == 4


def test_validation_smaller_than_data_parallel_size_evaluates_like_one_rank(distributed, tmp_path):
    """One validation pair at DP=2: rank 1 evaluates nothing and still joins the reductions;
    every evaluation number equals DP=1's (the reference pass for that split too)."""
    train_file = _demo_subset(tmp_path, "t.jsonl", 16)
    valid_file = _demo_subset(tmp_path, "v.jsonl", 1)
    argv = data_flags(train_file, valid_file) + MODEL_FLAGS + ["--loss", "dpo", "--train-iters", "1"]
    one = run_training(distributed, 1, argv + ["--ref-cache-dir", str(tmp_path / "c1")])[0]
    two = run_training(distributed, 2, argv + ["--ref-cache-dir", str(tmp_path / "c2")])[0]
    for when in ("eval_before", "eval_after"):
        assert one[when].keys() == two[when].keys()
        for name, value in one[when].items():
            assert two[when][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (when, name)
    assert one["eval_before"]["eval/logps/chosen"] < 0  # the pair was evaluated (not an empty mean)


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


# --------------------------------------------------------------------------- through the real command line
# pretrain_pref.py started as a process (python or torchrun): the line, its exit status, which
# rank prints it.


def error_lines(stderr: str) -> list:
    """Our one-line errors (``error: ...``, ``[rank N] error: ...``), without torchrun's own lines."""
    return [line for line in stderr.splitlines() if re.match(r"(\[rank \d+\] )?(error|stopped): ", line)]


@pytest.mark.parametrize("args,message", [
    (["--loss", "nope"], "--loss 'nope' is unknown"),
    (["--beta", "0"], "beta"),
    (["--data-path", "/no/such/file.jsonl", "--tokenizer-type", "SentencePieceTokenizer",
      "--tokenizer-model", "/no/such/tok.model"], "--tokenizer-model /no/such/tok.model: no such file"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (["--num-attention-heads", "3", "--hidden-size", "96", "--tensor-model-parallel-size", "2"],
     "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "2"], "world size 1 is not divisible by --tensor-model-parallel-size 2"),
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1"),
    (["--fp8-format", "hybrid"], "--fp8-format needs --bf16"),
    (["--load", "/no/such/dir"], "--load /no/such/dir: no such directory"),
    (["--ref-load", "/tmp", "--loss", "slime"], "reference-free"),
    (["--loss", "dpo,sft", "--loss-weights", "1"], "--loss-weights has 1 weight(s) for the 2 loss(es) of --loss dpo,sft"),
    (["--loss", "sigmoid"], "TRL's 'sigmoid' is our 'dpo'"),
    (["--loss", "bco_pair", "--f-divergence-type", "js_divergence"], "does not apply to --loss bco_pair"),
    (["--loss", "exo_pair"], "needs --label-smoothing > 0"),
])
def test_bad_input_is_one_line(args, message):
    out = run_cli(args + ["--no-progress-bar"], timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--overlap-param-gather", "--overlap-grad-reduce"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-param-gather needs --overlap-grad-reduce"),
])
def test_flag_dependencies_are_checked_before_any_work(args, message):
    from megatron_pref.arguments import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_run_config(args)
    parse_run_config(args + ["--use-distributed-optimizer", "--overlap-grad-reduce"])  # complete: accepted


@pytest.mark.parametrize("late_rank", [0, 1])
def test_global_batch_not_divisible_by_data_parallel_size(late_rank):
    """An error every rank finds alike is printed once, whichever rank fails first: the other
    rank starts 60 s late and torchrun stops it when the first one exits (rank 0 used to be
    the only one to print, so the line was lost when rank 1 failed first)."""
    out = torchrun_cli(2, ["--global-batch-size", "7", "--no-progress-bar"], timeout=300,
                       env_extra={f"TEST_SLEEP_RANK_{late_rank}": "60"})
    assert out.returncode != 0
    assert error_lines(out.stderr) == ["error: --global-batch-size 7 is not divisible by the data-parallel size 2"], \
        out.stderr[-2000:]
    # torchrun reports the failed worker with its own launcher traceback; ours must not appear.
    assert "pretrain_pref.py\", line" not in out.stderr and "megatron_pref/" not in out.stderr


def test_an_error_of_one_rank_is_printed_by_that_rank():
    """A node with one GPU and two ranks: rank 1 has none. Its error is its own (rank 0 waits
    for it in the rendezvous), so it is printed with the rank."""
    out = torchrun_cli(2, ["--transformer-impl", "local", "--train-iters", "1", "--no-progress-bar"], timeout=300,
                       env_extra={"TEST_GPUS": "1"})
    assert out.returncode != 0
    assert error_lines(out.stderr) == ["[rank 1] error: local rank 1 has no GPU: this node has 1; launch at most "
                                       "--nproc-per-node 1"], out.stderr[-2000:]


def test_missing_data_file_is_one_line(tmp_path):
    from megatron_pref.data import demo_task

    out = run_cli(["--data-path", str(tmp_path / "missing.jsonl"), "--tokenizer-type", "SentencePieceTokenizer",
                   "--tokenizer-model", demo_task.demo_tokenizer_path()])
    assert out.returncode == 2 and "missing.jsonl" in out.stderr and "Traceback" not in out.stderr


def test_load_with_a_different_architecture_names_the_field(distributed, tmp_path, tiny):
    run_training(distributed, 1, tiny + ["--loss", "sft", "--train-iters", "1", "--save", str(tmp_path / "c")])
    out = run_cli(tiny + ["--loss", "sft", "--load", str(tmp_path / "c"), "--hidden-size", "48"])
    assert out.returncode == 2
    assert "--hidden-size 48 differs from the --load checkpoint's hidden_size=32" in out.stderr


@pytest.mark.parametrize("impl,recipe,capability,error", [
    ("local", "tensorwise", (9, 0), "needs Transformer Engine"),
    ("transformer_engine", "mxfp8", (9, 0), "mxfp8 needs compute capability 10.0"),
    ("transformer_engine", "mxfp8", (10, 0), None),
    ("transformer_engine", "blockwise", (9, 0), None),
])
def test_fp8_support_is_checked_before_any_work(monkeypatch, impl, recipe, capability, error):
    from megatron_pref.model import PrecisionConfig
    from megatron_pref.preflight import ConfigError, check_fp8_support

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU-under-test")
    precision = PrecisionConfig(bf16=True, fp8_format="hybrid", fp8_recipe=recipe, transformer_impl=impl)
    if error is None:
        check_fp8_support(precision)
    else:
        with pytest.raises(ConfigError, match=error):
            check_fp8_support(precision)
