"""The checkpoint format that training (``checkpointing.py``) and the converters (``convert/``)
share: file names, metadata, the ``latest`` pointer, the one writer and the one sharded loader.

::

    DIR/latest                     name of the newest *complete* iteration directory
    DIR/megatron_pref_config.json  {"model": ModelConfig.to_dict(), "format_version": 1,
                                    "source": {...}, "checkpoints": {"iter_0000100": id, ...}}
    DIR/tokenizer/                 tokenizer files, when known
    DIR/iter_0000100/              megatron-core dist_checkpointing checkpoint (torch_dist)

``source`` is the provenance of the weights (for a Hugging Face conversion: its ``hf_config``,
``hf_dir``, ``generation_config``; training adds ``"training"``); it travels with the weights
through every save and resume, so an export of any later checkpoint keeps e.g. the special
token ids.

Writes are atomic (:func:`write_checkpoint`): every rank writes into ``iter_XXXXXXX.tmp``, then
rank 0 renames it and only then rewrites ``latest``. A save killed midway (or out of disk)
leaves a ``.tmp`` directory that is ignored (and removed by the next save); ``latest`` stays on
the last complete checkpoint.

The model state is a *sharded* state dict: global tensors with their TP/PP placement, so the
checkpoint loads at any tensor/pipeline parallel size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_pref.atomic import write_json_atomic, write_text_atomic
from megatron_pref.checksums import write_checksums
from megatron_pref.errors import UserError
from megatron_pref.model import ModelConfig

CONFIG_FILE = "megatron_pref_config.json"
LATEST_FILE = "latest"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
# Every save (training or conversion) stores a fresh random id in its iteration directory's
# common state (and lists it in the config's "checkpoints"): a reference pinned by it notices
# a re-save or re-conversion into the same directory, which names and sizes alone would not.
CHECKPOINT_ID_KEY = "checkpoint_id"
# What megatron-core's torch_dist format writes into every checkpoint directory.
DIST_CHECKPOINT_FILES = ("metadata.json", ".metadata", "common.pt")
# Transformer Engine modules carry an ``_extra_state`` (FP8 scaling metadata). A checkpoint
# written without TE (on CPU, or by the converters, which drop it) has none: TE then starts
# from fresh metadata, as a new model does. Every other key must be in the checkpoint.
EXTRA_STATE_SUFFIX = "_extra_state"
# Files that make up a Hugging Face tokenizer (what AutoTokenizer.from_pretrained reads).
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


class CheckpointFormatError(UserError):
    """A checkpoint directory that cannot be read or written as asked: one line naming it."""


def global_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def iteration_name(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


def read_json_object(path, what: str = "", error: type = CheckpointFormatError) -> dict:
    """The JSON object in ``path``, or one ``error`` naming the file (unreadable, not JSON, or
    JSON that is not an object). ``what`` prefixes the file in the message."""
    label = f"{what} {path}" if what else str(path)
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise error(f"cannot parse {label}: {exc}") from None
    if not isinstance(value, dict):
        raise error(f"{label} is not a JSON object (got {type(value).__name__})")
    return value


# --- metadata ---------------------------------------------------------------------------------

def read_checkpoint_metadata(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointFormatError(f"{ckpt_dir} is not a megatron_pref checkpoint (no {CONFIG_FILE})")
    metadata = read_json_object(path, "the checkpoint config")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    return metadata


def read_model_config(ckpt_dir) -> ModelConfig:
    """The architecture stored with a checkpoint (``--load DIR`` needs no architecture flags)."""
    metadata = read_checkpoint_metadata(ckpt_dir)
    path = Path(ckpt_dir) / CONFIG_FILE
    if not isinstance(metadata.get("model"), dict):
        raise CheckpointFormatError(f"{path} has no \"model\" object")
    try:
        cfg = ModelConfig.from_dict(metadata["model"])
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"bad model config in {path}: {exc}") from None
    return cfg


def read_source(ckpt_dir) -> dict:
    """The provenance of the checkpoint's weights (``source``, without what training added)."""
    source = read_checkpoint_metadata(ckpt_dir).get("source") or {}
    if not isinstance(source, dict):
        raise CheckpointFormatError(f"{Path(ckpt_dir) / CONFIG_FILE}: \"source\" must be a JSON object, "
                                    f"got {source!r:.60}")
    return {k: v for k, v in source.items() if k != "training"}


