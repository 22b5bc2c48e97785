"""Hugging Face (safetensors) -> megatron-core distributed checkpoint.

The conversion runs in one process: it builds the model at TP=1/PP=1, fills it tensor by
tensor from the safetensors shards and saves ``model.sharded_state_dict()``. The checkpoint
stores global tensors with their sharding, so it loads at any TP/PP (in particular the target
one, which is validated and recorded). See docs/conversion.md for why.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_pref.convert import architectures as arch
from megatron_pref.convert.checkpoint_io import check_tokenizer_files, save_model_checkpoint
from megatron_pref.convert.errors import ConversionError
from megatron_pref.convert.mapping import VOCAB_KEYS, Mapping, mapping_for, te_key, uses_te_names
from megatron_pref.convert.runtime import (check_output_dir, single_process_parallel_state,
                                           staged_output)
from megatron_pref.convert.safetensors_io import SafetensorsReader
from megatron_pref.model import ModelConfig, ParallelConfig, PrecisionConfig


@dataclass
class HfCheckpoint:
    """A Hugging Face checkpoint directory that passed every check (headers only, no tensor data)."""
    hf_dir: Path
    model_type: str
    hf_config: object
    raw_config: dict
    model_cfg: ModelConfig
    mapping: Mapping
    reader: SafetensorsReader
    expected: dict  # HF tensor name -> shape, as config.json implies


@dataclass
class HfToMegatronPlan(HfCheckpoint):
    """A checked checkpoint and what to make of it."""
    save_dir: Path
    dtype: torch.dtype
    target_tp: int
    target_pp: int
    sliding_window_as_full: Optional[int]


def _resolve_dtype(dtype, hf_config, reader: SafetensorsReader, names) -> torch.dtype:
    """--dtype, else the weights' own dtype; fp16 (or a mix) becomes fp32, losslessly."""
    if dtype not in (None, "auto"):
        if dtype not in arch.DTYPES:
            raise ConversionError(f"--dtype {dtype!r}: choose bf16 or fp32")
        return arch.DTYPES[dtype]
    stored = {reader.dtypes[n] for n in names}
    if len(stored) == 1 and stored <= {torch.float32, torch.bfloat16}:
        return stored.pop()
    return torch.float32




