"""Run a function on N gloo ranks forked from this process (CPU), each with megatron-core's
parallel state set up: the test-suite's ``distributed`` fixture and tools/verify_conversion.py
(without torchrun) share it."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

import torch

from megatron_pref.model import ParallelConfig
from megatron_pref.parallel import destroy, free_port, initialize

def _rank_main(rank, world_size, port, parallel, seed, fn, args, results, init_parallel=True):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # Under torchrun, init_process_group would wait for torchrun's store on our port, forever.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        torch.set_num_threads(1)
        if init_parallel:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
            initialize(parallel, seed)
        value = fn(*args)
        results.put((rank, "ok", _to_bytes(value)))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            destroy()
        except Exception:
            pass


def _to_bytes(value: Any) -> bytes:
    # Tensors put on a multiprocessing queue travel as shared-memory file descriptors that
    # the parent fetches from the child's resource-sharer thread; a rank that has already
    # exited leaves the parent with FileNotFoundError. Plain bytes do not depend on the sender.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def run_on_ranks(fn: Callable[..., Any], world_size: int, parallel: ParallelConfig | None = None,
                 *args, seed: int = 1234, timeout: float = 300.0, init_parallel: bool = True) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks forked from this process (CPU); return the
    per-rank results in rank order. Each rank has megatron-core's parallel state set up.

    The test-suite's ``distributed`` fixture, and tools/verify_conversion.py without torchrun.
    Ranks are forked, not spawned: they inherit the already-imported torch and megatron-core
    (spawning re-imports them, ~4 s a rank). A failure on a rank raises RuntimeError with its
    traceback.

    ``fn`` and its results must be picklable (tensors are fine). With ``init_parallel=False``
    only torchrun's environment is set: ``fn`` initialises everything itself (e.g. ``train``).
    """
    parallel = parallel or ParallelConfig()
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, parallel, seed, fn, args, results, init_parallel))
             for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed test failed on " + "\n".join(errors))
    return [collected[r] for r in range(world_size)]
