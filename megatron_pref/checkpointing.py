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

import contextlib
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_pref.atomic import write_json_atomic, write_text_atomic
from megatron_pref.convert.checkpoint_io import (CHECKPOINT_ID_KEY, CONFIG_FILE, FORMAT_VERSION, LATEST_FILE,
                                                 TOKENIZER_DIR, copy_tokenizer, iteration_name, load_sharded,
                                                 new_checkpoint_id, read_checkpoint_id, read_checkpoint_metadata)
from megatron_pref.convert.checkpoint_io import read_model_config as _stored_model_config
from megatron_pref.convert.errors import ConversionError, read_json_object
from megatron_pref.errors import UserError
from megatron_pref.model import ModelConfig, unwrap_model

TMP_SUFFIX = ".tmp"


class CheckpointError(UserError):
    pass


@dataclass
class TrainState:
    iteration: int = 0
    consumed_pairs: int = 0
    epoch: int = 0
    # Where the run's reference weights come from: a checkpoint pinned to one iteration
    # directory and its id (see pin_checkpoint), or the seeded initial policy. Saved inside the
    # checkpoint so a resumed run keeps the same reference.
    reference_source: Optional[dict] = None
    # State a loss keeps across steps (bco_pair's running mean reward), saved and restored as is.
    loss_state: dict = field(default_factory=dict)


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


