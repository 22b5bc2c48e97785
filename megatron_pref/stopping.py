"""How a run stops before --train-iters, each way in one line and without a traceback.

- The exits that save, as Megatron-LM: --exit-interval, SIGTERM with --exit-signal-handler,
  --exit-duration-in-mins (:class:`ExitConditions`; all ranks agree on the step).
- Ctrl-C (SIGINT), or SIGTERM without --exit-signal-handler: ``interrupted after step N; the
  last complete checkpoint is ...``, exit 130 (SIGTERM: 143), as a shell reports a signal.
- Another rank dies (its connections close, or a collective waits longer than
  --distributed-timeout-minutes): ``error: rank 1 stopped after step N; ...``, exit 1.

:func:`one_line_stops` (around train() in pretrain_pref.main) says these. The line comes from
rank 0 (or, at two ranks, from the survivor) and every rank leaves at once with ``os._exit``:
with a rank gone the process groups cannot be shut down, and waiting would hang. Checkpoints
are written atomically, so whatever was being saved, ``latest`` names a complete one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_pref.checkpoint_format import latest_iteration_dir

EXIT_RANK_STOPPED = 1
# What torch.distributed raises on a rank whose peer is gone (gloo) or does not answer.
_PEER_CLOSED = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")
_TIMED_OUT = ("Timed out waiting", "Watchdog caught collective operation timeout", "timed out after")

_progress = {"step": None}  # the last step completed in this process (or resumed from)


def record_step(step: int) -> None:
    _progress["step"] = step


@contextlib.contextmanager
def one_line_stops(run):
    """SIGINT and SIGTERM (unless --exit-signal-handler takes SIGTERM during the loop), and a
    dead peer rank, end the run with one line (see the module's docstring)."""
    save, timeout = run.checkpoint.save, run.distributed_timeout_minutes
    owner, siblings = os.getpid(), _torchrun_siblings()

    def on_signal(signum, frame):
        if os.getpid() != owner:  # a process forked from this one (e.g. a checkpoint writer): leave quietly
            os._exit(128 + signum)
        dead = [rank for pid, rank in siblings.items() if not _alive(pid)]
        if signum == signal.SIGTERM and dead:  # torchrun stops the other workers when one dies
            _stop(f"error: rank {dead[0]} stopped {_when()}; {_last_checkpoint(save)}", EXIT_RANK_STOPPED,
                  peer_failure=True)
        what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        _stop(f"{what} {_when()}; {_last_checkpoint(save)}", 128 + signum, peer_failure=False)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception as exc:
        failure = _peer_failure(exc)
        if failure is None:
            raise
        who = f"rank {1 - _rank()}" if _world_size() == 2 else "another rank"
        problem = f"{who} stopped" if failure == "closed" else \
            f"{who} did not answer for --distributed-timeout-minutes {timeout}"
        _stop(f"error: {problem} {_when()}; {_last_checkpoint(save)}", EXIT_RANK_STOPPED, peer_failure=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(line: str, code: int, peer_failure: bool) -> None:
    # A signal reaches every rank: rank 0 says it. A dead peer is seen by the survivors: at two
    # ranks that is one, otherwise rank 0 says it (and if rank 0 died, torchrun's summary does).
    if _world_size() == 1 or _rank() == 0 or (peer_failure and _world_size() == 2):
        print(line, file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(code)


def _when() -> str:
    step = _progress["step"]
    return "before the first step" if step is None else f"after step {step}"


def _last_checkpoint(save: Optional[str]) -> str:
    if not save:
        return "no checkpoint was saved (no --save)"
    try:
        path = latest_iteration_dir(save, flag="--save")
    except Exception:  # an unreadable pointer: say nothing was saved rather than fail here
        path = None
    return f"the last complete checkpoint is {path}" if path is not None else f"no checkpoint was saved in {save}"


def _peer_failure(exc: BaseException) -> Optional[str]:
    """"closed" or "timeout" when ``exc`` (or what it wraps) says another rank is gone."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if any(pattern in text for pattern in _PEER_CLOSED):
            return "closed"
        if any(pattern in text for pattern in _TIMED_OUT):
            return "timeout"
        exc = exc.__cause__ or exc.__context__
    return None


def _torchrun_siblings() -> dict:
    """pid -> rank of the other workers torchrun started on this node (none without torchrun)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return {}
    siblings, parent = {}, os.getppid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            if b"RANK" in env:
                siblings[int(entry)] = int(env[b"RANK"])
        except (OSError, ValueError, IndexError):
            continue
    return siblings


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class ExitConditions:
    """When to leave the loop early, as Megatron-LM: --exit-interval (the same step on every
    rank), SIGTERM with --exit-signal-handler, --exit-duration-in-mins. A signal or a clock
    reaches ranks at different steps, so those two are agreed on by an all-reduce after every
    step (Megatron-LM's DistributedSignalHandler): all ranks stop after the same step."""

    def __init__(self, config):
        self.config = config
        self.start = time.time()
        self.signalled = False
        self.previous_handler = None
        if config.exit_signal_handler:
            self.previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def check(self, iteration: int) -> Optional[str]:
        record_step(iteration)
        if self.config.exit_interval and iteration % self.config.exit_interval == 0:
            return "--exit-interval"
        if not (self.config.exit_signal_handler or self.config.exit_duration_in_mins):
            return None
        minutes = (time.time() - self.start) / 60
        flags = torch.tensor([float(self.signalled),
                              float(bool(self.config.exit_duration_in_mins) and minutes >= (self.config.exit_duration_in_mins or 0))],
                             device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return "SIGTERM, --exit-signal-handler"
        if flags[1] > 0:
            return "--exit-duration-in-mins"
        return None

    def close(self) -> None:
        if self.config.exit_signal_handler:
            signal.signal(signal.SIGTERM, self.previous_handler if self.previous_handler is not None else signal.SIG_DFL)
