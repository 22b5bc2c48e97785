"""Resuming the way Megatron-LM users do: the reference pinned across ``--load X --save X``,
which flags a resume may change, --finetune, and exits that save (--exit-interval, SIGTERM
with --exit-signal-handler, --exit-duration-in-mins)."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_pref.arguments import parse_run_config
from megatron_pref.checkpointing import CheckpointError
from megatron_pref.model import ParallelConfig
from tests.test_training import REPO, _demo_subset, _train, run_training, tiny  # noqa: F401 (fixture)

COMMON = ["--loss", "dpo", "--eval-interval", "100", "--lr-decay-style", "cosine"]


def _write_weights_only(argv, out, seed):
    """A weights-only checkpoint (what a conversion writes) of the model ``argv`` describes,
    with seeded random weights."""
    from megatron_pref.convert.checkpoint_io import save_model_checkpoint
    from megatron_pref.engine import build_model_chunks
    from megatron_pref.arguments import resolve_model_config
    from megatron_pref.model import layout_invariant_init
    from megatron_pref.data.bundle import build_data

    run = parse_run_config(argv)
    run.precision.transformer_impl = "local"
    cfg = resolve_model_config(run, build_data(run).tokenizer.vocab_size, None)
    chunks = build_model_chunks(cfg, run.parallel, run.precision, wrap_ddp=False, perform_initialization=False)
    layout_invariant_init(chunks[0], cfg, seed)
    save_model_checkpoint(chunks[0], cfg, out)
    return str(out)


def weights_only(distributed, argv, out, seed=7):
    return distributed(_write_weights_only, 1, ParallelConfig(), argv, out, seed)[0]


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """A weights-only checkpoint of the ``tiny`` model, as a conversion leaves it."""
    from megatron_pref.forked_ranks import run_on_ranks

    return run_on_ranks(_write_weights_only, 1, ParallelConfig(), tiny, tmp_path_factory.mktemp("conv") / "c", 7)[0]


def _losses(metrics_file):
    return {d["iteration"]: d["loss"] for d in map(json.loads, Path(metrics_file).read_text().splitlines())
            if "loss" in d}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _train_with_the_reference_following_latest(argv):
    """The negative control: the reference taken from --load's latest, as before it was pinned."""
    from megatron_pref import reference
    from megatron_pref.checkpointing import pin_checkpoint

    reference.reference_source = lambda run, saved_state: pin_checkpoint(run.checkpoint.load)  # forked rank
    return _train(argv)


# ------------------------------------------------------------- item: the pinned reference

@pytest.mark.parametrize("mode", ["precompute", "online"])
def test_reference_stays_pinned_when_load_and_save_are_one_directory(distributed, tmp_path, tiny, converted, mode):
    """--load X --save X from a converted checkpoint, stopped at step 2 and resumed: steps 3-4
    equal the uninterrupted run's (the reference stays iter_0000000, not the step-2 policy).
    Control: a reference that follows X's latest gives ln 2 at step 3."""
    common = tiny + COMMON + ["--train-iters", "4", "--ref-logprobs", mode]
    whole_dir, stop_dir = _copy(converted, tmp_path / "whole"), _copy(converted, tmp_path / "stop")
    whole = run_training(distributed, 1, common + ["--load", whole_dir, "--save", whole_dir,
                                                   "--metrics-file", str(tmp_path / "whole.jsonl")])[0]
    stopped = common + ["--load", stop_dir, "--save", stop_dir, "--metrics-file", str(tmp_path / "stop.jsonl")]
    run_training(distributed, 1, stopped + ["--save-interval", "2", "--exit-interval", "2"])
    control_dir = _copy(stop_dir, tmp_path / "control")
    resumed = run_training(distributed, 1, stopped)[0]
    want, got = _losses(tmp_path / "whole.jsonl"), _losses(tmp_path / "stop.jsonl")
    assert resumed["iteration"] == 4
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert resumed["weights_sha256"] == whole["weights_sha256"]

    if mode == "online":  # one control is enough: the reference source is shared by both modes
        return
    control = distributed(_train_with_the_reference_following_latest, 1, ParallelConfig(),
                          common + ["--load", control_dir, "--metrics-file", str(tmp_path / "control.jsonl"),
                                    "--ref-cache-dir", str(tmp_path / "control_cache")], init_parallel=False)[0]
    assert _losses(tmp_path / "control.jsonl")[3] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(_losses(tmp_path / "control.jsonl")[3] - want[3]) > 1e-4
    assert control["weights_sha256"] != whole["weights_sha256"]