def inspect_hf_checkpoint(hf_dir, *, make_vocab_size_divisible_by: int = 128,
                          allow_sliding_window_as_full: bool = False) -> HfCheckpoint:
    """Check a HF checkpoint directory (never a Hub name): config.json, a supported architecture,
    safetensors headers that match the config, supported dtypes, a loadable tokenizer. Reads
    only headers and small files; raises ConversionError (one line)."""
    hf_dir = Path(hf_dir)
    model_type, hf_config = arch.load_hf_config(hf_dir)
    raw = arch.read_config_json(hf_dir)
    try:
        model_cfg = arch.model_config_from_hf(model_type, hf_config,
                                              make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                              allow_sliding_window_as_full=allow_sliding_window_as_full)
        model_cfg.validate()
    except ConversionError:
        raise
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:  # e.g. a field of the wrong type
        raise ConversionError(f"{hf_dir / 'config.json'}: {exc}") from None
    reader = SafetensorsReader(hf_dir)
    mapping = mapping_for(model_type, model_cfg, reader.names())
    expected = mapping.hf_shapes()
    for name, shape in expected.items():
        if name not in reader.shapes:
            raise ConversionError(f"config and weights disagree: tensor {name!r} (implied by config.json, "
                                  f"shape {shape}) is not in the checkpoint")
        got = reader.shapes[name]
        if got != tuple(shape):
            raise ConversionError(f"config and weights disagree: tensor {name!r} has shape {got} in "
                                  f"{reader.shard_of(name)} but config.json implies {tuple(shape)}")
    extra = sorted(n for n in reader.names() if n not in expected and not mapping.is_ignored(n))
    if extra:
        raise ConversionError(f"config and weights disagree: tensor {extra[0]!r} (shape {reader.shapes[extra[0]]}, "
                              f"in {reader.shard_of(extra[0])}) is not described by config.json"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    bad = sorted(n for n in expected if reader.dtypes[n] not in (torch.float32, torch.bfloat16, torch.float16))
    if bad:
        raise ConversionError(f"tensor {bad[0]!r} has dtype {reader.dtypes[bad[0]]}; "
                              f"only fp32/bf16/fp16 checkpoints are supported")
    check_tokenizer_files(hf_dir)
    return HfCheckpoint(hf_dir=hf_dir, model_type=model_type, hf_config=hf_config, raw_config=raw,
                        model_cfg=model_cfg, mapping=mapping, reader=reader, expected=expected)


def plan_hf_to_megatron(hf_dir, save_dir, *, target_tensor_parallel_size: int = 1,
                        target_pipeline_parallel_size: int = 1, dtype: Optional[str] = None,
                        force: bool = False, allow_sliding_window_as_full: bool = False,
                        make_vocab_size_divisible_by: int = 128) -> HfToMegatronPlan:
    """Every check of the conversion, reading only headers; raises ConversionError, writes nothing."""
    hf_dir = Path(hf_dir)
    arch.load_hf_config(hf_dir)  # the input's basic problems first (missing, unsupported)
    out = check_output_dir(save_dir, force, protect=[hf_dir])
    ckpt = inspect_hf_checkpoint(hf_dir, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                 allow_sliding_window_as_full=allow_sliding_window_as_full)
    model_cfg = ckpt.model_cfg
    try:
        ParallelConfig(target_tensor_parallel_size, target_pipeline_parallel_size).validate_for(model_cfg)
    except ValueError as exc:
        raise ConversionError(str(exc).replace("--tensor-model-parallel-size", "--target-tensor-parallel-size")
                              .replace("--pipeline-model-parallel-size", "--target-pipeline-parallel-size")) from None
    window = arch.sliding_window(ckpt.model_type, ckpt.hf_config)
    return HfToMegatronPlan(
        **{f.name: getattr(ckpt, f.name) for f in fields(HfCheckpoint)}, save_dir=out,
        dtype=_resolve_dtype(dtype, ckpt.hf_config, ckpt.reader, ckpt.expected),
        target_tp=target_tensor_parallel_size, target_pp=target_pipeline_parallel_size,
        sliding_window_as_full=window if window is not None and window < model_cfg.max_position_embeddings
        else None)


def fill_model(model, mapping: Mapping, get: Callable[[str], torch.Tensor], true_vocab: int) -> int:
    """Copy the mapped HF tensors into ``model`` (TP=1, PP=1; local or TE names); returns the count.

    Vocabulary rows beyond ``true_vocab`` (padding) are set to zero.
    """
    state = model.state_dict()
    te = uses_te_names(state)
    targets = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    filled = set()
    for group in mapping.to_megatron(get):
        for key, tensor in group.items():
            name = te_key(key) if te else key
            if name not in targets:
                raise RuntimeError(f"internal error: the megatron model has no tensor {name!r}")
            dst = targets[name]
            if key in VOCAB_KEYS:
                if dst.shape[0] < true_vocab or dst.shape[1:] != tensor.shape[1:]:
                    raise RuntimeError(f"internal error: {name} is {tuple(dst.shape)}, source {tuple(tensor.shape)}")
                dst[:true_vocab].copy_(tensor)
                dst[true_vocab:].zero_()
            else:
                if dst.shape != tensor.shape:
                    raise RuntimeError(f"internal error: {name} is {tuple(dst.shape)}, "
                                       f"mapped tensor is {tuple(tensor.shape)}")
                dst.copy_(tensor)
            filled.add(name)
        del group
    missing = sorted(set(targets) - filled)
    if missing:
        raise RuntimeError(f"internal error: the mapping left {missing} unset")
    return len(filled)


def _generation_config(hf_dir: Path) -> Optional[dict]:
    path = hf_dir / "generation_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def convert_hf_to_megatron(hf_dir, save_dir, *, target_tensor_parallel_size: int = 1,
                           target_pipeline_parallel_size: int = 1, dtype: Optional[str] = None,
                           force: bool = False, allow_sliding_window_as_full: bool = False,
                           make_vocab_size_divisible_by: int = 128, log: Callable[[str], None] = print) -> dict:
    """Convert; returns a summary dict. Raises ConversionError (nothing written) on bad input."""
    import megatron.core

    from megatron_pref.model import build_gpt_model

    start = time.perf_counter()
    plan = plan_hf_to_megatron(hf_dir, save_dir, target_tensor_parallel_size=target_tensor_parallel_size,
                               target_pipeline_parallel_size=target_pipeline_parallel_size, dtype=dtype,
                               force=force, allow_sliding_window_as_full=allow_sliding_window_as_full,
                               make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    cfg = plan.model_cfg
    log(f"converting {arch.SUPPORTED[plan.model_type]} from {plan.hf_dir}: {cfg.num_layers} layers, hidden "
        f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {arch.param_count(cfg) / 1e6:.1f}M parameters, "
        f"{str(plan.dtype).removeprefix('torch.')}")
    if plan.sliding_window_as_full:
        log(f"warning: sliding_window={plan.sliding_window_as_full} is dropped: attention is full; "
            f"exact only for sequences of at most {plan.sliding_window_as_full} tokens")
    source = {
        "format": "huggingface",
        "model_type": plan.model_type,
        "architecture": arch.SUPPORTED[plan.model_type],
        "hf_dir": str(plan.hf_dir.absolute()),
        "dtype": str(plan.dtype).removeprefix("torch."),
        "target_tensor_parallel_size": plan.target_tp,
        "target_pipeline_parallel_size": plan.target_pp,
        "sliding_window_dropped": plan.sliding_window_as_full,
        "megatron_core_version": megatron.core.__version__,
        "hf_config": plan.raw_config,
        "generation_config": _generation_config(plan.hf_dir),
    }
    with staged_output(plan.save_dir) as tmp, single_process_parallel_state():
        model = build_gpt_model(cfg, ParallelConfig(), PrecisionConfig(bf16=plan.dtype == torch.bfloat16,
                                                                       transformer_impl="local"),
                                perform_initialization=False)
        built = time.perf_counter()
        count = fill_model(model, plan.mapping, plan.reader.get, cfg.vocab_size)
        plan.reader.close()
        filled = time.perf_counter()
        save_model_checkpoint(model, cfg, tmp, iteration=0, tokenizer_dir=plan.hf_dir, source=source)
        del model
    elapsed = time.perf_counter() - start
    log(f"wrote {plan.save_dir} ({count} tensors) in {elapsed:.1f} s "
        f"(build {built - start:.1f} s, fill {filled - built:.1f} s, save {elapsed - (filled - start):.1f} s); "
        f"loads at any TP/PP, e.g. the target TP={plan.target_tp} PP={plan.target_pp}")
    return {"save_dir": str(plan.save_dir), "model_type": plan.model_type, "tensors": count,
            "seconds": elapsed, "model": cfg.to_dict()}
