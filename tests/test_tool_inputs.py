"""Bad input to the command-line tools: exactly one stderr line ``error: ...`` naming the problem,
exit status 2, no traceback, nothing written (tools/verify_conversion.py, the two converters,
tools/benchmark_pref.py, tools/make_demo_data.py).

One real subprocess run of the tool per problem class (run concurrently: each pays the torch /
transformers / megatron-core import); variants of a class run in-process through the same
``main(argv)``. Models are tiny (GPT-2, 2 layers, hidden 64); the megatron checkpoints here are
only their config files (every check under test runs before a tensor is read).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pref.checkpoint_format import CONFIG_FILE, FORMAT_VERSION, LATEST_FILE, iteration_name

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


# --- helpers -----------------------------------------------------------------------------------

def run_tools(*cases, cwd=None):
    """Run ``(script, *args)`` cases as subprocesses, all at once; returns CompletedProcess-likes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, str(TOOLS / script), *map(str, args)], env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script, *args in cases]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    """Exit 2, one stderr line starting with ``error:`` that contains every needle, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, (code, out[-1000:], err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def check(proc, *needles) -> str:
    return assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, *needles)


def check_main(capsys, main, argv, *needles) -> str:
    """In-process: ``main(argv)`` returns 2 or exits 2 (argparse), with one error line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return assert_one_line_error(code, captured.out, captured.err, *needles)