def test_gone_or_overwritten_reference(distributed, tmp_path, tiny, converted):
    """The pinned iteration deleted: the precomputed cache whose key names its id serves (same
    steps 3-4); online, or without a matching cache, one line names it. A re-saved checkpoint
    (same weights, new id) is not the pinned one."""
    common = tiny + COMMON + ["--train-iters", "4"]
    whole_dir, stop_dir = _copy(converted, tmp_path / "whole"), _copy(converted, tmp_path / "stop")
    run_training(distributed, 1, common + ["--load", whole_dir, "--save", whole_dir,
                                           "--metrics-file", str(tmp_path / "whole.jsonl")])
    stopped = common + ["--load", stop_dir, "--save", stop_dir, "--metrics-file", str(tmp_path / "stop.jsonl")]
    run_training(distributed, 1, stopped + ["--save-interval", "2", "--exit-interval", "2"])
    shutil.rmtree(Path(stop_dir) / "iter_0000000")

    with pytest.raises(CheckpointError, match=r"iter_0000000 \(id [0-9a-f]{12}\) is gone; --ref-logprobs online"):
        _train(stopped + ["--ref-logprobs", "online"])
    with pytest.raises(CheckpointError, match=r"is gone, and no precomputed reference log-probs for the train split"):
        _train(stopped + ["--ref-cache-dir", str(tmp_path / "empty")])
    run_training(distributed, 1, stopped)  # served by <stop>/reference_cache
    want, got = _losses(tmp_path / "whole.jsonl"), _losses(tmp_path / "stop.jsonl")
    assert [got[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], abs=1e-6)

    # Overwritten: the same weights converted again into the pinned directory.
    again = _copy(converted, tmp_path / "again")
    run_training(distributed, 1, tiny + COMMON + ["--train-iters", "2", "--load", again, "--save", again,
                                                  "--exit-interval", "1", "--ref-logprobs", "online"])
    shutil.rmtree(Path(again) / "iter_0000000")
    weights_only(distributed, tiny, again)  # rewrites latest: point it back at the training checkpoint
    (Path(again) / "latest").write_text("iter_0000001\n")
    with pytest.raises(CheckpointError, match=r"iter_0000000 \(id [0-9a-f]{12}\) was overwritten since it was pinned"):
        _train(tiny + COMMON + ["--train-iters", "2", "--load", again, "--ref-logprobs", "online"])


def test_every_save_and_conversion_has_its_own_id(distributed, tmp_path, tiny, converted):
    from megatron_pref.checkpointing import checkpoint_identity

    meta = json.loads((Path(converted) / "megatron_pref_config.json").read_text())
    first = checkpoint_identity(Path(converted) / "iter_0000000")
    assert meta["checkpoints"] == {"iter_0000000": first} and len(first) == 32
    again = weights_only(distributed, tiny, tmp_path / "again")
    assert checkpoint_identity(Path(again) / "iter_0000000") != first  # same weights, another save
    run_training(distributed, 1, tiny + COMMON + ["--train-iters", "2", "--load", again, "--save", again,
                                                  "--save-interval", "1"])
    ids = json.loads((Path(again) / "megatron_pref_config.json").read_text())["checkpoints"]
    assert sorted(ids) == ["iter_0000000", "iter_0000001", "iter_0000002"] and len(set(ids.values())) == 3
    assert ids["iter_0000002"] == checkpoint_identity(Path(again) / "iter_0000002")


# ------------------------------------------------------------- item: flags on resume

@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """One training checkpoint (DPO, --train-iters 2, cosine schedule), shared by the table."""
    from megatron_pref.forked_ranks import run_on_ranks

    path = tmp_path_factory.mktemp("saved") / "ckpt"
    run_on_ranks(_train, 1, ParallelConfig(), tiny + COMMON + ["--train-iters", "2", "--save", str(path)],
                 init_parallel=False)
    return str(path)


