"""Process groups: torch.distributed, megatron-core's parallel state, and the seeds."""

from __future__ import annotations

import os
import random
from datetime import timedelta

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
