"""tools/gpu_checks.sh and the benchmark's partial results, exercised on CPU.

The lent GPU gives a session about 15 minutes in all, so the one command that takes every GPU
figure must work the first time: its budgeting, its files (the device returns at most eight)
and the benchmark's JSON that survives a stage cut short are checked here with the tiny preset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_checks.sh")
BENCHMARK = os.path.join(ROOT, "tools", "benchmark_pref.py")
STAGES = ("gpu-tests", "bench-8b-slice", "bench-1b", "bench-8b-fused")
DEVICE_RETURNS_AT_MOST = 8


def run_checks(out, budget: int):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
               GPU_CHECKS_LARGE="tiny", GPU_CHECKS_SMALL="tiny",
               GPU_CHECKS_BENCH_ARGS="--device cpu --steps 1 --warmup 0")
    return subprocess.run(["bash", SCRIPT, str(out), str(budget)], capture_output=True, text=True, env=env,
                          timeout=budget + 60, cwd=ROOT)


@pytest.mark.slow
def test_gpu_checks_script_runs_every_stage_and_returns_few_files(tmp_path):
    out = tmp_path / "out"
    proc = run_checks(out, 300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(os.listdir(out))
    # On a GPU the tests also write gpu_record.jsonl: seven files, within what the device returns.
    assert files == sorted(["summary.txt", "gpu_tests.log", "bench-8b-slice.json", "bench-1b.json",
                            "bench-8b-fused.json", "logs.tar.gz"]), files
    assert len(files) + 1 <= DEVICE_RETURNS_AT_MOST
    summary = (out / "summary.txt").read_text()
    for stage in STAGES:
        assert f"[{stage}] exit 0 in" in summary, summary
    assert "gpu_checks: done in" in summary and "TIMED OUT" not in summary
    assert "skipped" in (out / "gpu_tests.log").read_text()  # pytest ran the gpu tests (skipped on CPU)

    for name in ("bench-8b-slice.json", "bench-1b.json", "bench-8b-fused.json"):
        result = json.loads((out / name).read_text())
        assert result["complete"] is True and result["meta"]["preset"] == "tiny"
        assert all(r["status"] in ("ok", "skipped") for r in result["configs"]), result["configs"]
    fused = json.loads((out / "bench-8b-fused.json").read_text())
    assert [r["name"] for r in fused["configs"]] == ["packed", "packed-fp8"]  # the stage's own --configs wins

    profiled = json.loads((out / "bench-8b-slice.json").read_text())
    assert [r["name"] for r in profiled["configs"]] == ["packed", "hf", "packed-fp8", "padded"]  # targets first
    for row in (r for r in profiled["configs"] if r["status"] == "ok"):
        shares = row["profile"]["by_category"]
        assert sum(v["fraction"] for v in shares.values()) == pytest.approx(1.0, abs=1e-6)
        assert "gemm" in shares and row["profile"]["top"], row["profile"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {f"logs/{s}.log" for s in STAGES} <= set(names)
    assert "logs/profiles/tiny-packed.txt" in names and "logs/profiles/tiny-hf.txt" in names


def test_gpu_checks_script_skips_stages_when_the_budget_is_spent(tmp_path):
    """Negative control of the budgeting: 30 s leave no stage its 20 s minimum."""
    out = tmp_path / "out"
    proc = run_checks(out, 30)
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.txt").read_text()
    for stage in STAGES:
        assert f"[{stage}] skipped" in summary, summary
    assert not any(name.endswith(".json") for name in os.listdir(out))


def test_gpu_checks_script_refuses_bad_arguments(tmp_path):
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "usage" in proc.stderr
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path), "9m"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "TOTAL_SECONDS" in proc.stderr and proc.stderr.count("\n") == 1


# The benchmark loaded as a module in a fresh process; the driver's body patches it, then runs
# ``bench.main`` on the tiny preset with its own flags. argv: BENCHMARK OUT MODE.
DRIVER_PREAMBLE = textwrap.dedent('''
    import importlib.util, json, sys
    import torch
    spec = importlib.util.spec_from_file_location("benchmark_pref", sys.argv[1])
    bench = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_pref"] = bench
    spec.loader.exec_module(bench)
    mode, out = sys.argv[3], sys.argv[2]
    TINY = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--skip-logprob-stage",
            "--out", out]
''')


def run_driver(body: str, out, mode: str, cwd):
    """(exit code, stdout + stderr, the JSON the run wrote)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", DRIVER_PREAMBLE + textwrap.dedent(body), BENCHMARK, str(out), mode],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(cwd))
    return proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:], json.loads(out.read_text())