def latest_iteration_dir(load_dir, flag: str = "--load") -> Optional[Path]:
    """The complete checkpoint ``latest`` names, or None when there is none."""
    latest = Path(load_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{flag} {load_dir}: cannot read {LATEST_FILE}: {exc}") from None
    path = Path(load_dir) / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{flag} {load_dir}: {LATEST_FILE} names {name!r}, which does not exist")
    return path


def is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_format(distributed: bool, fully_reshardable: bool = False, bucket_size: Optional[int] = None) -> dict:
    """How the optimizer state is laid out in a checkpoint (stored in its train state).

    The distributed optimizer's state is 'dp_reshardable' (Megatron-LM's default: one tensor per
    contiguous buffer; loads at another DP size only) or, with
    ``--dist-ckpt-optim-fully-reshardable``, 'fully_reshardable' (gathered per parameter; loads
    at any layout). megatron-core 0.16.1's own default, 'fully_sharded_model_space', no longer
    saves. The plain optimizer's state is per parameter and loads at any layout.
    'dp_reshardable' stores one tensor per gradient bucket, so it also needs the same bucket
    size (``engine.ddp_bucket_size``: set by --overlap-grad-reduce and, above DP 40, the DP size).
    """
    if not distributed:
        return {"distributed": False, "sharding": None}
    if fully_reshardable:
        return {"distributed": True, "sharding": "fully_reshardable"}
    return {"distributed": True, "sharding": "dp_reshardable", "bucket_size": bucket_size}


def _optimizer_metadata(fmt: dict) -> Optional[dict]:
    return {"distrib_optim_sharding_type": fmt["sharding"]} if fmt["distributed"] else None


def _saved_optimizer_step(saved_optimizer, load_dir) -> float:
    """The optimizer step count stored in the checkpoint's param groups (0 if none)."""
    steps = set()

    def visit(node) -> None:
        if isinstance(node, dict):
            groups = node.get("param_groups")
            for group in groups if isinstance(groups, list) else []:
                # Groups without parameters never step (TE's Adam leaves them behind).
                if isinstance(group, dict) and group.get("step") is not None and group.get("params", [0]):
                    steps.add(float(group["step"]))
            for value in node.values():
                visit(value)

    visit(saved_optimizer)
    if len(steps) > 1:
        raise CheckpointError(f"--load {load_dir}: its optimizer param groups disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _unstepped_distributed_torch_adams(optimizer) -> list:
    """torch Adam(W)s inside distributed optimizers, before their first step (TE's and apex's
    fused Adam, megatron-core's choice on GPUs, are not among them)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [w.optimizer for w in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(w, DistributedOptimizer) and type(w.optimizer) in (torch.optim.Adam, torch.optim.AdamW)
            and not w.optimizer.state]


def _allocate_adam_state(adams: list) -> None:
    """Zero Adam state: megatron-core 0.16.1 reads the step from it when it builds the loading
    request for a distributed optimizer over torch's Adam; the load overwrites the moments."""
    for adam in adams:
        for group in adam.param_groups:
            for param in group["params"]:
                adam.state[param] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(param),
                                     "exp_avg_sq": torch.zeros_like(param)}


@contextlib.contextmanager
def _step_kept_out_of_state_copies(optimizer, adams: list):
    """megatron-core 0.16.1 copies every state entry of a parameter from the checkpoint's
    per-parameter tensors; torch's Adam keeps a 'step' entry that the fully-reshardable format
    does not carry (KeyError). Hide it from that copy; ``_set_adam_step`` sets it afterwards."""
    patched = []
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(wrapper, "optimizer", None) not in adams:
            continue
        original = wrapper._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _wrapper=wrapper, _original=original):
            if "step" in tensors:
                return _original(model_param, tensors)
            group_index, group_order = _wrapper.model_param_group_index_map[model_param]
            state = _wrapper.optimizer.state[_wrapper.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                return _original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        wrapper._set_main_param_and_optimizer_states = set_states
        patched.append(wrapper)
    try:
        yield
    finally:
        for wrapper in patched:
            del wrapper._set_main_param_and_optimizer_states  # back to the class's method


def _set_adam_step(adams: list, step: float) -> None:
    for adam in adams:
        for group in adam.param_groups:
            # Where torch keeps the step: on the device for the fused kernel, on the host otherwise.
            on_device = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                adam.state[param]["step"] = torch.tensor(step, dtype=torch.float32,
                                                         device=param.device if on_device else "cpu")


def check_optimizer_resume(train_state: dict, distributed: bool, layout: dict,
                           bucket_size: Optional[int] = None) -> Optional[str]:
    """Why the optimizer state saved with ``train_state`` cannot be resumed with this optimizer
    at this layout and gradient bucket size (None: it can)."""
    saved = train_state.get("optimizer_format") or optimizer_format(False)
    saved_layout = train_state.get("layout")
    if saved["distributed"] != distributed:
        return (f"its optimizer state was saved {'with' if saved['distributed'] else 'without'} "
                f"--use-distributed-optimizer; run {'with' if saved['distributed'] else 'without'} it, "
                "or pass --no-load-optim to start the optimizer afresh")
    changed = {k: (saved_layout or {}).get(k) for k in ("tp", "pp", "vpp") if (saved_layout or {}).get(k) != layout[k]}
    if saved["sharding"] == "dp_reshardable" and changed:
        was = ", ".join(f"{k}={v}" for k, v in changed.items())
        return (f"its distributed-optimizer state loads only at the layout it was saved at ({was}); "
                "load it at that layout, pass --no-load-optim, or save with --dist-ckpt-optim-fully-reshardable")
    if saved["sharding"] == "dp_reshardable" and saved.get("bucket_size") != bucket_size:
        return (f"its distributed-optimizer state was saved with gradient buckets of {saved.get('bucket_size') or 'all'} "
                f"parameters and this run uses {bucket_size or 'all'} (--overlap-grad-reduce sets them, and "
                "above 40 data-parallel ranks so does their number); resume with the same settings, pass "
                "--no-load-optim, or save with --dist-ckpt-optim-fully-reshardable")
    return None


def _bucket_size(model_chunks: list) -> Optional[int]:
    config = getattr(model_chunks[0], "ddp_config", None)
    return config.bucket_size if config is not None else None


def save_checkpoint(save_dir, model_chunks: list, optimizer, scheduler, state: TrainState,
                    model_cfg: ModelConfig, tokenizer_dir: Optional[str] = None,
                    run_metadata: Optional[dict] = None, optim_fully_reshardable: bool = False,
                    run_record: Optional[dict] = None) -> Path:
    """Save everything needed to resume. Collective over all ranks.

    ``run_record``: the settings a resume must keep (megatron_pref.resume), stored in the train
    state, which is readable before any process group (read_train_state)."""
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
    fmt = optimizer_format(is_distributed_optimizer(optimizer), optim_fully_reshardable, _bucket_size(model_chunks))
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=_optimizer_metadata(fmt))
    sharded["rng"] = _rng_sharded_object()
    sharded["train_state"] = {
        "iteration": state.iteration, "consumed_pairs": state.consumed_pairs, "epoch": state.epoch,
        "reference_source": state.reference_source, "loss_state": dict(state.loss_state),
        "scheduler": scheduler.state_dict(), "layout": _layout(), "optimizer_format": fmt,
        "run": run_record,
    }
    checkpoint_id = sharded[CHECKPOINT_ID_KEY] = new_checkpoint_id()
    dist_checkpointing.save(sharded, str(tmp))
    _barrier()
    if _rank() == 0:
        if final.exists():  # re-saving the same iteration (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        metadata = {"model": model_cfg.to_dict(), "format_version": FORMAT_VERSION,
                    "source": {"training": run_metadata or {}}}
        config_path = save_dir / CONFIG_FILE
        checkpoints = {}
        if config_path.is_file():  # keep the conversion's provenance and the other iterations' ids
            try:
                previous = read_checkpoint_metadata(save_dir)
                metadata["source"] = {**previous.get("source", {}), **metadata["source"]}
                checkpoints = dict(previous.get("checkpoints") or {})
            except ValueError:
                pass
        metadata["checkpoints"] = {**checkpoints, final.name: checkpoint_id}
        write_json_atomic(config_path, metadata)
        if tokenizer_dir and not (save_dir / TOKENIZER_DIR).exists():
            copy_tokenizer(tokenizer_dir, save_dir / TOKENIZER_DIR)
        write_text_atomic(save_dir / LATEST_FILE, final.name + "\n")
    _barrier()
    return final


