"""The converters' side of the checkpoint format (``megatron_pref/checkpoint_format.py`` owns
the layout, ``latest``, the writer and the loader): one model chunk in and out, a chosen
``--iteration``, the tokenizer files' checks, and tensor metadata without the data.

Vocabulary tensors carry ``allow_shape_mismatch``: a different vocab padding on load is filled
with zeros.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_pref.checksums import verify_checksums
from megatron_pref.checkpoint_format import (LATEST_FILE, iteration_name, latest_iteration_dir, load_sharded,
                                             read_checkpoint_metadata, write_checkpoint)
from megatron_pref.convert.errors import ConversionError, read_json_object
from megatron_pref.model import ModelConfig, unwrap_model

# Tokenizer files that are JSON objects (checked before they are copied into a checkpoint).
_TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                         "chat_template.json")


def check_tokenizer_files(src_dir) -> None:
    """Raise ConversionError (one line naming the file) if a tokenizer file of ``src_dir`` is
    unreadable: ``tokenizer.json`` must load with the ``tokenizers`` library (what the fast
    tokenizers use), the other JSON files must be JSON objects. Files that are absent are fine."""
    src = Path(src_dir)
    if not src.is_dir():
        return
    tokenizer_json = src / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust error: one line is enough
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConversionError(f"cannot load the tokenizer {tokenizer_json}: {first}") from None
    for name in _TOKENIZER_JSON_FILES:
        path = src / name
        if not path.is_file():
            continue
        read_json_object(path, "the tokenizer file")


def _unwrap(model):
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError("save/load_model_checkpoint handle one model chunk (no virtual pipeline stages)")
        model = model[0]
    return unwrap_model(model)


def save_model_checkpoint(model, model_cfg: ModelConfig, out_dir, iteration: int = 0,
                          tokenizer_dir=None, source: Optional[dict] = None) -> Path:
    """Save this rank's part of ``model`` into ``out_dir`` through the format's one writer.
    Collective: every rank calls it with its own pipeline stage / tensor shard. ``source``: the
    weights' provenance. Returns the iteration directory."""
    return write_checkpoint(out_dir, iteration, {"model": _unwrap(model).sharded_state_dict()}, model_cfg,
                            source=source or {}, tokenizer_dir=tokenizer_dir)


def resolve_iteration_dir(ckpt_dir, iteration: Optional[int] = None) -> Path:
    """``DIR/iter_{iteration}``, or what ``latest`` names; ``DIR`` itself if it is a dist checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if iteration is not None:
        path = ckpt_dir / iteration_name(iteration)
        if not path.exists():
            available = sorted(int(p.name[len("iter_"):]) for p in ckpt_dir.glob("iter_*")
                               if p.is_dir() and p.name[len("iter_"):].isdigit())
            raise ConversionError(f"--iteration {iteration}: {ckpt_dir} has no {path.name}; available iterations: "
                                  + (", ".join(map(str, available)) or "none"))
    else:
        path = latest_iteration_dir(ckpt_dir)
        if path is None and (ckpt_dir / "metadata.json").is_file():
            return ckpt_dir
        if path is None:
            raise ConversionError(f"no {LATEST_FILE} file in {ckpt_dir}")
    if not (path / "metadata.json").is_file():
        raise ConversionError(f"{path} is not a complete distributed checkpoint (no metadata.json)")
    return path


def load_model_checkpoint(model, ckpt_dir, iteration: Optional[int] = None, verify: bool = True) -> dict:
    """Load the model state of ``ckpt_dir`` (its ``latest`` iteration) into this rank's ``model``.

    Collective. Works at any TP/PP: each rank reads its own shards of the global tensors.
    Returns the checkpoint's metadata (``megatron_pref_config.json``). ``verify``: compare the
    files with their recorded checksums first (``--no-verify-checksums`` turns it off).
    """
    metadata = read_checkpoint_metadata(ckpt_dir)
    module = _unwrap(model)
    path = resolve_iteration_dir(ckpt_dir, iteration)
    verify_checksums(path, "--load", enabled=verify, error=ConversionError)
    load_sharded({"model": module.sharded_state_dict()}, path, {"model": module}, error=ConversionError)
    return metadata


def check_dist_checkpoint(ckpt_dir, iteration: Optional[int] = None) -> Path:
    """Read the tensor metadata (names, shapes; no data) of the checkpoint's iteration directory:
    ConversionError (one line) if megatron-core cannot. Returns that directory."""
    from megatron.core import dist_checkpointing

    path = resolve_iteration_dir(ckpt_dir, iteration)
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(path))
    except Exception as exc:  # a damaged metadata.json / .metadata: megatron-core's own errors vary
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConversionError(f"{path} is not a readable distributed checkpoint: {first}") from None
    if not metadata:
        raise ConversionError(f"{path} is a distributed checkpoint without tensors")
    return path


def checkpoint_tensor_dtype(ckpt_dir, key: str = "embedding.word_embeddings.weight") -> torch.dtype:
    """The dtype the checkpoint stores ``key`` in (read from the metadata, no tensor data)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(resolve_iteration_dir(ckpt_dir)))
    if key not in metadata:
        key = next(iter(metadata))
    return metadata[key].dtype