@pytest.mark.parametrize("flags,message", [
    (["--train-iters", "4"], "--train-iters 4 sets the lr schedule's decay steps to 4, the checkpoint's is 2: "
                             "pass --override-opt_param-scheduler"),
    (["--lr", "2e-3"], "--lr 0.002 sets the lr schedule's peak lr to 0.002, the checkpoint's is 0.001"),
    (["--min-lr", "1e-5"], "--min-lr 1e-05 sets the lr schedule's minimum lr"),
    (["--lr-warmup-iters", "1"], "--lr-warmup-iters 1 sets the lr schedule's warmup steps to 1, the checkpoint's is 0"),
    (["--lr-decay-style", "linear"], "--lr-decay-style linear sets the lr schedule's decay style to linear, the "
                                     "checkpoint's is cosine"),
    (["--lr-decay-iters", "3"], "--lr-decay-iters 3 sets the lr schedule's decay steps to 3"),
    (["--weight-decay", "0.1"], "--weight-decay 0.1 sets the lr schedule's weight decay"),
    (["--loss", "ipo"], "--loss ipo differs from the checkpoint's dpo; a resume must keep it"),
    (["--beta", "0.2"], "--beta 0.2 differs from the checkpoint's 0.1"),
    (["--label-smoothing", "0.1"], "--label-smoothing 0.1 differs from the checkpoint's 0.0"),
    (["--seq-length", "128"], "--seq-length 128 differs from the checkpoint's 64"),
    (["--max-prompt-length", "20"], "--max-prompt-length 20 differs from the checkpoint's None"),
    (["--global-batch-size", "16"], "--global-batch-size 16 differs from the checkpoint's 8"),
    (["--seed", "5"], "--seed 5 differs from the checkpoint's 1234"),
    (["--bf16"], "--bf16 True differs from the checkpoint's False"),
    (["--adam-beta1", "0.8"], "--adam-beta1 0.8 differs from the checkpoint's 0.9"),
    (["--hidden-size", "48"], "--hidden-size 48 differs from the --load checkpoint's hidden_size=32"),
    (["DATA"], r"--data-path \(content [0-9a-f]{12}\) differs from the checkpoint's \(content [0-9a-f]{12}\)"),
    (["REF"], "--ref-load .* differs from the reference of the run being resumed, the initial policy of --seed 1234"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], "exclude each other"),
    (["--finetune", "--override-opt_param-scheduler"], "--override-opt_param-scheduler has no effect with --finetune"),
])
def test_resume_refuses_changed_flags(tiny, saved, tmp_path, monkeypatch, flags, message):
    """Each in one line naming the flag and both values, before any process group."""
    from megatron_pref import parallel
    from megatron_pref.arguments import ConfigError

    def no_process_groups(*args, **kwargs):
        raise AssertionError("reached the process groups")

    monkeypatch.setattr(parallel, "initialize", no_process_groups)

    argv = tiny + COMMON + ["--train-iters", "2", "--load", saved]
    if flags == ["DATA"]:  # the same file name and size, two rows swapped
        at = argv.index("--data-path") + 1
        argv[at] = _demo_subset(tmp_path, Path(argv[at]).name, 96, mutate=lambda ls: [ls[1], ls[0]] + ls[2:])
        flags = []
    if flags == ["REF"]:
        flags = ["--ref-load", saved]
    argv += flags
    with pytest.raises((CheckpointError, ConfigError), match=message):
        _train(argv)


def test_resume_schedule_flags_and_allowed_changes(distributed, tmp_path, tiny, saved):
    """Saved with --train-iters 2 (cosine), resumed with --train-iters 4:
    --override-opt_param-scheduler decays over 4 steps (the lr after step 3 is
    1e-3 * (1 + cos(3pi/4)) / 2), --use-checkpoint-opt_param-scheduler keeps the decay over 2
    (lr 0). Intervals, --no-load-rng and the reference mode may change."""
    common = tiny + COMMON + ["--train-iters", "4", "--load", saved]
    allowed = ["--log-interval", "1", "--eval-interval", "3", "--save-interval", "3", "--save", str(tmp_path / "o"),
               "--no-load-rng", "--ref-logprobs", "online", "--eval-iters", "2"]
    run_training(distributed, 1, common + allowed + ["--override-opt_param-scheduler",
                                                     "--metrics-file", str(tmp_path / "o.jsonl")])
    run_training(distributed, 1, common + ["--use-checkpoint-opt_param-scheduler", "--metrics-file",
                                           str(tmp_path / "c.jsonl"), "--ref-cache-dir", str(tmp_path / "cache")])

    def lrs(name):
        return {d["iteration"]: d["lr"] for d in map(json.loads, (tmp_path / name).read_text().splitlines())
                if "lr" in d}

    assert lrs("o.jsonl")[3] == pytest.approx(1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2, rel=1e-9)
    assert lrs("c.jsonl")[3] == 0.0 and lrs("c.jsonl")[4] == 0.0
    assert (tmp_path / "o" / "latest").read_text().strip() == "iter_0000004"


