"""A run that stops early, the way clusters and users stop it, says so in one line: a rank
killed with SIGKILL, Ctrl-C (SIGINT to the job's process group), SIGTERM. Each row launches a
real 2-rank CPU/gloo run of pretrain_pref.py, waits for its first checkpoint, stops it, and
checks the first line on stderr, the exit status and that no rank printed a traceback.

Launchers: ``ranks`` starts the two ranks as Slurm's srun does (one process per rank, the
rendezvous from the environment), so each rank's stderr and exit status are its own;
``torchrun`` is torchrun, whose agent adds lines (and, on a signal, a traceback) of its own:
there the rows check our lines only.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_pref.parallel import free_port
from tests.test_training import MODEL_FLAGS, _demo_subset, data_flags

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = r"the last complete checkpoint is \S+/iter_\d{7}$"
# Text a rank's traceback (ours, torch's or gloo's) would show; torchrun's agent prints a
# traceback of its own (its SignalException, or its report of the failed worker).
TRACEBACK_TEXT = ("KeyboardInterrupt", "Connection reset", "Connection closed", "megatron_pref/", 'pretrain_pref.py", line')


def _row(launcher, action, first_line, code, control=False, id=None):
    """``first_line``: a regex for the first line of rank 0's stderr (torchrun: of our lines);
    ``code``: rank 0's exit status (torchrun: None, its agent's own). ``control``: the same
    run without megatron_pref.stopping, which must fail the row's check."""
    return pytest.param(launcher, action, first_line, code, control, id=id)


STOPPED_RUNS = [
    _row("ranks", "kill-rank-1", r"error: rank 1 stopped after step (\d+); " + CHECKPOINT, 1, id="rank-1-killed"),
    _row("ranks", "sigint", r"interrupted after step (\d+); " + CHECKPOINT, 130, id="ctrl-c"),
    _row("ranks", "sigterm", r"terminated \(SIGTERM\) after step (\d+); " + CHECKPOINT, 143, id="sigterm"),
    _row("torchrun", "kill-rank-1", r"error: rank 1 stopped after step (\d+); " + CHECKPOINT, None,
         id="torchrun-rank-1-killed"),
    _row("torchrun", "sigint", r"interrupted after step (\d+); " + CHECKPOINT, None, id="torchrun-ctrl-c"),
    # Negative control: without the stop handling, rank 0 prints gloo's traceback.
    _row("ranks", "kill-rank-1", r"error: rank 1 stopped", 1, control=True, id="control-rank-1-killed"),
]


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stop_data")
    train = _demo_subset(directory, "train.jsonl", 96)
    valid = _demo_subset(directory, "valid.jsonl", 16)
    return data_flags(train, valid) + MODEL_FLAGS + ["--loss", "dpo", "--eval-interval", "100000",
                                                     "--train-iters", "100000", "--save-interval", "2"]


def _launch(launcher, argv, tmp_path, control):
    """The job's processes (rank 0 first; torchrun: the agent) and their log files."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    wrapper = []
    if control:
        env["TEST_NO_ONE_LINE_STOPS"] = "1"
        wrapper = [str(REPO / "tests" / "wrapped_launch.py")]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *wrapper,
                   str(REPO / "pretrain_pref.py"), *argv]
        logs = [open(tmp_path / "stderr", "w+")]
        return [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=logs[0],
                                 process_group=0)], logs
    procs, logs, port = [], [], str(free_port())
    for rank in range(2):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        logs.append(open(tmp_path / f"stderr.{rank}", "w+"))
        procs.append(subprocess.Popen([sys.executable, *wrapper, str(REPO / "pretrain_pref.py"), *argv],
                                      cwd=tmp_path, env=rank_env, stdout=subprocess.DEVNULL, stderr=logs[-1],
                                      process_group=0 if rank == 0 else procs[0].pid))
    return procs, logs


def _rank_1_pid(procs, launcher) -> int:
    if launcher == "ranks":
        return procs[1].pid
    for child in psutil.Process(procs[0].pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == "1":
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError("torchrun has no rank 1")


@pytest.mark.parametrize("launcher,action,first_line,code,control", STOPPED_RUNS)
def test_a_stopped_run_says_so_in_one_line(flags, tmp_path, launcher, action, first_line, code, control):
    save = tmp_path / "ckpt"
    procs, logs = _launch(launcher, flags + ["--save", str(save)], tmp_path, control)
    try:
        deadline = time.time() + 240
        while not (save / "latest").is_file():  # a complete checkpoint, then a step or two more
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                "".join(Path(f.name).read_text()[-2000:] for f in logs)
            time.sleep(0.2)
        time.sleep(1.0)
        if action == "kill-rank-1":
            os.kill(_rank_1_pid(procs, launcher), signal.SIGKILL)
        else:
            os.killpg(procs[0].pid, signal.SIGINT if action == "sigint" else signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    stderr = [Path(f.name).read_text() for f in logs]
    lines = stderr[0].splitlines()
    if launcher == "torchrun":  # our lines only: torchrun's agent logs and reports on its own
        lines = [line for line in lines if re.match(r"(\[rank \d+\] )?(error|interrupted|terminated|warning)\b", line)]
    ok = (bool(lines) and re.match(first_line, lines[0]) is not None
          and (code is None or codes[0] == code)
          and not any(text in err for text in TRACEBACK_TEXT for err in stderr)
          and (launcher == "torchrun" or not any("Traceback" in err for err in stderr)))
    assert ok != control, (codes, stderr[0][-3000:])
    if control:
        return
    assert len(lines) == 1 or launcher == "torchrun" and not re.match(first_line, lines[1])
    if launcher == "ranks":  # rank 1: killed, or it left with the same status and without a word
        assert stderr[1] == "" and codes[1] == (-signal.SIGKILL if action == "kill-rank-1" else code), stderr[1]
    # The line names the step and the checkpoint that are on disk.
    step = int(re.match(r".* after step (\d+);", lines[0]).group(1))
    latest = (save / "latest").read_text().strip()
    assert lines[0].endswith(str(save / latest)) and int(latest.removeprefix("iter_")) <= step
