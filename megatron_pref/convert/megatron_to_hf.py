"""megatron_pref checkpoint -> Hugging Face directory (config.json, safetensors shards + index,
tokenizer), loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer``.

The checkpoint is loaded at TP=1/PP=1 in one process (dist_checkpointing gathers the shards
of whatever layout it was saved with), then mapped tensor group by tensor group into shards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_pref.checksums import verify_checksums
from megatron_pref.checkpoint_format import CONFIG_FILE, TOKENIZER_DIR, copy_tokenizer, read_checkpoint_metadata
from megatron_pref.convert import architectures as arch
from megatron_pref.convert.checkpoint_io import (check_dist_checkpoint, check_tokenizer_files, checkpoint_tensor_dtype,
                                                 load_model_checkpoint, resolve_iteration_dir)
from megatron_pref.convert.errors import ConversionError
from megatron_pref.convert.mapping import VOCAB_KEYS, mapping_for, te_key, uses_te_names
from megatron_pref.convert.runtime import (check_output_dir, single_process_parallel_state,
                                           staged_output)
from megatron_pref.convert.safetensors_io import ShardedSafetensorsWriter, parse_size
from megatron_pref.model import ModelConfig, ParallelConfig, PrecisionConfig


def convert_megatron_to_hf(load_dir, save_dir, *, force: bool = False, model_type: Optional[str] = None,
                           dtype: Optional[str] = None, max_shard_size: str = "5GB",
                           iteration: Optional[int] = None, log: Callable[[str], None] = print,
                           verify: bool = True) -> dict:
    """Convert; returns a summary dict. Raises ConversionError (nothing written) on bad input.
    ``verify``: compare the checkpoint's files with their recorded checksums first."""
    from megatron_pref.model import build_gpt_model

    start = time.perf_counter()
    max_bytes = parse_size(max_shard_size)  # the options first: no reading before a bad flag is reported
    if dtype not in (None, "auto") and dtype not in arch.DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose bf16 or fp32")
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise ConversionError(f"--load {load_dir} is not a directory")
    metadata = read_checkpoint_metadata(load_dir)
    out = check_output_dir(save_dir, force, protect=[load_dir])
    try:
        cfg = ModelConfig.from_dict(metadata["model"])
        cfg.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"bad model config in {load_dir}: {exc}") from None
    source = metadata.get("source") or {}
    if not isinstance(source, dict):
        raise ConversionError(f"{load_dir / CONFIG_FILE}: \"source\" must be a JSON object, got {source!r:.60}")
    model_type = model_type or source.get("model_type") or arch.infer_model_type(cfg)
    if not isinstance(model_type, str) or model_type not in arch.SUPPORTED:
        raise ConversionError(f"unsupported --model-type {model_type!r}; supported: {arch.supported_list()}")
    arch.check_exportable(model_type, cfg)
    check_dist_checkpoint(load_dir, iteration)
    verify_checksums(resolve_iteration_dir(load_dir, iteration), "--load", verify, ConversionError)
    check_tokenizer_files(load_dir / TOKENIZER_DIR)
    base_config = source.get("hf_config") if source.get("model_type") == model_type else None
    base_config = base_config if isinstance(base_config, dict) else None

    with staged_output(out) as tmp, single_process_parallel_state():
        stored = checkpoint_tensor_dtype(resolve_iteration_dir(load_dir, iteration))
        out_dtype = arch.DTYPES[dtype] if dtype not in (None, "auto") else stored
        model = build_gpt_model(cfg, ParallelConfig(), PrecisionConfig(bf16=stored == torch.bfloat16,
                                                                       transformer_impl="local"),
                                perform_initialization=False)
        # The files were verified above, before anything was built: not hashed again here.
        load_model_checkpoint(model, load_dir, iteration=iteration, verify=False)
        state = model.state_dict()
        te = uses_te_names(state)
        vocab = cfg.vocab_size

        def get(key: str) -> torch.Tensor:
            tensor = state[te_key(key) if te else key]
            if key in VOCAB_KEYS:
                tensor = tensor[:vocab]  # drop the padding rows
            return tensor.to(out_dtype)

        mapping = mapping_for(model_type, cfg)
        writer = ShardedSafetensorsWriter(tmp, max_bytes)
        count = 0
        for group in mapping.to_hf(get):
            for name, tensor in group.items():
                writer.add(name, tensor)
                count += 1
        shards = writer.finish()

        config = arch.hf_config_dict(model_type, cfg, out_dtype, base=base_config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if source.get("generation_config"):
            (tmp / "generation_config.json").write_text(json.dumps(source["generation_config"], indent=2) + "\n")
        copied = copy_tokenizer(load_dir / TOKENIZER_DIR, tmp)
    elapsed = time.perf_counter() - start
    log(f"wrote {out}: {arch.SUPPORTED[model_type]}, {count} tensors in {len(shards)} shard(s), "
        f"{str(out_dtype).removeprefix('torch.')}, tokenizer files: {', '.join(copied) or 'none'} "
        f"({elapsed:.1f} s)")
    return {"save_dir": str(out), "model_type": model_type, "tensors": count, "shards": shards,
            "seconds": elapsed}
