"""The checkpoint layout that ``pretrain_pref.py --load`` reads and the converters write.

::

    DIR/
      latest                      text: the iteration directory's name, e.g. "iter_0000000"
      megatron_pref_config.json   {"model": ModelConfig.to_dict(), "format_version": 1, "source": {...}}
      tokenizer/                  the tokenizer files (tokenizer.json, tokenizer_config.json, ...)
      iter_0000000/               megatron-core dist_checkpointing checkpoint (torch_dist):
                                  {"model": model.sharded_state_dict()}; training adds
                                  "optimizer", "scheduler", "rng", "consumed_pairs" to later ones

The model state is a *sharded* state dict: global tensors with their TP/PP placement, so the
checkpoint loads at any tensor/pipeline parallel size. Vocabulary tensors carry
``allow_shape_mismatch``: a different vocab padding on load is filled with zeros.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_pref.atomic import write_json_atomic, write_text_atomic  # noqa: F401  (re-exported)
from megatron_pref.checksums import verify_checksums, write_checksums
from megatron_pref.convert.errors import ConversionError, read_json_object
from megatron_pref.model import ModelConfig, unwrap_model

CONFIG_FILE = "megatron_pref_config.json"
LATEST_FILE = "latest"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
# Every save (training or conversion) stores a fresh random id in its iteration directory's
# common state (and lists it in the config's "checkpoints"): a reference pinned by it notices
# a re-save or re-conversion into the same directory, which names and sizes alone would not.
CHECKPOINT_ID_KEY = "checkpoint_id"

# Files that make up a Hugging Face tokenizer (what AutoTokenizer.from_pretrained reads).
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


def iteration_name(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def tokenizer_files(src_dir) -> list:
    src = Path(src_dir)
    return [src / name for name in TOKENIZER_FILE_NAMES if (src / name).is_file()]


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


def copy_tokenizer(src_dir, dst_dir) -> list:
    """Copy the tokenizer files of ``src_dir`` into ``dst_dir``; returns the names copied."""
    files = tokenizer_files(src_dir)
    if files:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, Path(dst_dir) / f.name)
    return [f.name for f in files]


def new_checkpoint_id() -> str:
    """A unique id for one save, the same on every rank (rank 0 draws it). Collective."""
    import uuid

    ident = [uuid.uuid4().hex if _rank() == 0 else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(ident, src=0)
    return ident[0]


def read_checkpoint_id(iteration_dir) -> Optional[str]:
    """The id stored in a dist checkpoint's common state (None: saved before ids existed)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(iteration_dir))
    return common.get(CHECKPOINT_ID_KEY) if isinstance(common, dict) else None


def _unwrap(model):
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError("save/load_model_checkpoint handle one model chunk (no virtual pipeline stages)")
        model = model[0]
    return unwrap_model(model)


def save_model_checkpoint(model, model_cfg: ModelConfig, out_dir, iteration: int = 0,
                          tokenizer_dir=None, extra_metadata: Optional[dict] = None) -> Path:
    """Save this rank's part of ``model`` into ``out_dir`` in the layout above. Collective.

    Every rank calls it with its own pipeline stage / tensor shard; rank 0 writes the JSON
    config, the tokenizer copy and, last, ``latest`` (so ``latest`` names only complete
    checkpoints). Returns the iteration directory.
    """
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    ckpt_dir = out / iteration_name(iteration)
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    checkpoint_id = new_checkpoint_id()
    dist_checkpointing.save({"model": _unwrap(model).sharded_state_dict(), CHECKPOINT_ID_KEY: checkpoint_id},
                            str(ckpt_dir))
    write_checksums(ckpt_dir)
    if _rank() == 0:
        metadata = {"model": model_cfg.to_dict(), "format_version": FORMAT_VERSION, "source": {},
                    "checkpoints": {ckpt_dir.name: checkpoint_id}}
        metadata.update(extra_metadata or {})
        write_json_atomic(out / CONFIG_FILE, metadata)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, out / TOKENIZER_DIR)
        write_text_atomic(out / LATEST_FILE, iteration_name(iteration) + "\n")
    _barrier()
    return ckpt_dir


