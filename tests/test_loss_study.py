"""tools/loss_study.py end to end (--quick on the clean scenario, DPO and SPO), as users run it.

Checks that the report, its plots and results.json are written, that every number is finite,
and one claim with a negative control: DPO's margin grows while SPO's settles at its target
(z = beta*h/target near 1); with SPO's target moved out of reach (the control) the same
assertion fails.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "loss_study.py"
# A small SPO target (beta*h = 0.3 with the study's beta 1: h = 0.3 nats), reachable in --quick's steps.
SMALL_TARGET = "spo:--spo-target-margin 0.3"

pytestmark = pytest.mark.slow


def run_study(out: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(TOOL), "--quick", "--scenarios", "clean", "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def numbers(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def final_mean(results, loss, name, k=3):
    values = [v for v in results["runs"]["clean"][loss]["train"][name] if v is not None]
    return sum(values[-k:]) / k


def spo_settles_while_dpo_grows(results) -> bool:
    """The claim under test: SPO's margin ends near its target (0.5 <= z <= 1.5) and DPO's beta*h
    ends above SPO's."""
    z = final_mean(results, "spo", "spo/z")
    beta_h = {loss: results["runs"]["clean"][loss]["beta"] * final_mean(results, loss, "study/h")
              for loss in ("dpo", "spo")}
    return 0.5 <= z <= 1.5 and beta_h["dpo"] > beta_h["spo"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    proc = run_study(out, "--losses", "dpo,spo", "--loss-args", SMALL_TARGET)
    return out, proc, json.loads((out / "results.json").read_text())


def test_report_plots_and_finite_results(study):
    out, proc, results = study
    report = (out / "report.md").read_text()
    assert report.startswith("# Loss study")
    assert "python tools/loss_study.py --quick --scenarios clean" in report.splitlines()[2]
    assert len(results["claims"]) == 6
    for claim in results["claims"]:
        assert claim["verdict"] in ("reproduced", "not reproduced", "inconclusive")
        assert f'<a id="{claim["id"]}"></a>' in report and f"**Verdict: {claim['verdict']}.**" in report
        png = out / claim["plot"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # results.json is strict JSON (no NaN/Infinity) and every number in it is finite.
    values = list(numbers(results))
    assert values and all(math.isfinite(v) for v in values)
    # Every training step of every run is recorded, and the study's metrics came through the library.
    steps = results["sizes"]["steps"]
    for loss in ("dpo", "spo"):
        run = results["runs"]["clean"][loss]
        assert run["train_steps"] == list(range(1, steps + 1))
        for name in ("study/h", "study/abs_grad_h", "study/logps_chosen", "study/logps_chosen_per_token", "grad_norm"):
            assert len(run["train"][name]) == steps and None not in run["train"][name], name
        assert "study/kl_k3_chosen" in run["eval"] and "study/h_positive" in run["eval"]
        # The histogram of |dL/dh| over pairs sums to 1 at every step.
        bins = [run["train"][k] for k in run["train"] if k.startswith("study/grad_h_bin")]
        assert all(abs(sum(b[i] for b in bins) - 1.0) < 1e-4 for i in range(steps))
    # The SFT prep trains on the demo's own data: its greedy exact match is measured.
    assert len(results["prep"]["sft"]["eval"]["exact_match"]) == 2
    # One progress line per run (prep/sft, clean/dpo, clean/spo), each with an ETA.
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 3 and all(" eta " in line for line in progress)


def test_spo_margin_settles_dpo_grows(study):
    _, _, results = study
    assert spo_settles_while_dpo_grows(results)
    # At step 0 the policy is the reference: the margin starts at 0 for both.
    for loss in ("dpo", "spo"):
        assert results["runs"]["clean"][loss]["eval"]["study/h"][0] == 0.0


def test_negative_control_spo_target_out_of_reach(study, tmp_path):
    """The same assertion with SPO's target moved out of reach (beta*h = 1000): it fails. Starts
    from the first study's SFT checkpoint (--load), so no prep is repeated."""
    first, _, first_results = study
    run_study(tmp_path, "--losses", "spo", "--loss-args", "spo:--spo-target-margin 1000",
              "--", "--load", str(first / "prep" / "sft"))
    control = json.loads((tmp_path / "results.json").read_text())
    control["runs"]["clean"]["dpo"] = first_results["runs"]["clean"]["dpo"]
    assert not spo_settles_while_dpo_grows(control)


# --- megatron_pref.study_metrics: closed forms (no training) ------------------------------------

@pytest.fixture
def study_on():
    from megatron_pref import study_metrics

    study_metrics.enable()
    yield
    study_metrics.enable(False)


def _stats(torch):
    from megatron_pref.losses import PairStats

    return PairStats(chosen_logps=torch.tensor([-2.0, -5.0, -1.0]), rejected_logps=torch.tensor([-3.0, -4.0, -9.5]),
                     chosen_lengths=torch.tensor([2.0, 4.0, 1.0]), rejected_lengths=torch.tensor([2.0, 3.0, 5.0]),
                     ref_chosen_logps=torch.tensor([-2.5, -4.0, -1.5]), ref_rejected_logps=torch.tensor([-2.5, -4.5, -3.0]),
                     rejected_token_logps=torch.tensor([-1.0, -2.0, -12.0, -0.5, -20.0, -1.0, -1.0, -1.0, -1.0, -1.0]))


@pytest.mark.parametrize("loss", ["dpo", "spo"])
def test_gradient_weight_closed_form(study_on, loss):
    """|dL/dh| per pair: DPO's beta*sigmoid(-beta*h); SPO's beta/target*(z-1)e^-z, signed."""
    import torch

    from megatron_pref.losses import LossConfig, compute_loss

    config = LossConfig(beta=0.5, spo_target_margin=0.8)
    stats = _stats(torch)
    metrics = compute_loss(loss, stats, config).metrics
    h = (stats.chosen_logps - stats.ref_chosen_logps) - (stats.rejected_logps - stats.ref_rejected_logps)
    if loss == "dpo":
        expected = -0.5 * torch.sigmoid(-0.5 * h)
    else:
        z = 0.5 * h / 0.8
        expected = 0.5 / 0.8 * (z - 1) * torch.exp(-z)
    torch.testing.assert_close(metrics["study/grad_h_signed"], expected)
    torch.testing.assert_close(metrics["study/abs_grad_h"], expected.abs())
    torch.testing.assert_close(metrics["study/h"], h)
    torch.testing.assert_close(metrics["study/logps_chosen_per_token"], torch.tensor([-1.0, -1.25, -1.0]))
    # 2 of the 10 rejected tokens are below log(1e-4) = -9.21: pair-averaged counts 2/3 and 10/3.
    torch.testing.assert_close(metrics["study/rejected_tokens_collapsed"] / metrics["study/rejected_tokens"],
                               torch.full((3,), 0.2))
    bins = torch.stack([metrics[f"study/grad_h_bin{k}"] for k in range(8)])
    torch.testing.assert_close(bins.sum(0), torch.ones(3))
    if loss == "dpo":  # pair 2 (h = 7): weight 0.5*sigmoid(-3.5) = 0.0146, log10 -1.84: bin 5 = [-2, -1)
        assert bins[:, 2].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]


def test_study_metrics_are_opt_in():
    """Control: off (the default) no study/* metric is computed, and reference-free losses stay so."""
    import torch

    from megatron_pref import study_metrics
    from megatron_pref.losses import LossConfig, compute_loss, requires_reference

    assert not study_metrics.enabled()
    assert not any(k.startswith("study/") for k in compute_loss("dpo", _stats(torch), LossConfig()).metrics)
    assert not requires_reference("simpo")
    study_metrics.enable()
    try:
        assert requires_reference("simpo")
        assert "study/h" in compute_loss("simpo", _stats(torch), LossConfig()).metrics
    finally:
        study_metrics.enable(False)