def test_finetune_starts_a_new_run_from_the_weights(distributed, tmp_path, tiny, saved):
    """--finetune: step 0 again, fresh optimizer and schedule, the loaded checkpoint as the
    reference (DPO starts at ln 2), settings that a resume must keep may change."""
    out = str(tmp_path / "ft")
    result = run_training(distributed, 1, tiny + COMMON + ["--train-iters", "2", "--load", saved, "--finetune",
                                                           "--seed", "5", "--save", out])[0]
    assert result["iteration"] == 2
    assert result["eval_before"]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    state = json.loads((Path(out) / "megatron_pref_config.json").read_text())
    assert sorted(state["checkpoints"]) == ["iter_0000002"]
    from megatron_pref.checkpointing import read_train_state

    reference = read_train_state(out)["reference_source"]
    assert reference["path"] == os.path.abspath(saved) and reference["iteration"] == "iter_0000002"
    from megatron_pref.arguments import ConfigError

    with pytest.raises(ConfigError, match="would overwrite iter_0000002, this run's reference"):
        _train(tiny + COMMON + ["--train-iters", "2", "--load", saved, "--finetune", "--save", saved])


# ------------------------------------------------------------- item: exits save

def test_exit_interval_saves(distributed, tmp_path, tiny):
    """--exit-interval 2 with --save-interval 3 saves at step 2 (Megatron-LM does), and the
    resume ends where the uninterrupted run does."""
    common = tiny + COMMON + ["--train-iters", "4", "--save-interval", "3", "--ref-cache-dir", str(tmp_path / "cache")]
    whole = run_training(distributed, 1, common)[0]
    ckpt = str(tmp_path / "ckpt")
    stopped = run_training(distributed, 1, common + ["--save", ckpt, "--exit-interval", "2"])[0]
    assert (Path(ckpt) / "latest").read_text().strip() == "iter_0000002"
    assert stopped["iteration"] == 2 and stopped["stopped_by"] == "--exit-interval"
    resumed = run_training(distributed, 1, common + ["--load", ckpt])[0]
    assert resumed["iteration"] == 4 and resumed["weights_sha256"] == whole["weights_sha256"]


def _train_with_sigterm_on_rank_1(argv):
    """Rank 1 alone gets SIGTERM during step 2."""
    from megatron_pref import training

    original = training.train_step

    def step(*args, **kwargs):
        if os.environ["RANK"] == "1" and args[5] == 2:  # train_step(..., step, ...)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    training.train_step = step
    return _train(argv)


def test_signal_on_one_rank_stops_every_rank_after_the_same_step(distributed, tmp_path, tiny):
    ckpt = tmp_path / "ckpt"
    argv = tiny + COMMON + ["--train-iters", "6", "--exit-signal-handler", "--save", str(ckpt)]
    results = distributed(_train_with_sigterm_on_rank_1, 2, ParallelConfig(), argv, init_parallel=False)
    assert [r["iteration"] for r in results] == [2, 2]
    assert [r["stopped_by"] for r in results] == ["SIGTERM, --exit-signal-handler"] * 2
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    timed = run_training(distributed, 2, tiny + COMMON + ["--train-iters", "6", "--exit-duration-in-mins", "1e-9",
                                                           "--ref-cache-dir", str(tmp_path / "cache")])
    assert [r["iteration"] for r in timed] == [1, 1] and timed[0]["stopped_by"] == "--exit-duration-in-mins"