def read_checkpoint_metadata(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{ckpt_dir} is not a megatron_pref checkpoint (no {CONFIG_FILE})")
    metadata = read_json_object(path, "the checkpoint config")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ConversionError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    return metadata


def read_model_config(ckpt_dir) -> ModelConfig:
    """The architecture stored with a checkpoint (``--load DIR`` needs no architecture flags)."""
    metadata = read_checkpoint_metadata(ckpt_dir)
    path = Path(ckpt_dir) / CONFIG_FILE
    if not isinstance(metadata.get("model"), dict):
        raise ConversionError(f"{path} has no \"model\" object")
    try:
        cfg = ModelConfig.from_dict(metadata["model"])
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"bad model config in {path}: {exc}") from None
    return cfg


def resolve_iteration_dir(ckpt_dir, iteration: Optional[int] = None) -> Path:
    """``DIR/<latest>`` (or ``DIR/iter_{iteration}``); ``DIR`` itself if it is a dist checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if iteration is not None:
        path = ckpt_dir / iteration_name(iteration)
        if not path.exists():
            available = sorted(int(p.name[len("iter_"):]) for p in ckpt_dir.glob("iter_*")
                               if p.is_dir() and p.name[len("iter_"):].isdigit())
            raise ConversionError(f"--iteration {iteration}: {ckpt_dir} has no {path.name}; available iterations: "
                                  + (", ".join(map(str, available)) or "none"))
    elif (ckpt_dir / LATEST_FILE).is_file():
        name = (ckpt_dir / LATEST_FILE).read_text().strip()
        path = ckpt_dir / (iteration_name(int(name)) if name.isdigit() else name)
    elif (ckpt_dir / "metadata.json").is_file():
        return ckpt_dir
    else:
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
    load_sharded({"model": module.sharded_state_dict()}, path, {"model": module})
    return metadata


# Transformer Engine modules carry an ``_extra_state`` (FP8 scaling metadata). A checkpoint
# written without TE (on CPU, or by the converters, which drop it) has none: TE then starts
# from fresh metadata, as a new model does. Every other key must be in the checkpoint.
EXTRA_STATE_SUFFIX = "_extra_state"


def _checkpoint_failure(exc: BaseException) -> str:
    """The first rank's underlying error: torch DCP's own message only lists the ranks."""
    failures = getattr(exc, "failures", None) or {}
    cause = next(iter(failures.values()), None)
    cause = cause[0] if isinstance(cause, tuple) else cause
    if not isinstance(cause, BaseException):
        cause = exc
    text = str(cause).strip().splitlines()
    if not text and isinstance(cause, EOFError):
        text = ["a file of the checkpoint ends early (truncated?)"]
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


def load_sharded(request: dict, path, modules: dict, error: type = ConversionError) -> dict:
    """Load the sharded ``request`` from the dist checkpoint ``path``; ``modules`` maps request
    keys to the modules their state goes into. Returns the loaded state dict. Collective.

    Keys the checkpoint lacks are dropped from the request before reading (megatron-core's
    RETURN_UNEXPECTED); only TE ``_extra_state`` objects may be lacking, anything else raises
    ``error`` naming the keys. What the checkpoint holds beyond the request (an optimizer, in a
    weights-only load) is not read.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        loaded, _, not_in_checkpoint = dist_checkpointing.load(request, str(path),
                                                               strict=StrictHandling.RETURN_UNEXPECTED)
    except (CheckpointingException, CheckpointException) as exc:  # e.g. a tensor of another shape: one line
        raise error(f"{path}: cannot load the checkpoint's tensors ({_checkpoint_failure(exc)})") from None
    lacking = sorted(k for k in not_in_checkpoint if not k.endswith(EXTRA_STATE_SUFFIX))
    if lacking:
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise error(f"{path} lacks {len(lacking)} tensor(s) this model needs: {shown}")
    for key, module in modules.items():
        result = module.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
        if missing or result.unexpected_keys:
            raise error(f"{path}: the state does not fit the model: missing {missing[:5]}, "
                        f"unexpected {list(result.unexpected_keys)[:5]}")
    return loaded


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