def fake_checkpoint(directory: Path, model: dict, model_type=None) -> Path:
    """A megatron_pref checkpoint directory with its config files only (no tensors)."""
    (directory / iteration_name(0)).mkdir(parents=True)
    (directory / iteration_name(0) / "metadata.json").write_text("{}")
    (directory / LATEST_FILE).write_text(iteration_name(0) + "\n")
    (directory / CONFIG_FILE).write_text(json.dumps({"model": model, "format_version": FORMAT_VERSION,
                                                     "source": {"model_type": model_type} if model_type else {}}))
    return directory


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny GPT-2 HF directory with a tokenizer, a config-only checkpoint of the same model and
    one of a different (Llama) model."""
    from megatron_pref.convert.hf_to_megatron import inspect_hf_checkpoint
    from megatron_pref.model import ModelConfig
    from tests.test_convert import make_hf_model

    root = tmp_path_factory.mktemp("tool_inputs")
    hf = make_hf_model(root / "gpt2", "gpt2", tokenizer=True)
    same = fake_checkpoint(root / "gpt2_mc", inspect_hf_checkpoint(hf).model_cfg.to_dict(), "gpt2")
    llama = ModelConfig(vocab_size=1000, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, max_position_embeddings=4096)
    other = fake_checkpoint(root / "llama_mc", llama.to_dict(), "llama")
    afile = root / "afile"
    afile.write_text("not a directory\n")
    return dict(root=root, hf=hf, same=same, other=other, afile=afile)


def copy_hf(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --- argparse: one line, exit 2, for every tool --------------------------------------------------

def test_flag_errors_are_one_line_with_exit_2_in_every_tool(tmp_path):
    cases = [
        ("verify_conversion.py", "--hf-dir", "x", "--load", "y", "--bogus"),
        ("verify_conversion.py", "--hf-dir", "x"),                                 # missing --load
        ("convert_hf_to_megatron.py", "--hf-dir", "x", "--save", "y", "--dtype", "fp16"),
        ("convert_megatron_to_hf.py", "--load", "x", "--save", "y", "--iteration", "one"),
        ("benchmark_pref.py", "--preset", "tiny", "--steps", "x"),
        ("make_demo_data.py", "--bench", "x"),
    ]
    needles = [("unrecognized arguments: --bogus",), ("--load",), ("--dtype", "fp16"), ("--iteration", "one"),
               ("--steps", "'x'"), ("--bench", "'x'")]
    for proc, want in zip(run_tools(*cases, cwd=tmp_path), needles):
        line = check(proc, *want)
        assert "usage:" not in proc.stderr and not line.startswith("error: usage")
    assert not list(tmp_path.iterdir())


# --- the tools' bad-input table --------------------------------------------------------------------
#
# One row per bad input found: the tool, its flags ({tmp}: the working directory the row runs in;
# {same}: the config-only checkpoint of the `models` fixture), needles of the one `error:` line
# (exit status 2), and the paths under {tmp} that must not exist afterwards. In-process, through
# the tool's main(argv).

def _main_of(tool: str):
    if tool == "convert_megatron_to_hf":
        from megatron_pref.convert.cli import megatron_to_hf_main

        return megatron_to_hf_main
    if tool == "verify_conversion":
        from megatron_pref.convert.cli import verify_main

        return verify_main
    return load_tool(tool).main


TOOL_BAD_INPUTS = [
    # issue 16: --bench wrote bench.jsonl into the working directory unasked
    pytest.param("make_demo_data", ["--bench", "3"], ["--bench needs --bench-out FILE"], ["bench.jsonl"],
                 id="bench-without-bench-out"),
    pytest.param("make_demo_data", ["--bench-out", "{tmp}/b.jsonl"], ["--bench-out needs --bench N"], ["b.jsonl"],
                 id="bench-out-without-bench"),
    # issue 16: a missing --iteration was "not a complete distributed checkpoint"
    pytest.param("convert_megatron_to_hf", ["--load", "{same}", "--save", "{tmp}/out", "--iteration", "99"],
                 ["--iteration 99: ", "has no iter_0000099; available iterations: 0"], ["out"],
                 id="export-missing-iteration"),
    # issue 16 item 3: 256 bytes of a tensor file overwritten (same length) loaded silently
    pytest.param("convert_megatron_to_hf", ["--load", "{damaged}", "--save", "{tmp}/out"],
                 ["--load {damaged}/iter_0000000/__0_0.distcp: checksum mismatch (the file changed after it was "
                  "written); pass --no-verify-checksums to load it anyway"], ["out"], id="export-damaged-bytes"),
    pytest.param("verify_conversion", ["--hf-dir", "{hf}", "--load", "{damaged}"],
                 ["--load {damaged}/iter_0000000/__0_0.distcp: checksum mismatch"], [], id="verify-damaged-bytes"),
    # issue 14: the loss study refuses bad input before any training
    pytest.param("loss_study", ["--losses", "dpo,nope", "--out", "{tmp}/out"], ["--losses: unknown loss 'nope'"],
                 ["out"], id="study-unknown-loss"),
    pytest.param("loss_study", ["--scenarios", "clean,windy", "--out", "{tmp}/out"],
                 ["--scenarios: unknown scenario 'windy'"], ["out"], id="study-unknown-scenario"),
    pytest.param("loss_study", ["--out", "{tmp}/out", "--", "--lr", "1e-3"], ["--lr is set by the study"], ["out"],
                 id="study-controlled-flag"),
    pytest.param("loss_study", ["--losses", "dpo", "--lr", "spo=1e-3", "--out", "{tmp}/out"],
                 ["--lr spo=1e-3: expected LOSS=NUMBER with a loss of --losses"], ["out"], id="study-lr-other-loss"),
]


@pytest.fixture(scope="module")
def damaged(models):
    """A real conversion of the `models` GPT-2 (tensors and checksums), 256 bytes of its tensor
    file overwritten in place: same length (tests/test_inputs.py damages training checkpoints
    the same way)."""
    from tests.test_inputs import _damage_tensor_bytes

    directory = models["root"] / "damaged_mc"
    # A subprocess: an in-process save leaves dist_checkpointing's writer process and thread
    # behind, and the gloo ranks the later tests fork from this process then hang.
    (done,) = run_tools(("convert_hf_to_megatron.py", "--hf-dir", models["hf"], "--save", directory))
    assert done.returncode == 0, done.stderr[-2000:]
    _damage_tensor_bytes(directory / iteration_name(0))
    return directory


@pytest.mark.parametrize("tool,argv,needles,absent", TOOL_BAD_INPUTS)
def test_tool_bad_input_table(tool, argv, needles, absent, models, tmp_path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)
    places = {"tmp": str(tmp_path), "same": str(models["same"]), "hf": str(models["hf"])}
    if any("{damaged}" in a for a in argv):
        places["damaged"] = str(request.getfixturevalue("damaged"))
    check_main(capsys, _main_of(tool), [a.format(**places) for a in argv], *[n.format(**places) for n in needles])
    for path in absent:
        assert not (tmp_path / path).exists(), path
    assert not os.listdir(tmp_path)


def test_damaged_checkpoint_exports_only_without_the_check(damaged, models, tmp_path, capsys):
    """Control for the export-damaged-bytes row: --no-verify-checksums exports the same damaged
    checkpoint without a word, and its weights differ from the intact model's (the silent
    failure the check prevents)."""
    from safetensors.torch import load_file

    # A subprocess, like the `damaged` fixture's conversion: an in-process load leaves state
    # behind that hangs the gloo ranks later tests fork from this process.
    (done,) = run_tools(("convert_megatron_to_hf.py", "--load", damaged, "--save", tmp_path / "out",
                         "--no-verify-checksums"))
    assert done.returncode == 0 and "error" not in done.stderr, done.stderr[-2000:]

    def tensors(directory):
        return {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(f).items()}

    exported, intact = tensors(tmp_path / "out"), tensors(models["hf"])
    assert exported.keys() & intact.keys()
    changed = [k for k in exported if k in intact and not (exported[k].float() == intact[k].float()).all()]
    assert changed


def test_bench_writes_where_bench_out_says(tmp_path, monkeypatch):
    """Control for the rows above: --bench with --bench-out writes that file and nothing else."""
    monkeypatch.chdir(tmp_path)
    assert load_tool("make_demo_data").main(["--bench", "2", "--bench-out", "sub/b.jsonl"]) == 0
    assert os.listdir(tmp_path) == ["sub"] and len((tmp_path / "sub" / "b.jsonl").read_text().splitlines()) == 2


# --- verify_conversion.py ------------------------------------------------------------------------

def test_verify_refuses_bad_hf_dirs_without_network(models, tmp_path, capsys):
    from megatron_pref.convert.cli import verify_main

    load = models["same"]
    # A missing directory is a local path, never a Hub repo name (transformers would say "Repo id ...").
    missing = tmp_path / "no" / "such"
    [proc] = run_tools(("verify_conversion.py", "--hf-dir", missing, "--load", load))
    line = check(proc, str(missing), "not a directory")
    assert "Repo id" not in line

    empty = tmp_path / "empty"
    empty.mkdir()
    check_main(capsys, verify_main, ["--hf-dir", empty, "--load", load], "no config.json", str(empty))

    falcon = tmp_path / "falcon"
    falcon.mkdir()
    (falcon / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    check_main(capsys, verify_main, ["--hf-dir", falcon, "--load", load], "FalconForCausalLM", "GPT2LMHeadModel")

    truncated = copy_hf(models["hf"], tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    check_main(capsys, verify_main, ["--hf-dir", truncated, "--load", load], "model.safetensors")

    # Negative control: the intact pair passes every pre-run check.
    from megatron_pref.convert.verify import check_verify_inputs

    assert check_verify_inputs(models["hf"], load).vocab_size == 1100


def test_verify_refuses_mismatched_models_before_running(models, capsys):
    from megatron_pref.convert.cli import verify_main

    [proc] = run_tools(("verify_conversion.py", "--hf-dir", models["hf"], "--load", models["other"]))
    line = check(proc, "different architectures", "vocab_size 1100 vs 1000", "position_embedding_type")
    assert "logit shapes" not in line and "verify:" not in proc.stdout  # neither model ran
    # Only one field differs: named alone (a checkpoint of the same shape except the vocabulary).
    cfg = json.loads((models["same"] / CONFIG_FILE).read_text())
    cfg["model"]["vocab_size"] = 1000
    one_off = models["root"] / "vocab_mc"
    fake_checkpoint(one_off, cfg["model"], "gpt2")
    line = check_main(capsys, verify_main, ["--hf-dir", models["hf"], "--load", one_off], "vocab_size 1100 vs 1000")
    assert "hidden_size" not in line


def test_verify_refuses_bad_flag_values(models, capsys):
    from megatron_pref.convert.cli import verify_main

    base = ["--hf-dir", models["hf"], "--load", models["same"]]
    [proc] = run_tools(("verify_conversion.py", *base, "--atol", "-1"))
    check(proc, "--atol", "-1")
    check_main(capsys, verify_main, base + ["--atol", "nan"], "--atol", "nan")
    check_main(capsys, verify_main, base + ["--min-argmax-agreement", "2"], "--min-argmax-agreement", "2")
    check_main(capsys, verify_main, base + ["--text", ""], "--text", "empty")
    check_main(capsys, verify_main, base + ["--text", "a b", "--random-tokens", "4"], "--random-tokens")
    # More random tokens than the model has positions (GPT-2 here: 128): refused, not silently capped.
    check_main(capsys, verify_main, base + ["--random-tokens", "20000"], "--random-tokens 20000", "128")

    # Negative control: the limit itself is accepted.
    from megatron_pref.convert.verify import fixed_tokens

    assert len(fixed_tokens(models["same"], models["hf"], random_tokens=128)) == 128


def test_damaged_checkpoint_metadata_is_one_line(models, tmp_path, capsys):
    """The config-only checkpoints of this file have an empty metadata.json: megatron-core cannot
    read it, which both tools report before building a model."""
    from megatron_pref.convert.cli import megatron_to_hf_main, verify_main

    check_main(capsys, verify_main, ["--hf-dir", models["hf"], "--load", models["same"]],
               "not a readable distributed checkpoint", iteration_name(0))
    check_main(capsys, megatron_to_hf_main, ["--load", models["same"], "--save", tmp_path / "out"],
               "not a readable distributed checkpoint")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# --- the converters --------------------------------------------------------------------------------

def test_converters_check_the_output_location_first(models, tmp_path, capsys):
    from megatron_pref.convert.cli import hf_to_megatron_main, megatron_to_hf_main

    afile = models["afile"]
    [proc] = run_tools(("convert_hf_to_megatron.py", "--hf-dir", models["hf"], "--save", afile / "sub"))
    check(proc, str(afile / "sub"), "not a directory")
    check_main(capsys, megatron_to_hf_main, ["--load", models["same"], "--save", afile / "x"],
               str(afile / "x"), "not a directory")
    if os.path.isdir("/proc/self"):  # a directory nobody can create entries in
        check_main(capsys, hf_to_megatron_main, ["--hf-dir", models["hf"], "--save", "/proc/x1"], "/proc/x1")
    assert afile.read_text() == "not a directory\n"


def test_megatron_to_hf_refuses_bad_shard_size_and_bad_metadata(models, tmp_path, capsys):
    from megatron_pref.convert.cli import megatron_to_hf_main
    from megatron_pref.convert.safetensors_io import parse_size

    bad = tmp_path / "list_mc"
    fake_checkpoint(bad, {})
    (bad / CONFIG_FILE).write_text("[1, 2]")
    [proc] = run_tools(("convert_megatron_to_hf.py", "--load", bad, "--save", tmp_path / "out"))
    check(proc, str(bad / CONFIG_FILE), "not a JSON object")
    for size in ("lots", "0", "-5MB", "nanGB"):
        check_main(capsys, megatron_to_hf_main, ["--load", models["same"], "--save", tmp_path / "out",
                                                 f"--max-shard-size={size}"], "--max-shard-size", repr(size))
    assert not (tmp_path / "out").exists()
    assert [parse_size(s) for s in ("5GB", "500MB", "1KiB", "1000")] == [5 * 10**9, 500 * 10**6, 1024, 1000]


def test_hf_to_megatron_refuses_bad_config_json_and_tokenizer(models, tmp_path, capsys):
    from megatron_pref.convert.cli import hf_to_megatron_main
    from megatron_pref.convert.hf_to_megatron import plan_hf_to_megatron

    garbage = copy_hf(models["hf"], tmp_path / "garbage_tokenizer")
    (garbage / "tokenizer.json").write_text('{"version": "1.0", "model": 42')
    [proc] = run_tools(("convert_hf_to_megatron.py", "--hf-dir", garbage, "--save", tmp_path / "out"))
    check(proc, str(garbage / "tokenizer.json"))

    listed = copy_hf(models["hf"], tmp_path / "list_config")
    (listed / "config.json").write_text("[]")
    check_main(capsys, hf_to_megatron_main, ["--hf-dir", listed, "--save", tmp_path / "out"],
               "config.json", "not a JSON object")

    # "architectures" as a plain string is accepted as a one-item list; a number is refused.
    as_string = copy_hf(models["hf"], tmp_path / "string_arch")
    cfg = json.loads((as_string / "config.json").read_text())
    cfg["architectures"] = "GPT2LMHeadModel"
    (as_string / "config.json").write_text(json.dumps(cfg))
    assert plan_hf_to_megatron(as_string, tmp_path / "out").model_type == "gpt2"
    cfg["architectures"] = "LlamaForCausalLM"  # a string naming another architecture: named whole
    (as_string / "config.json").write_text(json.dumps(cfg))
    check_main(capsys, hf_to_megatron_main, ["--hf-dir", as_string, "--save", tmp_path / "out"],
               "'LlamaForCausalLM'")
    cfg["architectures"] = 7
    (as_string / "config.json").write_text(json.dumps(cfg))
    check_main(capsys, hf_to_megatron_main, ["--hf-dir", as_string, "--save", tmp_path / "out"], "architectures")
    # Negative control: the intact directory (same tokenizer files) passes every check.
    assert plan_hf_to_megatron(models["hf"], tmp_path / "out").model_type == "gpt2"
    assert not (tmp_path / "out").exists()


# --- benchmark_pref.py -----------------------------------------------------------------------------

def test_benchmark_checks_outputs_and_configs_before_running(tmp_path):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    tiny = ("benchmark_pref.py", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
            "--skip-logprob-stage")
    procs = run_tools(
        (*tiny, "--out", empty),
        (*tiny, "--out", tmp_path / "r.json", "--profile", afile),
        (*tiny, "--out", tmp_path / "r.json", "--configs", ","),
        (*tiny, "--out", afile / "r.json"),
        cwd=tmp_path)
    check(procs[0], "--out", str(empty), "directory")
    check(procs[1], "--profile", str(afile), "not a directory")
    check(procs[2], "--configs", "no configuration")
    check(procs[3], "--out", str(afile))
    for proc in procs:
        assert "[benchmark_pref]" not in proc.stdout  # no configuration ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "emptydir"] and not list(empty.iterdir())


# --- make_demo_data.py -----------------------------------------------------------------------------

def test_make_demo_data_checks_every_output_first(tmp_path):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    bench = tmp_path / "bench.jsonl"
    procs = run_tools(
        ("make_demo_data.py", "--bench", "3", "--bench-out", empty),
        ("make_demo_data.py", "--bench", "3", "--bench-out", afile / "x.jsonl"),
        ("make_demo_data.py", "--out-dir", afile),
        ("make_demo_data.py", "--bench", "3", "--bench-out", bench, "--bench-hf-tokenizer", afile),
        ("make_demo_data.py", "--bench", "-5", "--bench-out", bench),
        ("make_demo_data.py", "--bench", "3", "--bench-out", tmp_path / "new" / "ok.jsonl", "--bench-format", "chat"),
        cwd=tmp_path)
    check(procs[0], "--bench-out", str(empty), "directory")
    check(procs[1], "--bench-out", str(afile))
    check(procs[2], "--out-dir", str(afile), "not a directory")
    check(procs[3], "--bench-hf-tokenizer", str(afile))
    check(procs[4], "--bench", "-5")
    assert not bench.exists(), "the bench file was written before the tokenizer directory was checked"
    assert afile.read_text() == "x" and not list(empty.iterdir())
    # Negative control: a good run writes the pairs (its directory created), nothing else.
    ok = procs[5]
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    rows = [json.loads(line) for line in (tmp_path / "new" / "ok.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["chosen"][0]["role"] == "user" for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "emptydir", "new"]
    assert os.listdir(tmp_path / "new") == ["ok.jsonl"]


def test_bench_and_tokenizer_files_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous file intact and no temporary file."""
    tool = load_tool("make_demo_data")
    out = tmp_path / "bench.jsonl"
    tool.write_bench(str(out), 4, "add", seed=1)
    before = out.read_text()
    assert len(before.splitlines()) == 4

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("disk full (simulated)")
        return real(*args, **kwargs)

    real = tool.demo_task.make_pair
    monkeypatch.setattr(tool.demo_task, "make_pair", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        tool.write_bench(str(out), 10, "add", seed=2)
    assert out.read_text() == before and os.listdir(tmp_path) == ["bench.jsonl"]
    monkeypatch.undo()

    from megatron_pref.data import testing

    tok_dir = tmp_path / "tok"
    testing.make_tiny_hf_tokenizer(str(tok_dir))
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size() == 320
    good = (tok_dir / "tokenizer.json").read_bytes()
    from megatron_pref import atomic

    def half_written(path, text):
        def write(f):
            f.write(text[: len(text) // 2].encode())
            raise OSError("disk full (simulated)")

        atomic.write_atomic(path, write)

    monkeypatch.setattr(testing, "write_text_atomic", half_written)
    with pytest.raises(OSError, match="simulated"):
        testing.make_tiny_hf_tokenizer(str(tok_dir))
    assert (tok_dir / "tokenizer.json").read_bytes() == good
    assert sorted(os.listdir(tok_dir)) == ["tokenizer.json", "tokenizer_config.json"]


# --- under torchrun ----------------------------------------------------------------------------

def _torchrun_tool(script, *args, nproc=2, block=None):
    """``torchrun --nproc-per-node nproc tools/script args`` (through tests/wrapped_launch.py when
    ``block`` names packages to make absent); Popen, started now."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    wrapper = []
    if block:
        env["TEST_BLOCK_MODULES"] = block
        wrapper = [str(REPO / "tests" / "wrapped_launch.py")]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *wrapper,
                             str(TOOLS / script), *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_process_tools_refuse_torchrun_in_one_line(tmp_path):
    """Each torchrun rank used to run the whole tool (the converters and verify_conversion's
    forked ranks waited forever for torchrun's store). A tool that runs as one process refuses
    in one line, printed once, before it imports torch (torch is made absent here: importing
    it would fail with a traceback instead)."""
    cases = {
        "convert_hf_to_megatron.py": (["--hf-dir", tmp_path, "--save", tmp_path / "out"], "runs as one process"),
        "convert_megatron_to_hf.py": (["--load", tmp_path, "--save", tmp_path / "out"], "runs as one process"),
        "make_demo_data.py": (["--out-dir", tmp_path / "demo"], "runs as one process"),
        "preprocess_pref_data.py": (["--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "p",
                                     "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tmp_path],
                                    "runs as one process"),
        "benchmark_logprobs.py": ([], "runs as one process"),
        "benchmark_pref.py": (["--preset", "tiny", "--device", "cpu"], "the benchmark runs on one rank"),
        # verify_conversion runs on torchrun's ranks, exactly TP x PP of them.
        "verify_conversion.py": (["--hf-dir", tmp_path, "--load", tmp_path], "torchrun started 2 rank(s) and "
                                 "--tensor-model-parallel-size 1 x --pipeline-model-parallel-size 1 needs 1"),
    }
    procs = {script: _torchrun_tool(script, *args, block="torch") for script, (args, _) in cases.items()}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        ours = [line for line in err.splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(ours) == 1, (script, err[-3000:])
        assert cases[script][1] in ours[0] and "torchrun" in ours[0], (script, ours)
        assert "ModuleNotFoundError" not in err, (script, err[-3000:])