@pytest.mark.slow
def test_benchmark_keeps_finished_configurations_when_cut_short(tmp_path):
    """The JSON is rewritten after every configuration: an interrupted run keeps what it measured,
    marked incomplete. Control: the same run uninterrupted ends complete with both rows."""
    body = '''
        run_config = bench.run_config
        def interrupted(name, *args, **kwargs):
            if name == "hf" and mode == "interrupt":
                raise KeyboardInterrupt  # as a time limit's signal would stop it
            return run_config(name, *args, **kwargs)
        bench.run_config = interrupted
        sys.exit(bench.main(TINY + ["--configs", "packed,hf"]))
    '''
    results = {}
    for mode in ("interrupt", "complete"):
        code, _, result = run_driver(body, tmp_path / f"{mode}.json", mode, tmp_path)
        results[mode] = (code, result)
    code, cut = results["interrupt"]
    assert code != 0
    assert cut["complete"] is False and [r["name"] for r in cut["configs"]] == ["packed"]
    assert cut["configs"][0]["status"] == "ok" and cut["configs"][0]["tokens_per_s"] > 0
    code, whole = results["complete"]
    assert code == 0 and whole["complete"] is True
    assert [r["name"] for r in whole["configs"]] == ["packed", "hf"] and "summary" in whole
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
    ("void transformer_engine::cast_transpose_kernel<...>", "fp8 quantize/amax"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("void transformer_engine::normalization::rmsnorm_fwd_tuned_kernel", "norm"),
    ("aten::_log_softmax", "softmax / log-prob"),
    ("Memcpy DtoD (Device -> Device)", "copy / fill"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "other (elementwise, ...)"),
])
def test_profile_categories(name, category):
    from tests.test_packaging import load_benchmark

    assert load_benchmark().profile_category(name) == category


@pytest.mark.slow
def test_benchmark_retries_out_of_memory_with_smaller_micro_batches(tmp_path):
    """A configuration that runs out of memory with all pairs in one micro-batch is retried with
    half as many pairs per micro-batch; the step's loss (mean over its pairs) does not change."""
    body = '''
        if mode == "oom":
            for name in ("megatron_runner", "hf_runner"):
                build = getattr(bench, name)
                def too_big(*args, _build=build, micro_pairs=None, **kwargs):
                    if micro_pairs is None or micro_pairs > 1:   # only one pair at a time "fits"
                        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
                    return _build(*args, micro_pairs=micro_pairs, **kwargs)
                setattr(bench, name, too_big)
        sys.exit(bench.main(TINY + ["--configs", "packed,padded,hf"]))
    '''
    rows = {}
    for mode in ("fits", "oom"):
        code, output, result = run_driver(body, tmp_path / f"{mode}.json", mode, tmp_path)
        assert code == 0, output
        rows[mode] = {r["name"]: r for r in result["configs"]}
    for name in ("packed", "padded", "hf"):
        fits, retried = rows["fits"][name], rows["oom"][name]
        assert fits["micro_pairs"] == 4 and "out_of_memory_at_micro_pairs" not in fits
        assert retried["status"] == "ok", retried
        assert retried["micro_pairs"] == 1 and retried["out_of_memory_at_micro_pairs"] == [4, 2]
        assert retried["losses"][0] == pytest.approx(fits["losses"][0], rel=1e-5), name
        assert retried["real_tokens_per_step"] == fits["real_tokens_per_step"]
    # Per-pair micro-batches pad each pair to its own longest sequence: less padding than one batch.
    assert rows["oom"]["hf"]["padding_fraction"] < rows["fits"]["hf"]["padding_fraction"]
