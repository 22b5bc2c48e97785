"""Process-group setup for the single-process converters, and staged output directories."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import torch

from megatron_pref.cli_errors import writable_dir_problem
from megatron_pref.convert.errors import ConversionError


@contextlib.contextmanager
def single_process_parallel_state(seed: int = 0):
    """A one-rank gloo group with megatron-core's TP=PP=1 state, for the duration of the block.

    If the caller already initialised torch.distributed (a test rank, an embedding script),
    it is reused, provided it is a single rank at TP=PP=1.
    """
    from megatron.core import parallel_state

    from megatron_pref import parallel
    from megatron_pref.model import ParallelConfig

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise ConversionError("the converters run as one process (the checkpoint is resharded on load); "
                                  "do not launch them with torchrun")
        if not parallel_state.model_parallel_is_initialized():
            parallel.initialize(ParallelConfig(), seed)
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("the converters run as one process (the checkpoint is resharded on load); "
                              "do not launch them with torchrun")
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                            "TORCHELASTIC_USE_AGENT_STORE")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(parallel.free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    # A one-rank torchrun: its store is not on our port; a store of our own.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        parallel.initialize(ParallelConfig(), seed)
        yield
    finally:
        try:
            parallel.destroy()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def check_output_dir(out_dir, force: bool, protect=()) -> Path:
    """Refuse a non-empty output directory unless ``force``; refuse to overwrite the inputs."""
    out = Path(out_dir).absolute()
    for p in protect:
        p = Path(p).absolute()
        if out == p or p.is_relative_to(out):
            raise ConversionError(f"output directory {out_dir} would overwrite the input {p}")
    if out.exists():
        if not out.is_dir():
            raise ConversionError(f"output path {out_dir} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise ConversionError(f"output directory {out_dir} is not empty (pass --force to replace it)")
    # The output is staged next to it and renamed: its parent must be (or become) a writable directory.
    problem = writable_dir_problem(str(out.parent), "output directory", target=str(out_dir))
    if problem:
        raise ConversionError(problem)
    return out


def staging_dir(out_dir: Path) -> Path:
    """A fresh temporary directory next to ``out_dir`` (same filesystem, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing what ``--force`` allowed to replace."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out_dir: Path):
    """Yield a temporary directory; on success rename it to ``out_dir``, on failure delete it."""
    tmp = staging_dir(out_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out_dir)
