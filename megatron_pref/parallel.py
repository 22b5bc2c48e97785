"""Process groups: torch.distributed, megatron-core's parallel state, and the seeds."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
import traceback
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch

from megatron_pref import cpu
from megatron_pref.errors import UserError
from megatron_pref.model import ParallelConfig


_initialization_started = False


def initialization_started() -> bool:
    """Whether this process has begun :func:`initialize`: errors from then on may be of this
    rank only (pretrain_pref prints them with the rank; earlier ones are the same on every rank)."""
    return _initialization_started


def initialize(parallel: ParallelConfig, seed: int, timeout_minutes: int = 10) -> bool:
    """Initialise torch.distributed (from torchrun's env), megatron-core groups and RNGs.

    Returns True when running in CPU mode (gloo, the CPU compatibility layer on).
    """
    from megatron.core import parallel_state

    global _initialization_started
    _initialization_started = True

    cpu_mode = cpu.enable_if_no_cuda()
    if "RANK" not in os.environ:  # plain `python pretrain_pref.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if local_rank >= gpus:
                raise UserError(f"local rank {local_rank} has no GPU: this node has {gpus}; "
                                 f"launch at most --nproc-per-node {gpus}")
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(
            backend=cpu.default_backend(), timeout=timedelta(minutes=timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    seed_everything(seed)
    return cpu_mode


def free_port() -> int:
    """A free TCP port on the loopback interface (single-process runs, test fixtures)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Same seed on every rank: TP-invariant init draws full weights then splits them.

    megatron-core offsets the model-parallel RNG (dropout inside TP regions) by TP rank itself.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- forked ranks

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
