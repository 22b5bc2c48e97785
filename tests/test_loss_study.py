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
# A small SPO target (beta*h = 0.25 with the study's beta 0.5: h = 0.5 nats), reachable in --quick's steps.
SMALL_TARGET = "spo:--spo-target-margin 0.25"

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
        for name in ("study/h", "study/abs_grad_h", "study/logps_chosen_per_token", "grad_norm", "logps/chosen"):
            assert len(run["train"][name]) == steps and None not in run["train"][name], name
        assert "study/kl_k3_chosen" in run["eval"] and "exact_match" in run["eval"]
        # The histogram of |dL/dh| over pairs sums to 1 at every step.
        bins = [run["train"][k] for k in run["train"] if k.startswith("study/grad_h_bin")]
        assert all(abs(sum(b[i] for b in bins) - 1.0) < 1e-4 for i in range(steps))
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