def read_model_config(load_dir, flag: str = "--load") -> ModelConfig:
    try:
        return _stored_model_config(load_dir)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{flag} {load_dir}: {exc}") from None


def read_train_state(load_dir) -> Optional[dict]:
    """The train state of the checkpoint ``latest`` names (None for a weights-only checkpoint).
    Reads only its small common part: cheap enough for flag validation."""
    return _common_state_at(validate_checkpoint_dir(load_dir)).get("train_state")


def _common_state_at(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:  # a truncated or foreign common.pt: whatever torch.load raises
        raise CheckpointError(f"{path}/common.pt cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return common if isinstance(common, dict) else {}


# What megatron-core's torch_dist format writes into every checkpoint directory.
_DIST_CHECKPOINT_FILES = ("metadata.json", ".metadata", "common.pt")


def validate_checkpoint_dir(load_dir, flag: str = "--load") -> Path:
    """Cheap checks before any model is built: one clear line on a bad --load / --ref-load."""
    path = latest_iteration_dir(load_dir, flag)
    if path is None:
        raise CheckpointError(f"{flag} {load_dir}: no '{LATEST_FILE}' file; not a checkpoint directory")
    read_model_config(load_dir, flag)
    for name in _DIST_CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{flag} {load_dir}: {path.name} is not a complete dist checkpoint (no {name})")
    try:
        read_json_object(path / "metadata.json")
    except ConversionError as exc:
        raise CheckpointError(f"{flag} {load_dir}: {exc}") from None
    return path


def load_checkpoint(load_dir, model_chunks: list, optimizer=None, scheduler=None,
                    load_optimizer: bool = True, load_rng: bool = True) -> Optional[TrainState]:
    """Load weights (always) and, when the checkpoint is a training one, the optimizer,
    scheduler, RNG and position in the data. Returns the TrainState, or None for a
    weights-only checkpoint (e.g. one converted from Hugging Face): training starts at 0.
    """
    path = validate_checkpoint_dir(load_dir)
    train_state = _common_state_at(path).get("train_state")

    # Sharded tensors are matched by their global keys, so the chunk grouping may differ.
    request = model_sharded_state_dict(model_chunks)
    resume = train_state is not None
    if resume and load_optimizer and optimizer is not None:
        problem = check_optimizer_resume(train_state, is_distributed_optimizer(optimizer), _layout(),
                                         _bucket_size(model_chunks))
        if problem:
            raise CheckpointError(f"--load {load_dir}: {problem}")
        saved = train_state.get("optimizer_format") or optimizer_format(False)
        torch_adams = _unstepped_distributed_torch_adams(optimizer)
        _allocate_adam_state(torch_adams)
        request["optimizer"] = optimizer.sharded_state_dict(request, is_loading=True, metadata=_optimizer_metadata(saved))
    saved_layout = (train_state or {}).get("layout") or {}
    # Checkpoints from before the device type was recorded: compare what they have.
    same_layout = resume and all(saved_layout.get(k, v) == v if k == "device" else saved_layout.get(k) == v
                                 for k, v in _layout().items())
    if resume and load_rng and same_layout:
        request["rng"] = _rng_sharded_object()
    loaded = _load_sharded(request, path, model_chunks)
    if optimizer is not None and "optimizer" not in request:
        # The optimizer copied the weights when it was built (bf16: into its fp32 main params)
        # and copies them back at every step: refresh that copy from the loaded weights.
        optimizer.reload_model_params()
    if not resume:
        return None
    if "optimizer" in request:
        # no_grad: the distributed optimizer copies into views of fp32 parameters.
        with torch.no_grad(), _step_kept_out_of_state_copies(optimizer, torch_adams):
            optimizer.load_state_dict(loaded["optimizer"])
        if torch_adams:
            # megatron-core 0.16.1 takes these optimizers' per-parameter steps from the request
            # (the zeros allocated above); the checkpoint's step count is in its param groups.
            _set_adam_step(torch_adams, _saved_optimizer_step(loaded["optimizer"], load_dir))
    if scheduler is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    if "rng" in request:
        _restore_rng(loaded["rng"])
    return TrainState(iteration=train_state["iteration"], consumed_pairs=train_state["consumed_pairs"],
                      epoch=train_state.get("epoch", 0), reference_source=train_state.get("reference_source"),
                      loss_state=dict(train_state.get("loss_state") or {}))


def _load_sharded(request: dict, path: Path, model_chunks: list) -> dict:
    """The request loaded into the chunks (TE ``_extra_state`` may be absent, see load_sharded)."""
    modules = {key: unwrap_model(c) for key, c in zip(_chunk_keys(model_chunks), model_chunks)}
    return load_sharded(request, path, modules, error=CheckpointError)


def load_weights_only(load_dir, model_chunks: list, pinned: Optional[dict] = None) -> None:
    """Reference / evaluation models: weights only, whatever else the checkpoint holds.

    ``pinned`` (from pin_checkpoint): load exactly that iteration, after checking its id;
    without it, the iteration ``latest`` names."""
    if pinned is None:
        path = validate_checkpoint_dir(load_dir)
    else:
        problem = pinned_checkpoint_problem(pinned)
        if problem:
            raise CheckpointError(problem)
        path = Path(pinned["path"]) / pinned["iteration"]
    _load_sharded(model_sharded_state_dict(model_chunks), path, model_chunks)


def pin_checkpoint(load_dir, flag: str = "--load") -> dict:
    """The iteration ``latest`` names now, and its id: a reference that later saves into the
    same directory (``--load X --save X``) cannot move."""
    path = validate_checkpoint_dir(load_dir, flag)
    return {"kind": "checkpoint", "path": os.path.abspath(load_dir), "iteration": path.name,
            "id": checkpoint_identity(path)}


def pinned_name(pinned: dict) -> str:
    return f"{Path(pinned['path']) / pinned['iteration']} (id {str(pinned.get('id'))[:12]})"


def checkpoint_identity(iteration_dir) -> str:
    """The id stored by the save or conversion that wrote ``iteration_dir``; for checkpoints
    written before ids existed, a digest of its file names, sizes and metadata."""
    try:
        ident = read_checkpoint_id(iteration_dir)
    except Exception as exc:  # a truncated or foreign common.pt: whatever torch.load raises
        raise CheckpointError(f"{iteration_dir}/common.pt cannot be read ({type(exc).__name__})") from None
    return ident or "legacy:" + _legacy_fingerprint(Path(iteration_dir))


def pinned_checkpoint_problem(pinned: dict) -> Optional[str]:
    """Why the pinned checkpoint cannot serve (gone, damaged, or re-saved since); None if it can."""
    path = Path(pinned["path"]) / pinned["iteration"]
    if not all((path / name).is_file() for name in _DIST_CHECKPOINT_FILES):
        return f"the reference checkpoint {pinned_name(pinned)} is gone"
    try:
        ident = checkpoint_identity(path)
    except CheckpointError as exc:
        return f"the reference checkpoint {pinned_name(pinned)}: {exc}"
    if ident != pinned["id"]:
        return (f"the reference checkpoint {pinned_name(pinned)} was overwritten since it was pinned "
                f"(its id is now {ident[:12]})")
    return None


def _legacy_fingerprint(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256(str(path.name).encode())
    for f in sorted(path.rglob("*")):
        if f.is_file():
            digest.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
            if f.name in ("metadata.json", ".metadata", "common.pt"):
                digest.update(f.read_bytes())
    return digest.hexdigest()
