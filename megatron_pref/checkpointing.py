"""Training checkpoints through megatron-core ``dist_checkpointing``.

Layout (shared with the converters, see ``convert/checkpoint_io.py``)::

    DIR/latest                     name of the newest *complete* iteration directory
    DIR/megatron_pref_config.json  the architecture (ModelConfig) and format version
    DIR/tokenizer/                 tokenizer files, when known
    DIR/iter_0000100/              dist checkpoint: model, optimizer, rng, train_state

Writes are atomic: every rank writes into ``iter_XXXXXXX.tmp``, then rank 0 renames it and
only then rewrites ``latest``. A run killed mid-save leaves a ``.tmp`` directory that is
ignored (and removed by the next save); ``--load`` resumes from the last complete checkpoint.

Model and optimizer states are sharded tensors, so a checkpoint saved at one TP/PP layout
loads at another. RNG states are per rank and are restored only when the layout matches.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_pref.atomic import write_json_atomic, write_text_atomic
from megatron_pref.convert.checkpoint_io import (CONFIG_FILE, FORMAT_VERSION, LATEST_FILE, TOKENIZER_DIR,
                                                 copy_tokenizer, iteration_name, load_sharded, read_checkpoint_metadata)
from megatron_pref.model import ModelConfig, unwrap_model

TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    pass


@dataclass
class TrainState:
    iteration: int = 0
    consumed_pairs: int = 0
    epoch: int = 0
    # Where the run's reference weights come from (a checkpoint, or the seeded initial
    # policy); saved inside the checkpoint so a resumed run keeps the same reference.
    reference_source: Optional[dict] = None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    # The device type too: CPU generator states do not fit CUDA generators (and back).
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def model_sharded_state_dict(model_chunks: list) -> dict:
    """One entry per chunk; the sharded tensors' keys are global, so chunk count may change."""
    return {key: unwrap_model(c).sharded_state_dict() for key, c in zip(_chunk_keys(model_chunks), model_chunks)}


def _chunk_keys(model_chunks: list) -> list:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _rng_sharded_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    pp_size, tp_size = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", state, (pp_size, tp_size), (pp, tp),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def latest_iteration_dir(load_dir) -> Optional[Path]:
    """The complete checkpoint ``latest`` names, or None when there is none."""
    latest = Path(load_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    path = Path(load_dir) / name
    if not path.is_dir():
        raise CheckpointError(f"{latest} names {name}, which does not exist")
    return path


def save_checkpoint(save_dir, model_chunks: list, optimizer, scheduler, state: TrainState,
                    model_cfg: ModelConfig, tokenizer_dir: Optional[str] = None,
                    run_metadata: Optional[dict] = None) -> Path:
    """Save everything needed to resume. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = save_dir / iteration_name(state.iteration)
    tmp = save_dir / (final.name + TMP_SUFFIX)
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(f"iter_*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()

    sharded = model_sharded_state_dict(model_chunks)
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded)
    sharded["rng"] = _rng_sharded_object()
    sharded["train_state"] = {
        "iteration": state.iteration, "consumed_pairs": state.consumed_pairs, "epoch": state.epoch,
        "reference_source": state.reference_source,
        "scheduler": scheduler.state_dict(), "layout": _layout(),
    }
    dist_checkpointing.save(sharded, str(tmp))
    _barrier()
    if _rank() == 0:
        if final.exists():  # re-saving the same iteration (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        metadata = {"model": model_cfg.to_dict(), "format_version": FORMAT_VERSION,
                    "source": {"training": run_metadata or {}}}
        config_path = save_dir / CONFIG_FILE
        if config_path.is_file():  # keep the conversion's provenance
            try:
                metadata["source"] = {**read_checkpoint_metadata(save_dir).get("source", {}),
                                      **metadata["source"]}
            except ValueError:
                pass
        write_json_atomic(config_path, metadata)
        if tokenizer_dir and not (save_dir / TOKENIZER_DIR).exists():
            copy_tokenizer(tokenizer_dir, save_dir / TOKENIZER_DIR)
        write_text_atomic(save_dir / LATEST_FILE, final.name + "\n")
    _barrier()
    return final


def read_model_config(load_dir) -> ModelConfig:
    try:
        metadata = read_checkpoint_metadata(load_dir)
        return ModelConfig.from_dict(metadata["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"--load {load_dir}: {exc}") from None


def validate_checkpoint_dir(load_dir) -> Path:
    """Cheap checks before any model is built: one clear line on a bad --load."""
    path = latest_iteration_dir(load_dir)
    if path is None:
        raise CheckpointError(f"--load {load_dir}: no '{LATEST_FILE}' file; not a checkpoint directory")
    read_model_config(load_dir)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"--load {load_dir}: {path.name} is not a complete dist checkpoint")
    return path


def load_checkpoint(load_dir, model_chunks: list, optimizer=None, scheduler=None,
                    load_optimizer: bool = True, load_rng: bool = True) -> Optional[TrainState]:
    """Load weights (always) and, when the checkpoint is a training one, the optimizer,
    scheduler, RNG and position in the data. Returns the TrainState, or None for a
    weights-only checkpoint (e.g. one converted from Hugging Face): training starts at 0.
    """
    from megatron.core import dist_checkpointing

    path = validate_checkpoint_dir(load_dir)
    common = dist_checkpointing.load_common_state_dict(str(path))
    train_state = common.get("train_state") if isinstance(common, dict) else None

    # Sharded tensors are matched by their global keys, so the chunk grouping may differ.
    request = model_sharded_state_dict(model_chunks)
    resume = train_state is not None
    if resume and load_optimizer and optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(request, is_loading=True)
    same_layout = resume and train_state.get("layout") == _layout()
    if resume and load_rng and same_layout:
        request["rng"] = _rng_sharded_object()
    loaded = _load_sharded(request, path, model_chunks)
    if not resume:
        return None
    if "optimizer" in request:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    if "rng" in request:
        _restore_rng(loaded["rng"])
    return TrainState(iteration=train_state["iteration"], consumed_pairs=train_state["consumed_pairs"],
                      epoch=train_state.get("epoch", 0), reference_source=train_state.get("reference_source"))


def _load_sharded(request: dict, path: Path, model_chunks: list) -> dict:
    """The request loaded into the chunks (TE ``_extra_state`` may be absent, see load_sharded)."""
    modules = {key: unwrap_model(c) for key, c in zip(_chunk_keys(model_chunks), model_chunks)}
    return load_sharded(request, path, modules, error=CheckpointError)


def load_weights_only(load_dir, model_chunks: list) -> None:
    """Reference / evaluation models: weights only, whatever else the checkpoint holds."""
    path = validate_checkpoint_dir(load_dir)
    _load_sharded(model_sharded_state_dict(model_chunks), path, model_chunks)


def checkpoint_fingerprint(load_dir) -> str:
    """Identity of the checkpoint ``latest`` names: its metadata and file names and sizes.

    Enough to notice a different or re-saved reference, without reading the weights.
    """
    import hashlib

    path = latest_iteration_dir(load_dir)
    if path is None:
        raise CheckpointError(f"{load_dir}: no '{LATEST_FILE}' file; not a checkpoint directory")
    digest = hashlib.sha256(str(path.name).encode())
    for f in sorted(path.rglob("*")):
        if f.is_file():
            digest.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
            if f.name in ("metadata.json", ".metadata", "common.pt"):
                digest.update(f.read_bytes())
    return digest.hexdigest()
