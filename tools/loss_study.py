#!/usr/bin/env python
"""Train several preference losses side by side and test the claims made for them.

    python tools/loss_study.py --losses dpo,spo,slime,ipo,simpo [--out runs/study] [--quick]

Every loss trains with everything else the same (initial weights, reference, data, order,
steps, optimizer; the learning rate may be set per loss with ``--lr LOSS=VALUE``), through the
project's own training path: each run is ``megatron_pref.training.train`` on a ``RunConfig``
parsed from pretrain_pref.py's flags, with the opt-in ``megatron_pref.study_metrics``
statistics switched on (they ride on the loss's own per-pair metrics and the JSONL metrics
file; nothing of the loop is copied here).

On the bundled demo (the default, CPU) the tool first makes the shared starting points:
``prep/sft`` (an SFT'd policy: the reference and start of every run) and ``prep/confident``
(DPO continued from it until the rejected answers are unlikely, for the "confident"
scenario). Scenarios: clean, noisy (a share of training pairs swapped; clean held-out pairs),
confident (start from prep/confident, reference prep/sft), scored (pairs with graded scores;
SPO uses ``--spo-target-from-scores``). Flags after ``--`` go to every training run, e.g. a real
model under torchrun:

    torchrun --nproc-per-node 8 tools/loss_study.py --losses dpo,spo --scenarios clean,noisy \\
        --out runs/study -- --load ckpt/llama3 --data-path data/train.jsonl \\
        --valid-data-path data/valid.jsonl --tensor-model-parallel-size 2 --bf16

(with ``--load`` no SFT prep is made: the loaded model is the start and the reference).

Writes ``<out>/report.md`` (one section per claim: plot, deciding number, verdict),
``<out>/results.json`` (every series), one PNG per claim, and each run's metrics.jsonl and log
under ``<out>/runs/``. docs/loss_study.md explains how to read them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def portable(argv: list) -> list:
    """``argv`` with the package's bundled files named relative to the repository, so that the
    reproduce commands hold on any checkout (they are recorded as absolute paths)."""
    marker = "/megatron_pref/assets/"
    return [("megatron_pref/assets/" + a.split(marker, 1)[1]) if os.path.isabs(a) and marker in a else a
            for a in argv]
sys.path.insert(0, str(ROOT))  # the library next to this tool, not another install

LOSSES = ("dpo", "spo", "slime", "ipo", "simpo")
SCENARIOS = ("clean", "noisy", "confident", "scored")
# Losses that optimise the preference margin alone (no term on the chosen likelihood): the
# ones SLIME's claims are measured against.
MARGIN_ONLY = ("dpo", "ipo", "simpo")
# Per-loss flags of the study (stated in the report). beta 1 for the reference-based losses, so
# that SPO's target (beta*h = 1) is h = 1 nat, within reach of the study's steps; SimPO's beta
# as its paper (~2).
LOSS_FLAGS = {"dpo": ["--beta", "1.0"], "spo": ["--beta", "1.0"], "ipo": ["--beta", "1.0"], "simpo": ["--beta", "2.0"]}
DEFAULT_LR = 3e-4
SIZES = {  # training steps per run, evaluation interval, the prep runs' steps, demo training pairs
    "full": dict(steps=100, eval_interval=25, sft_steps=150, confident_steps=100, train_pairs=320),
    "quick": dict(steps=24, eval_interval=8, sft_steps=30, confident_steps=16, train_pairs=160),
}
# In the scored scenario only SPO reads the scores: every other loss would repeat its clean
# run bit for bit (same pairs, same order), so only SPO is run there.
SCORED_LOSSES = ("spo",)
# Graded scores for the scored scenario: how wrong the rejected answer is (score_chosen = 1).
SCORED_REJECTED = {"off_by_one": 0.7, "carry": 0.4, "digit_swap": 0.1}
# Flags the study sets itself on every run.
CONTROLLED = ("--loss", "--train-iters", "--train-epochs", "--lr", "--save", "--metrics-file", "--finetune",
              "--eval-interval", "--log-interval", "--ref-cache-dir", "--ref-load", "--sft-weight")
COLLAPSE_PROB = 1e-4


class StudyError(Exception):
    """Bad input to the study: one line ``error: ...``."""


# ----------------------------------------------------------------------------------------- #
# Command line
# ----------------------------------------------------------------------------------------- #
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="loss_study.py [options] [-- training flags]")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated losses (default: %(default)s)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated (default: %(default)s)")
    p.add_argument("--out", default="runs/study", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a few steps per run (smoke test, CI)")
    p.add_argument("--steps", type=int, help="training steps per run (default: 100, --quick 16)")
    p.add_argument("--eval-interval", type=int, help="held-out evaluation every N steps (default: steps/4)")
    p.add_argument("--lr", action="append", default=[], metavar="LOSS=LR",
                   help=f"learning rate of one loss (default {DEFAULT_LR:g} for every loss)")
    p.add_argument("--loss-args", action="append", default=[], metavar="LOSS:FLAGS",
                   help="extra training flags for one loss, e.g. 'spo:--spo-target-margin 2'")
    p.add_argument("--swap-fraction", type=float, default=0.25, help="noisy scenario: share of swapped pairs")
    p.add_argument("--train-pairs", type=int,
                   help="demo: train the preference runs on the first N training pairs, seen several times "
                        "(default 320, --quick 160; 0: all 4000)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="train nothing: judge the claims and write the report and plots again from a results.json "
                        "this tool wrote (e.g. after a change of the rules), into --out")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: flags for every training run")
    args = p.parse_args(argv)
    args.losses = [x for x in args.losses.split(",") if x]
    args.scenarios = [x for x in args.scenarios.split(",") if x]
    args.train_flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    return args


def check_args(args) -> dict:
    """Every bad input as one StudyError, before any work. Returns the study's sizes."""
    from megatron_pref.losses import LOSSES as ALL_LOSSES

    if not args.losses:
        raise StudyError("--losses: give at least one loss")
    for name in args.losses:
        if name not in ALL_LOSSES or "," in name:
            raise StudyError(f"--losses: unknown loss {name!r} (e.g. {','.join(LOSSES)})")
    if len(set(args.losses)) != len(args.losses):
        raise StudyError("--losses: a loss is named twice")
    for name in args.scenarios:
        if name not in SCENARIOS:
            raise StudyError(f"--scenarios: unknown scenario {name!r} (one of {','.join(SCENARIOS)})")
    if not args.scenarios:
        raise StudyError("--scenarios: give at least one scenario")
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.steps is not None:
        if args.steps < 2:
            raise StudyError(f"--steps must be >= 2, got {args.steps}")
        sizes["steps"] = args.steps
    if args.eval_interval is not None:
        sizes["eval_interval"] = args.eval_interval
    elif args.steps is not None:
        sizes["eval_interval"] = max(1, args.steps // 4)
    if sizes["eval_interval"] < 1:
        raise StudyError(f"--eval-interval must be >= 1, got {args.eval_interval}")
    if args.train_pairs is not None:
        if args.train_pairs < 0:
            raise StudyError(f"--train-pairs must be >= 0, got {args.train_pairs}")
        sizes["train_pairs"] = args.train_pairs
    if not 0 < args.swap_fraction <= 1:
        raise StudyError(f"--swap-fraction must be in (0, 1], got {args.swap_fraction}")
    args.lr_of = {}
    for item in args.lr:
        loss, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            raise StudyError(f"--lr {item}: expected LOSS=NUMBER") from None
        if loss not in args.losses or not (math.isfinite(lr) and lr > 0):
            raise StudyError(f"--lr {item}: expected LOSS=NUMBER with a loss of --losses and a number > 0")
        args.lr_of[loss] = lr
    args.extra_of = {}
    for item in args.loss_args:
        loss, sep, flags = item.partition(":")
        if not sep or loss not in args.losses:
            raise StudyError(f"--loss-args {item}: expected LOSS:FLAGS with a loss of --losses")
        args.extra_of[loss] = args.extra_of.get(loss, []) + shlex.split(flags)
    for flags, where in [(args.train_flags, "training flags")] + [(f, f"--loss-args {k}") for k, f in args.extra_of.items()]:
        for flag in flags:
            if flag.split("=")[0] in CONTROLLED:
                raise StudyError(f"{where}: {flag.split('=')[0]} is set by the study "
                                 "(use --losses, --steps, --lr, --eval-interval)")
    user = _flag_values(args.train_flags)
    args.user_load = user.get("--load")
    args.user_data = user.get("--data-path")
    if args.user_data is not None and "noisy" in args.scenarios:
        paths = args.user_data if isinstance(args.user_data, list) else [args.user_data]
        if not all(p.endswith(".jsonl") for p in paths):
            raise StudyError("--scenarios noisy with --data-path needs raw .jsonl files (the tool swaps pairs in a copy)")
    if args.user_data is not None and "scored" in args.scenarios and user.get("--valid-data-path") is None:
        pass  # scores are the data's own; pretrain_pref's check names a split without them
    if args.user_data is None and args.user_load is None and any(
            f in args.train_flags for f in ("--tokenizer-model", "--valid-data-path")):
        raise StudyError("--tokenizer-model/--valid-data-path without --data-path: the demo brings its own")
    return sizes


def _flag_values(flags) -> dict:
    """``--name value...`` of a flag list (values up to the next flag)."""
    values, name = {}, None
    for token in flags:
        if token.startswith("--"):
            name, _, value = token.partition("=")
            values[name] = value if value else None
            if value:
                name = None
        elif name is not None:
            previous = values[name]
            values[name] = token if previous is None else (previous if isinstance(previous, list) else [previous]) + [token]
    return values


def is_report_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------------------- #
# Scenario data
# ----------------------------------------------------------------------------------------- #
def _write_jsonl(path: Path, rows) -> None:
    from megatron_pref.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def scenario_data_flags(args, scenario: str, data_dir: Path, train_pairs: int) -> list:
    """The data flags of one scenario (files written under ``data_dir``, the same on every rank)."""
    from megatron_pref.data import demo_task

    if args.user_data is None:
        demo = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", demo_task.demo_tokenizer_path()]
        if scenario in ("clean", "confident") and not train_pairs:
            return []  # the bundled demo itself (with its greedy exact match)
        train = demo_task.load_demo_rows("train")
        train = train[:train_pairs] if train_pairs else train
        valid = demo_task.load_demo_rows("valid")
        if scenario in ("clean", "confident"):
            _write_jsonl(data_dir / "train.jsonl", train)
            return ["--data-path", str(data_dir / "train.jsonl"), "--valid-data-path", demo_task.demo_data_path("valid")] + demo
        if scenario == "noisy":
            _write_jsonl(data_dir / "noisy_train.jsonl", swap_pairs(train, args.swap_fraction, args.seed))
            return ["--data-path", str(data_dir / "noisy_train.jsonl"),
                    "--valid-data-path", demo_task.demo_data_path("valid")] + demo
        _write_jsonl(data_dir / "scored_train.jsonl", graded_scores(train))
        _write_jsonl(data_dir / "scored_valid.jsonl", graded_scores(valid))
        return ["--data-path", str(data_dir / "scored_train.jsonl"),
                "--valid-data-path", str(data_dir / "scored_valid.jsonl")] + demo
    if scenario != "noisy":
        return []  # the user's flags carry the data
    paths = args.user_data if isinstance(args.user_data, list) else [args.user_data]
    copies = []
    for i, path in enumerate(paths):
        copy = data_dir / f"noisy_{i}_{Path(path).name}"
        _write_jsonl(copy, swap_pairs(_read_jsonl(path), args.swap_fraction, args.seed + i))
        copies.append(str(copy))
    return ["--data-path", *copies]


def swap_pairs(rows: list, fraction: float, seed: int) -> list:
    """A copy with ``fraction`` of the pairs (chosen by ``seed``) having chosen and rejected swapped."""
    rng = random.Random(seed)
    swapped = set(rng.sample(range(len(rows)), round(fraction * len(rows))))
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i in swapped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            if "score_chosen" in row and "score_rejected" in row:
                row["score_chosen"], row["score_rejected"] = row["score_rejected"], row["score_chosen"]
        out.append(row)
    return out


def graded_scores(rows: list) -> list:
    return [dict(r, score_chosen=1.0, score_rejected=SCORED_REJECTED[r["kind"]]) for r in rows]


# ----------------------------------------------------------------------------------------- #
# Runs
# ----------------------------------------------------------------------------------------- #
class RunLog:
    """The library's console lines of one run go to its train.log, not the terminal."""

    def __init__(self, path: Path):
        import logging

        self.logger = logging.getLogger("megatron_pref")
        self.handler = logging.FileHandler(path, mode="w")
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def __enter__(self):
        self.previous = self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.handler.close()
        self.logger.propagate = self.previous


def train_once(argv: list, run_dir: Path, study: bool) -> tuple:
    """One training run through the library's own path (``study``: with the study's metrics).
    Returns (wall time, why it stopped early or None): a non-finite loss ends the run, not the study."""
    from megatron_pref import parallel, study_metrics
    from megatron_pref.arguments import parse_run_config
    from megatron_pref.engine import NonFiniteLoss
    from megatron_pref.training import train

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # the logger appends
    start, stopped = time.time(), None
    study_metrics.enable(study)
    rank = os.environ.get("RANK", "0")
    with RunLog(run_dir / ("train.log" if rank == "0" else f"train.rank{rank}.log")):
        try:
            train(parse_run_config(argv + ["--metrics-file", str(metrics)]))
        except NonFiniteLoss as exc:
            stopped = f"stopped: {exc}"
        finally:
            study_metrics.enable(False)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Under torchrun the process group stays for the next run (a new one would wait for
                # torchrun's store forever); train() sets up megatron-core's groups again.
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            else:
                parallel.destroy()
    return time.time() - start, stopped


def read_metrics(path: Path) -> dict:
    """metrics.jsonl -> {"train": {name: [..]}, "train_steps": [..], "eval": {...}, "eval_steps": [..]}."""
    train, evals, train_steps, eval_steps = {}, {}, [], []
    for row in _read_jsonl(path):
        step = row.pop("iteration")
        row.pop("time", None)
        is_eval = any(k.startswith("eval/") for k in row)
        target, steps = (evals, eval_steps) if is_eval else (train, train_steps)
        steps.append(step)
        for name, value in row.items():
            name = name.removeprefix("eval/")
            target.setdefault(name, [None] * (len(steps) - 1)).append(_finite(value))
        for series in target.values():
            if len(series) < len(steps):
                series.append(None)
    return {"train_steps": train_steps, "train": train, "eval_steps": eval_steps, "eval": evals}


def _finite(value):
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(f"{value:.6g}")
    return None  # non-finite or missing: counted in the report


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def run_study(args, sizes: dict, out: Path) -> dict:
    steps, eval_interval = sizes["steps"], sizes["eval_interval"]
    common = list(args.train_flags) + ["--seed", str(args.seed), "--log-interval", "1", "--no-progress-bar",
                                       "--lr-decay-style", "constant", "--lr-warmup-iters", "0"]
    prep_dir, runs_dir = out / "prep", out / "runs"
    plan = [(s, loss) for s in args.scenarios for loss in args.losses if s != "scored" or loss in SCORED_LOSSES]
    prep = []
    if args.user_load is None:
        prep.append(("sft", ["--loss", "sft", "--train-iters", str(sizes["sft_steps"]), "--lr", "2e-3",
                             "--lr-decay-style", "cosine", "--lr-warmup-iters", "20", "--sft-weight", "0",
                             "--save", str(prep_dir / "sft"), "--eval-interval", str(sizes["sft_steps"])]))
    start_load = args.user_load or str(prep_dir / "sft")
    if "confident" in args.scenarios:
        prep.append(("confident", scenario_data_flags(args, "confident", out / "data", sizes["train_pairs"]) + [
                                   "--loss", "dpo", "--train-iters", str(sizes["confident_steps"]), "--lr", "1e-3",
                                   "--load", start_load, "--finetune", "--sft-weight", "0", "--beta", "1.0",
                                   "--ref-cache-dir", str(out / "ref_cache" / "prep"),
                                   "--save", str(prep_dir / "confident"),
                                   "--eval-interval", str(sizes["confident_steps"])]))
    results = {"sizes": sizes, "prep": {}, "runs": {}, "commands": {}}
    total = len(plan) + len(prep)
    done, spent, began = 0, 0.0, time.time()

    def progress(label: str, seconds: float, note: str) -> None:
        nonlocal done, spent
        done += 1
        spent += seconds
        eta = (total - done) * spent / done
        if is_report_rank():
            print(f"[{done:>2}/{total}] {label:<18} {seconds:6.1f} s  {note}  | elapsed {_duration(time.time() - began)}"
                  f" eta {_duration(eta)}", flush=True)

    for name, flags in prep:
        # prep runs drop the user's --load (they pass their own); a user --load means no SFT prep
        base = [f for f in common]
        if args.user_load is not None:
            base = _without_flag(base, "--load")
        argv = base + flags
        results["commands"][f"prep/{name}"] = portable(argv)
        seconds, stopped = train_once(argv, prep_dir / f"{name}_run", study=False)
        if stopped:
            raise StudyError(f"prep/{name} {stopped}")
        summary = read_metrics(prep_dir / f"{name}_run" / "metrics.jsonl")
        results["prep"][name] = {"seconds": round(seconds, 1), **summary}
        ev = summary["eval"]
        note = ""
        if ev.get("exact_match"):
            note = f"exact match {ev['exact_match'][0]} -> {ev['exact_match'][-1]}"
        progress(f"prep/{name}", seconds, note)

    for scenario, loss in plan:
        data_flags = scenario_data_flags(args, scenario, out / "data", sizes["train_pairs"])
        lr = args.lr_of.get(loss, DEFAULT_LR)
        base = _without_flag(list(common), "--load")
        flags = ["--loss", loss, "--train-iters", str(steps), "--lr", f"{lr:g}", "--sft-weight", "0",
                 "--eval-interval", str(eval_interval), "--finetune",
                 "--ref-cache-dir", str(out / "ref_cache" / scenario)]
        if scenario == "confident":
            flags += ["--load", str(prep_dir / "confident"), "--ref-load", start_load]
        else:
            flags += ["--load", start_load]
        if scenario == "scored" and loss == "spo":
            flags.append("--spo-target-from-scores")
        flags += LOSS_FLAGS.get(loss, []) + args.extra_of.get(loss, [])
        argv = base + data_flags + flags
        results["commands"][f"{scenario}/{loss}"] = portable(argv)
        run_dir = runs_dir / scenario / loss
        seconds, stopped = train_once(argv, run_dir, study=True)
        summary = read_metrics(run_dir / "metrics.jsonl")
        summary["seconds"] = round(seconds, 1)
        summary["stopped"] = stopped
        summary["lr"] = lr
        summary["beta"] = _beta(argv)
        results["runs"].setdefault(scenario, {})[loss] = summary
        acc = summary["eval"].get("study/h_positive") or [None]
        progress(f"{scenario}/{loss}", seconds, stopped or f"held-out accuracy {acc[0]} -> {acc[-1]}")
    return results


def _without_flag(flags: list, name: str) -> list:
    out, skip = [], False
    for token in flags:
        if skip and not token.startswith("--"):
            continue
        skip = False
        if token == name:
            skip = True
            continue
        if token.startswith(name + "="):
            continue
        out.append(token)
    return out


def _beta(argv: list) -> float:
    from megatron_pref.losses import LossConfig

    value = LossConfig().beta
    for i, token in enumerate(argv[:-1]):
        if token == "--beta":
            value = float(argv[i + 1])
    return value


# ----------------------------------------------------------------------------------------- #
# Claims
# ----------------------------------------------------------------------------------------- #
def _series(results, scenario, loss, name, split="train"):
    run = results["runs"].get(scenario, {}).get(loss)
    if run is None or name not in run[split]:
        return None
    steps = run[f"{split}_steps"]
    pairs = [(s, v) for s, v in zip(steps, run[split][name]) if v is not None]
    return pairs or None


def _tail_mean(pairs, frac=0.1):
    k = max(3, int(len(pairs) * frac))
    values = [v for _, v in pairs[-k:]]
    return sum(values) / len(values)


def _head_mean(pairs, frac=0.1):
    k = max(3, int(len(pairs) * frac))
    values = [v for _, v in pairs[:k]]
    return sum(values) / len(values)


def _last(pairs):
    return pairs[-1][1]


def _missing(what: str) -> dict:
    return dict(verdict="inconclusive", reason=f"not measured: needs {what}", numbers={})


def claim_spo_finite_margin(results) -> dict:
    spo = _series(results, "clean", "spo", "spo/z")
    if spo is None:
        return _missing("the clean scenario with spo")
    z = _tail_mean(spo)
    h_spo = _series(results, "clean", "spo", "study/h")
    numbers = {"spo_final_mean_z": z}
    beta_spo = results["runs"]["clean"]["spo"]["beta"]
    numbers["spo_final_beta_h"] = beta_spo * _tail_mean(h_spo)
    dpo = _series(results, "clean", "dpo", "study/h")
    if dpo is not None:
        numbers["dpo_final_beta_h"] = results["runs"]["clean"]["dpo"]["beta"] * _tail_mean(dpo)
        half = dpo[len(dpo) // 2:]
        numbers["dpo_beta_h_growth_second_half"] = results["runs"]["clean"]["dpo"]["beta"] * (
            _tail_mean(half) - _head_mean(half))
    scored = _series(results, "scored", "spo", "spo/z")
    if scored is not None:
        numbers["scored_spo_final_mean_z"] = _tail_mean(scored)
    numbers["decides"] = "spo_final_mean_z"
    if z > 1.5:
        return dict(verdict="not reproduced", numbers=numbers,
                    reason=f"SPO's mean z ended at {z:.2f}: its margin overshot the target (z = 1) by more than 50%")
    if z < 0.5:
        return dict(verdict="inconclusive", numbers=numbers,
                    reason=f"SPO's mean z ended at {z:.2f}: the margin did not reach the target within the steps")
    if dpo is None:
        return dict(verdict="reproduced", numbers=numbers,
                    reason=f"SPO's mean z ended at {z:.2f}, at its target (z = 1); DPO was not run for comparison")
    if numbers["dpo_final_beta_h"] > 1.5 * numbers["spo_final_beta_h"]:
        return dict(verdict="reproduced", numbers=numbers,
                    reason=f"SPO's margin settled at its target (mean z {z:.2f}, beta*h {numbers['spo_final_beta_h']:.2f}) "
                           f"while DPO's reached beta*h {numbers['dpo_final_beta_h']:.2f}")
    return dict(verdict="inconclusive", numbers=numbers,
                reason=f"SPO's mean z ended at {z:.2f}, but DPO's margin (beta*h {numbers['dpo_final_beta_h']:.2f}) "
                       "did not exceed SPO's within the steps, so boundedness is not distinguished from slow growth")


def claim_spo_vanishing_gradients(results) -> dict:
    """At step 1 of the confident scenario both losses see the same policy on the same pairs
    (the forward before the first update): their dL/dh are compared on identical margins."""
    spo = _series(results, "confident", "spo", "study/abs_grad_h")
    dpo = _series(results, "confident", "dpo", "study/abs_grad_h")
    if spo is None or dpo is None:
        return _missing("the confident scenario with spo and dpo")
    z0 = _series(results, "confident", "spo", "spo/z")[0][1]
    numbers = {"step1_spo_mean_abs_grad_h": spo[0][1], "step1_dpo_mean_abs_grad_h": dpo[0][1],
               "step1_spo_mean_z": z0, "step1_dpo_beta_h": results["runs"]["confident"]["dpo"]["beta"]
               * _series(results, "confident", "dpo", "study/h")[0][1]}
    for loss in ("spo", "dpo"):
        signed = _series(results, "confident", loss, "study/grad_h_signed")
        if signed is not None:
            numbers[f"step1_{loss}_mean_signed_grad_h"] = signed[0][1]
        vanished = _vanished_share(results, "confident", loss)
        if vanished is not None:
            numbers[f"step1_{loss}_share_abs_grad_h_below_1e-3"] = vanished[0][1]
        numbers[f"all_steps_{loss}_mean_abs_grad_h"] = _mean_values(spo if loss == "spo" else dpo)
    ratio = numbers["step1_spo_mean_abs_grad_h"] / max(numbers["step1_dpo_mean_abs_grad_h"], 1e-30)
    numbers["spo_over_dpo_abs_grad_h"] = ratio
    numbers["decides"] = "spo_over_dpo_abs_grad_h"
    if z0 <= 1.0:
        return dict(verdict="inconclusive", numbers=numbers,
                    reason=f"the confident start is not past SPO's target (step-1 mean z {z0:.2f} <= 1)")
    if ratio < 1.0:
        return dict(verdict="reproduced", numbers=numbers,
                    reason=f"on the same confidently ranked pairs (step 1, mean z {z0:.2f}) SPO's mean |dL/dh| is "
                           f"{ratio:.2g}x DPO's")
    return dict(verdict="not reproduced", numbers=numbers,
                reason=f"on the same confidently ranked pairs (step 1, mean z {z0:.2f}) SPO's mean |dL/dh| is "
                       f"{ratio:.2g}x DPO's: SPO's (z-1)e^-z vanishes only at the target, pulls margins past it back, "
                       "and grows exponentially on the pairs still inverted (see the signed means and the shares)")


def _mean_values(pairs):
    return sum(v for _, v in pairs) / len(pairs)


def claim_spo_stability(results) -> dict:
    spo_kl = _series(results, "confident", "spo", "study/kl_k3_chosen", "eval")
    dpo_kl = _series(results, "confident", "dpo", "study/kl_k3_chosen", "eval")
    if spo_kl is None or dpo_kl is None:
        return _missing("the confident scenario with spo and dpo")
    numbers = {"confident_spo_heldout_kl": _last(spo_kl), "confident_dpo_heldout_kl": _last(dpo_kl)}
    for loss in ("spo", "dpo"):
        collapsed = _collapse_share(results, "confident", loss, "eval")
        if collapsed is not None:
            numbers[f"confident_{loss}_rejected_collapsed_share"] = _last(collapsed)
        gn = _series(results, "clean", loss, "grad_norm")
        if gn is not None:
            values = [v for _, v in gn]
            mean = sum(values) / len(values)
            numbers[f"clean_{loss}_grad_norm_cv"] = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 / max(mean, 1e-30)
        peaks = [v for sc in ("clean", "confident", "noisy") for _, v in (_series(results, sc, loss, "grad_norm") or [])]
        if peaks:
            numbers[f"{loss}_max_grad_norm"] = max(peaks)
        acc = _series(results, "noisy", loss, "study/h_positive", "eval")
        if acc is not None:
            numbers[f"noisy_{loss}_heldout_accuracy"] = _last(acc)
    ratio = numbers["confident_spo_heldout_kl"] / max(numbers["confident_dpo_heldout_kl"], 1e-30)
    numbers["spo_over_dpo_heldout_kl"] = ratio
    # Stabler: the largest gradient norm (before clipping) over the scenarios, SPO's against DPO's.
    peak = numbers.get("spo_max_grad_norm", 0.0) / max(numbers.get("dpo_max_grad_norm", 0.0), 1e-30)
    numbers["spo_over_dpo_max_grad_norm"] = peak
    less_hacking, stabler = ratio < 1.0, peak <= 2.0
    hacking = f"SPO's held-out KL estimate from the confident policy is {ratio:.2g}x DPO's"
    spikes = f"SPO's largest gradient norm is {peak:.3g}x DPO's ({numbers.get('spo_max_grad_norm', 0):.3g})"
    if less_hacking and stabler:
        numbers["decides"] = "spo_over_dpo_heldout_kl"
        return dict(verdict="reproduced", numbers=numbers, reason=f"less reward hacking: {hacking}; stabler: {spikes}")
    numbers["decides"] = "spo_over_dpo_max_grad_norm" if less_hacking else "spo_over_dpo_heldout_kl"
    why = "" if stabler else "; SPO's per-pair weight grows exponentially on inverted pairs (z < 0), see the |dL/dh| plot"
    return dict(verdict="not reproduced", numbers=numbers,
                reason=f"less reward hacking {'holds' if less_hacking else 'does not hold'} ({hacking}); "
                       f"stabler {'holds' if stabler else 'does not'} ({spikes}{why})")


def _collapse_share(results, scenario, loss, split="eval"):
    below = _series(results, scenario, loss, "study/rejected_tokens_collapsed", split)
    total = _series(results, scenario, loss, "study/rejected_tokens", split)
    if below is None or total is None:
        return None
    return [(s, b / t if t else 0.0) for (s, b), (_, t) in zip(below, total)]


def claim_slime_unlearning(results) -> dict:
    if _series(results, "clean", "slime", "study/logps_chosen_per_token", "eval") is None:
        return _missing("the clean scenario with slime")
    deltas = {}
    for loss in results["runs"].get("clean", {}):
        s = _series(results, "clean", loss, "study/logps_chosen_per_token", "eval")
        if s is not None:
            deltas[loss] = s[-1][1] - s[0][1]
    numbers = {f"{loss}_delta_chosen_logp_per_token": d for loss, d in deltas.items()}
    margin_only = {k: v for k, v in deltas.items() if k in MARGIN_ONLY}
    numbers["decides"] = "slime_delta_chosen_logp_per_token"
    if not margin_only:
        return dict(verdict="inconclusive", numbers=numbers, reason="no margin-only loss (dpo, ipo, simpo) was run")
    worst = min(margin_only, key=margin_only.get)
    if margin_only[worst] >= -0.01:
        return dict(verdict="inconclusive", numbers=numbers,
                    reason=f"no margin-only loss unlearned (the largest fall of the held-out chosen per-token log-prob is "
                           f"{margin_only[worst]:+.3f}, under {worst}): the premise did not occur")
    if deltas["slime"] >= -0.01 or deltas["slime"] > margin_only[worst] / 2:
        return dict(verdict="reproduced", numbers=numbers,
                    reason=f"{worst} lowered the held-out chosen per-token log-prob by {margin_only[worst]:+.3f}; "
                           f"SLIME changed it by {deltas['slime']:+.3f}")
    return dict(verdict="not reproduced", numbers=numbers,
                reason=f"SLIME lowered the held-out chosen per-token log-prob by {deltas['slime']:+.3f}, "
                       f"as much as {worst} ({margin_only[worst]:+.3f})")


def claim_slime_collapse(results) -> dict:
    scenario = "confident" if "confident" in results["runs"] else "clean"
    if _collapse_share(results, scenario, "slime") is None:
        return _missing("slime in the confident (or clean) scenario")
    shares, matches = {}, {}
    for loss in results["runs"].get(scenario, {}):
        c = _collapse_share(results, scenario, loss)
        if c is not None:
            shares[loss] = _last(c)
        em = _series(results, scenario, loss, "exact_match", "eval")
        if em is not None:
            matches[loss] = _last(em)
    numbers = {f"{scenario}_{loss}_rejected_collapsed_share": v for loss, v in shares.items()}
    numbers.update({f"{scenario}_{loss}_exact_match": v for loss, v in matches.items()})
    numbers["decides"] = f"{scenario}_slime_rejected_collapsed_share"
    margin_only = {k: v for k, v in shares.items() if k in MARGIN_ONLY}
    if not margin_only:
        return dict(verdict="inconclusive", numbers=numbers, reason="no margin-only loss (dpo, ipo, simpo) was run")
    worst = max(margin_only, key=margin_only.get)
    if margin_only[worst] < 0.05:
        return dict(verdict="inconclusive", numbers=numbers,
                    reason=f"no margin-only loss collapsed rejected tokens (largest share below p={COLLAPSE_PROB:g}: "
                           f"{margin_only[worst]:.3f}, {worst}): the premise did not occur")
    if shares["slime"] < margin_only[worst] / 2:
        return dict(verdict="reproduced", numbers=numbers,
                    reason=f"{shares['slime']:.3f} of SLIME's held-out rejected tokens have p < {COLLAPSE_PROB:g}, "
                           f"against {margin_only[worst]:.3f} under {worst}")
    return dict(verdict="not reproduced", numbers=numbers,
                reason=f"SLIME's held-out rejected tokens collapse as much ({shares['slime']:.3f} below "
                       f"p={COLLAPSE_PROB:g}) as {worst}'s ({margin_only[worst]:.3f})")


def claim_dpo_displacement(results) -> dict:
    chosen = _series(results, "clean", "dpo", "study/logps_chosen")
    if chosen is None:
        return _missing("the clean scenario with dpo")
    rejected = _series(results, "clean", "dpo", "study/logps_rejected")
    margin = _series(results, "clean", "dpo", "study/h")
    numbers = {"dpo_delta_logp_chosen": _tail_mean(chosen) - _head_mean(chosen),
               "dpo_delta_logp_rejected": _tail_mean(rejected) - _head_mean(rejected),
               "dpo_delta_h": _tail_mean(margin) - _head_mean(margin), "decides": "dpo_delta_logp_chosen"}
    for loss in results["runs"].get("clean", {}):
        if loss != "dpo":
            c = _series(results, "clean", loss, "study/logps_chosen")
            numbers[f"{loss}_delta_logp_chosen"] = _tail_mean(c) - _head_mean(c)
    dc, dr, dh = numbers["dpo_delta_logp_chosen"], numbers["dpo_delta_logp_rejected"], numbers["dpo_delta_h"]
    if dh <= 0:
        return dict(verdict="inconclusive", numbers=numbers, reason=f"DPO's margin did not grow (change of h {dh:+.3f})")
    if dc < 0 and dr < 0:
        return dict(verdict="reproduced", numbers=numbers,
                    reason=f"the margin grew by {dh:+.2f} nats while the chosen log-prob fell by {dc:+.2f} "
                           f"and the rejected by {dr:+.2f}")
    return dict(verdict="not reproduced", numbers=numbers,
                reason=f"the margin grew by {dh:+.2f} nats with the chosen log-prob changing by {dc:+.2f} "
                       f"(rejected {dr:+.2f}): the chosen likelihood did not fall")


CLAIMS = [
    ("spo_finite_margin", "SPO targets a finite margin (DPO's is unbounded)", claim_spo_finite_margin),
    ("spo_vanishing_gradients", "SPO's gradients vanish on confidently ranked pairs, DPO's keep pushing",
     claim_spo_vanishing_gradients),
    ("spo_stability", "SPO is stabler and less prone to reward hacking as rejected probabilities approach 0",
     claim_spo_stability),
    ("slime_unlearning", "SLIME prevents unlearning (the chosen likelihood falling under margin-only losses)",
     claim_slime_unlearning),
    ("slime_formatting_collapse", "SLIME prevents formatting collapse (rejected-token probabilities collapsing)",
     claim_slime_collapse),
    ("dpo_likelihood_displacement", "DPO's likelihood displacement: chosen and rejected log-probs both fall "
     "while the margin grows", claim_dpo_displacement),
]


def judge(results) -> list:
    claims = []
    for key, title, fn in CLAIMS:
        verdict = fn(results)
        claims.append(dict(id=key, title=title, plot=f"{key}.png", **verdict))
    return claims


# ----------------------------------------------------------------------------------------- #
# Plots (matplotlib when importable, else a small PIL renderer)
# ----------------------------------------------------------------------------------------- #
COLORS = {"dpo": (31, 119, 180), "spo": (214, 39, 40), "slime": (44, 160, 44), "ipo": (148, 103, 189),
          "simpo": (255, 127, 14)}
_EXTRA_COLORS = [(140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_backend() -> str:
    try:
        import matplotlib  # noqa: F401

        return "matplotlib"
    except ImportError:
        return "PIL (matplotlib is not importable here)"


def _color(label: str, i: int):
    return COLORS.get(label.split(" ")[0], _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def plot_panels(path: Path, title: str, panels: list) -> None:
    """``panels``: [(subtitle, ylabel, {label: [(x, y), ...]}), ...], side by side. A ylabel
    starting with "log10 " plots log10 of the values."""
    panels = [p for p in panels if any(p[2].values())]
    panels = [(t, y, {k: [(a, math.log10(max(b, 1e-12))) for a, b in v] for k, v in series.items()})
              if y.startswith("log10 ") else (t, y, series) for t, y, series in panels]
    if not panels:
        panels = [("no data", "", {})]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(path, title, panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (subtitle, ylabel, series) in zip(axes[0], panels):
        for i, (label, pts) in enumerate(series.items()):
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=label,
                        color=tuple(c / 255 for c in _color(label, i)))
        ax.set_title(subtitle, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_pil(path: Path, title: str, panels: list) -> None:
    from PIL import Image, ImageDraw

    width, height, top = 440, 330, 26
    image = Image.new("RGB", (width * len(panels), height + top), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black")
    for p, (subtitle, ylabel, series) in enumerate(panels):
        x0, y0 = p * width + 62, top + 22
        x1, y1 = (p + 1) * width - 12, top + height - 40
        draw.text((p * width + 62, top + 4), f"{subtitle}  [{ylabel}]", fill="black")
        draw.rectangle([x0, y0, x1, y1], outline="black")
        pts = [pt for s in series.values() for pt in s]
        if not pts:
            continue
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if xmax == xmin:
            xmax = xmin + 1
        if ymax == ymin:
            ymin, ymax = ymin - 0.5, ymax + 0.5
        pad = 0.05 * (ymax - ymin)
        ymin, ymax = ymin - pad, ymax + pad

        def at(x, y):
            return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

        for frac in (0.0, 0.5, 1.0):
            yv = ymin + frac * (ymax - ymin)
            _, yy = at(xmin, yv)
            draw.line([x0 - 4, yy, x0, yy], fill="black")
            label = f"{yv:.3g}"
            draw.text((x0 - 6 - draw.textlength(label), yy - 6), label, fill="black")
            xv = xmin + frac * (xmax - xmin)
            xx, _ = at(xv, ymin)
            draw.line([xx, y1, xx, y1 + 4], fill="black")
            draw.text((xx - 10, y1 + 6), f"{xv:.0f}", fill="black")
        if ymin < 0 < ymax:
            _, yy = at(xmin, 0.0)
            draw.line([x0, yy, x1, yy], fill=(200, 200, 200))
        draw.text(((x0 + x1) / 2 - 10, y1 + 20), "step", fill="black")
        for i, (label, s) in enumerate(series.items()):
            color = _color(label, i)
            if len(s) > 1:
                draw.line([at(x, y) for x, y in s], fill=color, width=2)
            for x, y in s if len(s) <= 12 else []:
                cx, cy = at(x, y)
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
            draw.rectangle([x1 - 120, y0 + 6 + 14 * i, x1 - 108, y0 + 16 + 14 * i], fill=color)
            draw.text((x1 - 104, y0 + 5 + 14 * i), label, fill="black")
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def make_plots(results, out: Path) -> None:
    runs = results["runs"]

    def per_loss(scenario, name, split="train", scale=None, fn=None):
        series = {}
        for loss in runs.get(scenario, {}):
            s = fn(results, scenario, loss) if fn else _series(results, scenario, loss, name, split)
            if s is not None:
                k = runs[scenario][loss]["beta"] if scale == "beta" else 1.0
                series[loss] = [(x, k * y) for x, y in s]
        return series

    plots = {
        "spo_finite_margin": [
            ("clean: beta*h on training pairs", "beta*h", per_loss("clean", "study/h", scale="beta")),
            ("SPO z = beta*h/target (1 = target)", "z",
             {f"spo {sc}": _series(results, sc, "spo", "spo/z") for sc in ("clean", "scored")
              if _series(results, sc, "spo", "spo/z")}),
        ],
        "spo_vanishing_gradients": [
            ("confident: mean |dL/dh| over pairs", "log10 |dL/dh|", per_loss("confident", "study/abs_grad_h")),
            ("confident: share of pairs with |dL/dh| < 1e-3", "share",
             per_loss("confident", None, fn=lambda r, sc, loss: _vanished_share(r, sc, loss))),
            ("confident: global grad norm", "log10 grad norm", per_loss("confident", "grad_norm")),
        ],
        "spo_stability": [
            ("confident: held-out KL estimate (k3)", "KL/token", per_loss("confident", "study/kl_k3_chosen", "eval")),
            ("clean: global grad norm", "log10 grad norm", per_loss("clean", "grad_norm")),
            ("confident: rejected logp/token", "logp/token", per_loss("confident", "study/logps_rejected_per_token")),
            ("noisy: held-out accuracy (h > 0)", "accuracy", per_loss("noisy", "study/h_positive", "eval")),
        ],
        "slime_unlearning": [
            ("clean: held-out chosen logp/token", "logp/token", per_loss("clean", "study/logps_chosen_per_token", "eval")),
            ("clean: training chosen logp/token", "logp/token", per_loss("clean", "study/logps_chosen_per_token")),
        ],
        "slime_formatting_collapse": [
            (f"confident: held-out rejected tokens p < {COLLAPSE_PROB:g}", "share",
             per_loss("confident", None, fn=lambda r, sc, loss: _collapse_share(r, sc, loss))),
            (f"clean: held-out rejected tokens p < {COLLAPSE_PROB:g}", "share",
             per_loss("clean", None, fn=lambda r, sc, loss: _collapse_share(r, sc, loss))),
            ("greedy exact match (demo)", "exact match",
             {**{f"{k} confident": v for k, v in per_loss("confident", "exact_match", "eval").items()},
              **{f"{k} clean": v for k, v in per_loss("clean", "exact_match", "eval").items()}}),
        ],
        "dpo_likelihood_displacement": [
            ("clean: training logps (sequence), chosen", "logp", per_loss("clean", "study/logps_chosen")),
            ("clean: training logps (sequence), rejected", "logp", per_loss("clean", "study/logps_rejected")),
            ("clean: margin h (nats)", "h", per_loss("clean", "study/h")),
        ],
    }
    for key, title, _ in CLAIMS:
        plot_panels(out / f"{key}.png", title, plots[key])


def _vanished_share(results, scenario, loss, threshold_log10=-3.0):
    from megatron_pref.study_metrics import GRAD_LOG10_EDGES, grad_bin_names

    names = grad_bin_names()
    bins = [_series(results, scenario, loss, n) for n in names]
    if any(b is None for b in bins):
        return None
    below = [i for i, edge in enumerate(GRAD_LOG10_EDGES) if edge <= threshold_log10]  # bins ending at <= edge
    return [(bins[0][j][0], sum(bins[i][j][1] for i in below)) for j in range(len(bins[0]))]


# ----------------------------------------------------------------------------------------- #
# Report
# ----------------------------------------------------------------------------------------- #
def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(results) -> list:
    lines = ["| scenario | loss | lr | beta | held-out acc. (h>0) start -> end | exact match | held-out KL (k3) | "
             "held-out chosen logp/token change | rejected tokens p<1e-4 | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, runs in results["runs"].items():
        for loss, run in runs.items():
            ev = run["eval"]

            def first_last(name):
                s = [v for v in ev.get(name, []) if v is not None]
                return (s[0], s[-1]) if s else (None, None)

            a0, a1 = first_last("study/h_positive")
            e0, e1 = first_last("exact_match")
            _, kl = first_last("study/kl_k3_chosen")
            c0, c1 = first_last("study/logps_chosen_per_token")
            collapse = _collapse_share(results, scenario, loss)
            lines.append(f"| {scenario} | {loss} | {run['lr']:g} | {run['beta']:g} | {_fmt(a0)} -> {_fmt(a1)} | "
                         + (f"{_fmt(e0)} -> {_fmt(e1)}" if e0 is not None else "n/a (not the demo's data)")
                         + f" | {_fmt(kl)} | {_fmt(c1 - c0) if c0 is not None else 'n/a'} | "
                         + f"{_fmt(_last(collapse)) if collapse else 'n/a'} | {run['seconds']:.0f} |")
    return lines


def write_report(results, out: Path, command: str) -> None:
    from megatron_pref.atomic import write_text_atomic

    nulls = sum(_count_nulls(run[split]) for runs in results["runs"].values() for run in runs.values()
                for split in ("train", "eval"))
    stopped = [f"{sc}/{loss}: {run['stopped']}" for sc, runs in results["runs"].items() for loss, run in runs.items()
               if run.get("stopped")]
    lines = [
        "# Loss study: the claims of SPO, SLIME and DPO, measured",
        "",
        f"Generated by `{command}` (wall time {results['wall_seconds']:.0f} s; plots: {results['plot_backend']}).",
        "How to read it: [docs/loss_study.md](../loss_study.md) (in the repository). Every series is in `results.json`."
        + (f" Report and plots written again from that results.json by `{results['rewritten_by']}` (no training)."
           if results.get("rewritten_by") else ""),
        "",
        "Setup: every loss starts from the same weights, trains on the same pairs in the same order for "
        f"{results['sizes']['steps']} steps of {results['global_batch']} pairs with Adam (constant learning rate, "
        "no warm-up, gradient clipping 1.0), and is compared with the same reference. "
        + (_demo_setup(results) if results["prep"].get("sft") else "Start and reference: the loaded model. ")
        + "Per-loss settings: the library's defaults (SPO target 1 for beta*h; SLIME's paper "
          "defaults) except "
        + (", ".join(f"{k}: `{' '.join(v)}`" for k, v in LOSS_FLAGS.items() if k in results["losses"]) or "none")
        + (("; extra: " + ", ".join(f"{k}: `{' '.join(v)}`" for k, v in results["loss_args"].items()))
           if results["loss_args"] else "")
        + ". Learning rates: " + ", ".join(f"{k} {v:g}" for k, v in results["lr"].items()) + ".",
        "",
        "Verdicts are decided by the rules in tools/loss_study.py (`claim_*`), stated in each reason. "
        + (f"{nulls} logged values were not finite (kept as null in results.json)." if nulls else
           "Every logged value was finite.")
        + (" Runs stopped early: " + "; ".join(stopped) + "." if stopped else ""),
        "",
        "| claim | verdict | deciding number |",
        "|---|---|---|",
    ]
    for c in results["claims"]:
        key = c["numbers"].get("decides")
        value = f"{key} = {_fmt(c['numbers'][key])}" if key in c["numbers"] else "—"
        lines.append(f"| [{c['title']}](#{c['id']}) | **{c['verdict']}** | {value} |")
    lines.append("")
    for c in results["claims"]:
        lines += [f"## <a id=\"{c['id']}\"></a>{c['title']}", "",
                  f"**Verdict: {c['verdict']}.** {c['reason']}.", "", f"![{c['id']}]({c['plot']})", ""]
        if c["numbers"]:
            lines += ["| number | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in c["numbers"].items() if k != "decides"]
            lines.append("")
    lines += ["## Every run", ""] + summary_table(results) + ["", "## Commands", "",
              "The study:", "", "```", command, "```", "",
              "Each training run (as `megatron_pref.training.train` parses them, the same as pretrain_pref.py's flags; "
              "the tool adds `--metrics-file` and switches on `megatron_pref.study_metrics`):", "", "```"]
    lines += [f"{name}: {' '.join(shlex.quote(a) for a in portable(argv))}" for name, argv in results["commands"].items()]
    lines += ["```", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))


def _demo_setup(results) -> str:
    sizes, sft = results["sizes"], results["prep"]["sft"]["eval"]
    em = [v for v in sft.get("exact_match", []) if v is not None]
    pairs = sizes.get("train_pairs")
    return ("Start and reference: `prep/sft`, the demo's model after "
            f"{sizes['sft_steps']} steps of SFT on the demo's chosen answers (lr 2e-3, cosine; greedy exact match "
            + (f"{em[0]:g} -> {em[-1]:g}" if em else "n/a") + "). "
            + (f"The preference runs train on the demo's first {pairs} training pairs "
               f"({sizes['steps'] * results['global_batch'] / pairs:.0f} passes), so that margins can grow and the "
               "confident scenario can rank them; held-out numbers are on the demo's 200 validation pairs, and the "
               "greedy exact match, which pretrain_pref measures on the demo's own data only, is n/a for them. "
               if pairs else "")
            + "The confident scenario starts from `prep/confident` "
            f"(DPO, beta 1, lr 1e-3, from prep/sft for {sizes['confident_steps']} steps on the same pairs), "
            "reference prep/sft. The scored scenario runs SPO only (with `--spo-target-from-scores`): the other "
            "losses ignore scores, so their runs would repeat the clean ones bit for bit. ")


def _count_nulls(obj) -> int:
    if obj is None:
        return 1
    if isinstance(obj, dict):
        return sum(_count_nulls(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_count_nulls(v) for v in obj)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from megatron_pref.cli_errors import report_error

    try:
        args = parse_args(argv)
        sizes = check_args(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise StudyError(f"--out {out}: not writable")
        if args.from_results:
            try:
                results = json.loads(Path(args.from_results).read_text())
                if not all(key in results for key in ("runs", "command", "sizes", "prep", "commands")):
                    raise ValueError("not this tool's")
            except (OSError, ValueError, TypeError):
                raise StudyError(f"--from-results {args.from_results}: not a results.json written by this tool") from None
    except StudyError as exc:
        return report_error(str(exc))
    if args.from_results:
        results["rewritten_by"] = "python tools/loss_study.py " + " ".join(shlex.quote(a) for a in argv)
        return finish(results, out)
    began = time.time()
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python tools/loss_study.py " + " ".join(
        shlex.quote(a) for a in argv)
    if is_report_rank():
        print(f"loss study: {len(args.losses)} losses x {len(args.scenarios)} scenarios, {sizes['steps']} steps each, "
              f"into {out}", flush=True)
    from megatron_pref.data.errors import DataError
    from megatron_pref.errors import UserError

    if is_report_rank():
        for made in ("prep", "runs"):  # the tool's own outputs of an earlier study: remade
            shutil.rmtree(out / made, ignore_errors=True)
    from megatron_pref import parallel

    try:
        results = run_study(args, sizes, out)
    except (StudyError, UserError, DataError, ValueError, FileNotFoundError) as exc:  # bad input (ConfigError, ...)
        return report_error(str(exc))
    finally:
        parallel.destroy()
    if not is_report_rank():
        return 0
    results.update(command=command, losses=args.losses, scenarios=args.scenarios, plot_backend=plot_backend(),
                   lr={loss: args.lr_of.get(loss, DEFAULT_LR) for loss in args.losses},
                   loss_args={k: v for k, v in args.extra_of.items()},
                   global_batch=int(_flag_values(next(iter(results["commands"].values()))).get("--global-batch-size") or 32))
    results["wall_seconds"] = round(time.time() - began, 1)
    return finish(results, out)


def finish(results: dict, out: Path) -> int:
    """Judge the claims, draw the plots, write report.md and results.json."""
    from megatron_pref.atomic import write_text_atomic

    results["claims"] = judge(results)
    results["plot_backend"] = plot_backend()
    make_plots(results, out)
    write_report(results, out, results["command"])
    write_text_atomic(out / "results.json", json.dumps(results, separators=(",", ":"), allow_nan=False))
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} (study wall time {results['wall_seconds']:.0f} s)",
          flush=True)
    for c in results["claims"]:
        print(f"  {c['verdict']:<15} {c['title']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