def test_sigterm_to_torchrun_saves_and_resumes(distributed, tmp_path, tiny):
    """A real SIGTERM to a torchrun job at DP 2 (what Slurm sends before its time limit), once a
    step has logged: the workers finish the step, save and exit 0; the resume ends with the
    weights and losses of the uninterrupted run. Control: without --exit-signal-handler the
    same signal leaves no checkpoint."""
    # A constant lr over a fixed decay length: the schedule does not depend on --train-iters.
    flags = tiny + ["--loss", "dpo", "--eval-interval", "1000", "--lr-decay-style", "constant",
                    "--lr-decay-iters", "1000", "--ref-cache-dir", str(tmp_path / "cache")]

    def interrupted(name, extra):
        ckpt, metrics = tmp_path / name, tmp_path / f"{name}.jsonl"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                 str(REPO / "pretrain_pref.py"), *flags, "--train-iters", "200", "--save", str(ckpt),
                                 "--metrics-file", str(metrics), *extra],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.is_file() and '"lr"' in metrics.read_text()):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0].decode()
        return ckpt, metrics, output

    ckpt, metrics, output = interrupted("run", ["--exit-signal-handler"])
    # torchrun's agent reports the signal with a traceback of its own; the workers print none.
    assert "exiting after step" in output and "megatron_pref/" not in output, output[-3000:]
    step = int((ckpt / "latest").read_text().strip().removeprefix("iter_"))
    assert 1 <= step < 200
    resumed = run_training(distributed, 2, flags + ["--train-iters", str(step + 2), "--load", str(ckpt),
                                                    "--metrics-file", str(metrics)])
    whole = run_training(distributed, 2, flags + ["--train-iters", str(step + 2),
                                                  "--metrics-file", str(tmp_path / "whole.jsonl")])
    assert [r["weights_sha256"] for r in resumed] == [r["weights_sha256"] for r in whole]
    want, got = _losses(tmp_path / "whole.jsonl"), _losses(metrics)
    assert [got[s] for s in (step + 1, step + 2)] == pytest.approx([want[s] for s in (step + 1, step + 2)], abs=1e-6)

    ckpt, _, _ = interrupted("control", [])
    assert not (ckpt / "latest").exists()


# ------------------------------------------------------------- item: a full disk (issue 16 item 9)

def _pretrain_on_a_disk_full_from_step_2(argv, how):
    """pretrain_pref.main in this forked rank, on a disk that fills once step 1 is saved:
    ``free`` reports less free space than the checkpoint needs (checked before writing);
    ``enospc`` lets the writer's worker fail with ENOSPC midway through a file, as the kernel
    does (megatron-core wraps it in torch's CheckpointException); ``room`` is the control."""
    import contextlib
    import errno
    import functools
    import io

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from tests.test_inputs import _pretrain_main

    save = Path(argv[argv.index("--save") + 1])

    def full() -> bool:
        return (save / "iter_0000001").is_dir()

    if how == "free":
        real_usage = shutil.disk_usage
        shutil.disk_usage = lambda path: real_usage(path)._replace(free=4096) if full() else real_usage(path)
    elif how == "enospc":
        real_write = filesystem_async._write_item

        @functools.wraps(real_write)
        def write(*args, **kwargs):
            if full():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(*args, **kwargs)

        filesystem_async._write_item = write
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = _pretrain_main()(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("how", ["free", "enospc", "room"])
def test_full_disk_is_one_line_and_latest_stays_complete(distributed, tmp_path, tiny, how):
    """--save on a disk that fills after step 1: one line naming --save and the free space (no
    CheckpointException traceback), no half-written iteration left, ``latest`` on step 1, and
    the resume from it works. Control (``room``): the same run saves step 2."""
    ckpt = tmp_path / "ckpt"
    argv = tiny + COMMON + ["--train-iters", "2", "--save-interval", "1", "--save", str(ckpt),
                            "--ref-cache-dir", str(tmp_path / "cache")]
    code, err = distributed(_pretrain_on_a_disk_full_from_step_2, 1, ParallelConfig(), argv, how,
                            init_parallel=False)[0]
    if how == "room":
        assert code == 0 and "error" not in err, err[-3000:]
        assert (ckpt / "latest").read_text().strip() == "iter_0000002"
        return
    what = "not enough free space" if how == "free" else "no space left"
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines() == [err.strip()], err[-3000:]
    assert err.startswith(f"error: --save {ckpt}: {what} on its device ("), err
    assert re.search(r"\(\d+\.\d [MG]iB free, the checkpoint needs about \d+\.\d MiB\); the last complete "
                     rf"checkpoint is {re.escape(str(ckpt))}/iter_0000001$", err.strip()), err
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001"]
    resumed = run_training(distributed, 1, argv[:-4] + ["--load", str(ckpt), "--ref-cache-dir", str(tmp_path / "cache")])[0]
    assert resumed["iteration"] == 2