def describe_source(source: dict) -> str:
    """A model named by its provenance, for messages."""
    if source.get("hf_dir"):
        return f"{source.get('architecture') or source.get('model_type') or 'a model'} converted from {source['hf_dir']}"
    return "a model initialised by megatron-pref" if not source else json.dumps(source, sort_keys=True)[:120]


def tokenizer_files(src_dir) -> list:
    src = Path(src_dir)
    return [src / name for name in TOKENIZER_FILE_NAMES if (src / name).is_file()]


def copy_tokenizer(src_dir, dst_dir) -> list:
    """Copy the tokenizer files of ``src_dir`` into ``dst_dir``; returns the names copied."""
    files = tokenizer_files(src_dir)
    if files:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, Path(dst_dir) / f.name)
    return [f.name for f in files]


# --- content identity -------------------------------------------------------------------------

def new_checkpoint_id() -> str:
    """A unique id for one save, the same on every rank (rank 0 draws it). Collective."""
    import uuid

    ident = [uuid.uuid4().hex if global_rank() == 0 else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(ident, src=0)
    return ident[0]


def read_checkpoint_id(iteration_dir) -> Optional[str]:
    """The id stored in a dist checkpoint's common state (None: saved before ids existed)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(iteration_dir))
    return common.get(CHECKPOINT_ID_KEY) if isinstance(common, dict) else None


def checkpoint_identity(iteration_dir) -> str:
    """The id stored by the save or conversion that wrote ``iteration_dir``; for checkpoints
    written before ids existed, a digest of its file names, sizes and metadata."""
    try:
        ident = read_checkpoint_id(iteration_dir)
    except Exception as exc:  # a truncated or foreign common.pt: whatever torch.load raises
        raise CheckpointFormatError(f"{iteration_dir}/common.pt cannot be read ({type(exc).__name__})") from None
    return ident or "legacy:" + _legacy_fingerprint(Path(iteration_dir))


def _legacy_fingerprint(path: Path) -> str:
    digest = hashlib.sha256(str(path.name).encode())
    for f in sorted(path.rglob("*")):
        if f.is_file():
            digest.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
            if f.name in DIST_CHECKPOINT_FILES:
                digest.update(f.read_bytes())
    return digest.hexdigest()


# --- latest -----------------------------------------------------------------------------------

def latest_iteration_dir(ckpt_dir, flag: str = "--load") -> Optional[Path]:
    """The iteration directory ``latest`` names (an ``iter_*`` name, or Megatron-LM's plain
    iteration number), or None when there is no ``latest``. The one resolver of ``latest``."""
    latest = Path(ckpt_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"{flag} {ckpt_dir}: cannot read {LATEST_FILE}: {exc}") from None
    path = Path(ckpt_dir) / (iteration_name(int(name)) if name.isdigit() else name)
    if not name or not path.is_dir():
        raise CheckpointFormatError(f"{flag} {ckpt_dir}: {LATEST_FILE} names {name!r}, which does not exist")
    return path


# --- the one writer ---------------------------------------------------------------------------

def write_checkpoint(save_dir, iteration: int, sharded_state: dict, model_cfg: ModelConfig, source: dict,
                     tokenizer_dir=None, flag: str = "--save") -> Path:
    """Save ``sharded_state`` as ``save_dir/iter_{iteration}``, atomically. Collective.

    Every rank writes its shards into ``iter_XXXXXXX.tmp``, the ranks record the checksums of
    its files (``checksums.json``, verified by every load); rank 0 then renames it, writes the
    config (``source``: the weights' provenance; the other iterations' ids are kept) and the
    tokenizer, and last ``latest``. Free space is checked first; a full disk is one line naming
    ``flag`` and the free space, with ``latest`` still on the last complete checkpoint."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    save_dir = Path(save_dir)
    final = save_dir / iteration_name(iteration)
    tmp = save_dir / (final.name + TMP_SUFFIX)
    if global_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(f"iter_*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
    needed = _agreed(expected_bytes(sharded_state), sum)
    problem = _agreed(_space_problem(save_dir, needed, flag) if global_rank() == 0 else None)
    if problem:
        raise CheckpointFormatError(problem)
    if global_rank() == 0:
        tmp.mkdir()
    barrier()
    checkpoint_id = sharded_state[CHECKPOINT_ID_KEY] = new_checkpoint_id()
    try:
        dist_checkpointing.save(sharded_state, str(tmp))
    except (Exception, CheckpointException) as exc:
        if not _out_of_space(exc, save_dir, needed):
            raise
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointFormatError(_no_space_message(save_dir, needed, flag, failed=True)) from None
    write_checksums(tmp)  # every file, before the directory becomes visible (barriers inside)
    if global_rank() == 0:
        # The iteration directory is complete here and not yet visible.
        if final.exists():  # re-saving the same iteration (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        checkpoints = {}
        if (save_dir / CONFIG_FILE).is_file():  # the same model's earlier iterations (see check_save_dir)
            checkpoints = dict(read_checkpoint_metadata(save_dir).get("checkpoints") or {})
        write_json_atomic(save_dir / CONFIG_FILE, {
            "model": model_cfg.to_dict(), "format_version": FORMAT_VERSION, "source": dict(source),
            "checkpoints": {**checkpoints, final.name: checkpoint_id}})
        if tokenizer_dir and not (save_dir / TOKENIZER_DIR).exists():
            copy_tokenizer(tokenizer_dir, save_dir / TOKENIZER_DIR)
        write_text_atomic(save_dir / LATEST_FILE, final.name + "\n")
    barrier()
    return final


def check_save_dir(save_dir, source: dict, loaded_from=None, flag: str = "--save") -> None:
    """Refuse to save weights of provenance ``source`` into a directory that holds another
    model's checkpoint: its config (and so every export of it) would mix the two. Saving the
    same model again (a resume, a re-run) is fine."""
    save_dir = Path(save_dir)
    if not (save_dir / CONFIG_FILE).is_file():
        return
    try:
        stored = read_source(save_dir)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{flag} {save_dir}: {exc}") from None
    if stored != {k: v for k, v in source.items() if k != "training"}:
        ours = f"--load {loaded_from}: {describe_source(source)}" if loaded_from else describe_source(source)
        raise CheckpointFormatError(f"{flag} {save_dir} holds a checkpoint of another model ({describe_source(stored)}) "
                                    f"than this run's ({ours}); save into another directory")


# --- disk space -------------------------------------------------------------------------------

def expected_bytes(sharded_state: dict) -> int:
    """Bytes of tensor data this rank writes (main replicas only): what the save needs, less
    the small metadata and pickled objects."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    total = 0
    for value in nested_values(sharded_state):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and is_main_replica(value.replica_id):
            data = value.data
            total += data.numel() * data.element_size() if isinstance(data, torch.Tensor) else 0
    return total


def _agreed(value, reduce=None):
    """Rank 0's ``value`` on every rank (or ``reduce`` of all ranks' values). Collective."""
    if not torch.distributed.is_initialized():
        return value
    if reduce is not None:
        values = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(values, value)
        return reduce(values)
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _free_bytes(save_dir: Path) -> int:
    return shutil.disk_usage(save_dir).free


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _no_space_message(save_dir: Path, needed: int, flag: str, failed: bool) -> str:
    latest = latest_iteration_dir(save_dir, flag)
    what = "no space left on its device" if failed else "not enough free space on its device"
    return (f"{flag} {save_dir}: {what} ({_size(_free_bytes(save_dir))} free, the checkpoint needs about "
            f"{_size(needed)}); the last complete checkpoint is {latest if latest else 'none'}")


def _space_problem(save_dir: Path, needed: int, flag: str) -> Optional[str]:
    return _no_space_message(save_dir, needed, flag, failed=False) if _free_bytes(save_dir) < needed else None


def _out_of_space(exc: BaseException, save_dir: Path, needed: int) -> bool:
    """Whether a failed save ran out of disk: ENOSPC anywhere in the chain (megatron-core and
    torch DCP wrap it, the latter per rank in ``failures``; megatron-core's async writer keeps
    only its text: "Worker failure: [Errno 28] ..."), or torch's zip writer's error
    ("unexpected pos") on a disk left (all but) full."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:  # failures hold (exception, traceback)
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if f"[Errno {errno.ENOSPC}]" in str(e):  # megatron-core 0.16.1 re-raises its writer's error as text
            return True
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.extend(failure if isinstance(failure, tuple) else [failure])
        todo.extend([e.__cause__, e.__context__])
    try:
        return _free_bytes(save_dir) < 2**20 + needed // 100
    except OSError:
        return False


# --- the one sharded loader -------------------------------------------------------------------

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


def load_sharded(request: dict, path, modules: dict, error: type = CheckpointFormatError) -> dict:
    """Load the sharded ``request`` from the dist checkpoint ``path``; ``modules`` maps request
    keys to the modules their state goes into. Returns the loaded state dict. Collective. Every
    load of checkpoint tensors (training, reference, conversion) goes through here.

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
