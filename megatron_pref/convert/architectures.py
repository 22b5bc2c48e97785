"""Hugging Face config <-> ``ModelConfig`` for the supported architectures.

Supported: Llama (incl. GQA and Llama-3 rope scaling), Mistral, Qwen2 (QKV bias, tied
embeddings) and GPT-2 (learned positions, LayerNorm, biases, tanh-GELU, tied embeddings).
Anything the megatron-core model built by ``megatron_pref.model.build_gpt_model`` cannot
reproduce exactly is refused with a :class:`ConversionError` naming the config field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_pref.convert.errors import ConversionError, read_json_object
from megatron_pref.model import ModelConfig

# model_type -> the transformers class name written in config.json "architectures".
SUPPORTED = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
LLAMA_LIKE = ("llama", "mistral", "qwen2")

# megatron-core's Llama-3 frequency scaling has these constants built in (see
# RotaryEmbedding._apply_scaling); only the factor is configurable.
MCORE_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}

# GPT-2 activations: the tanh approximation ("gelu_new" and aliases) or exact erf GELU.
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GPT2_EXACT_GELUS = ("gelu",)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def supported_list() -> str:
    return ", ".join(f"{arch} ({mt})" for mt, arch in sorted(SUPPORTED.items()))


def read_config_json(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConversionError(f"--hf-dir {hf_dir} is not a directory")
    if not path.is_file():
        raise ConversionError(f"no config.json in {hf_dir}")
    return read_json_object(path)


def architectures_of(raw: dict) -> list:
    """config.json's "architectures" as a list (a single string is accepted as a one-item list)."""
    archs = raw.get("architectures")
    if archs is None:
        return []
    if isinstance(archs, str):
        return [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConversionError(f"config.json \"architectures\" must be a list of class names, got {archs!r}")
    return archs


def detect_model_type(raw: dict) -> str:
    """The supported model_type of a raw config.json, or a ConversionError listing them."""
    model_type = raw.get("model_type")
    archs = architectures_of(raw)
    if isinstance(model_type, str) and model_type in SUPPORTED:
        if archs and archs[0] != SUPPORTED[model_type]:
            raise ConversionError(
                f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); only the causal-LM "
                f"heads are supported: {supported_list()}")
        return model_type
    shown = archs[0] if archs else "<none>"
    raise ConversionError(f"unsupported architecture {shown!r} (model_type {model_type!r}); "
                          f"supported: {supported_list()}")


def load_hf_config(hf_dir: Path):
    """(model_type, transformers config) of a checkpoint directory, refusing unsupported ones early."""
    raw = read_config_json(hf_dir)
    model_type = detect_model_type(raw)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as exc:  # transformers validation messages are informative
        raise ConversionError(f"transformers cannot read {Path(hf_dir) / 'config.json'}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return model_type, config


def rope_parameters(config) -> dict:
    """RoPE settings as one dict (transformers 5 ``rope_parameters``, or 4.x rope_theta/rope_scaling)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def sliding_window(model_type: str, config) -> Optional[int]:
    """The attention window the HF model applies, or None when attention is full."""
    if model_type == "mistral":
        return getattr(config, "sliding_window", None)
    if model_type == "qwen2":
        layer_types = getattr(config, "layer_types", None) or []
        uses = getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types
        return getattr(config, "sliding_window", None) if uses else None
    return None


def source_dtype(config) -> Optional[torch.dtype]:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _rotary_base(theta) -> float | int:
    theta = float(theta)
    return int(theta) if theta.is_integer() else theta


def model_config_from_hf(model_type: str, config, *, make_vocab_size_divisible_by: int = 128,
                         allow_sliding_window_as_full: bool = False) -> ModelConfig:
    """The ``ModelConfig`` that reproduces this HF model, or a ConversionError naming what cannot."""
    if model_type == "gpt2":
        return _gpt2_model_config(config, make_vocab_size_divisible_by)
    if model_type not in LLAMA_LIKE:
        raise ConversionError(f"unsupported model_type {model_type!r}; supported: {supported_list()}")

    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act={act!r} is not supported (only 'silu', i.e. SwiGLU)")
    if model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ConversionError("Llama with attention_bias=True or mlp_bias=True is not supported")

    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    rope = rope_parameters(config)
    rope_type = rope.get("rope_type") or "default"
    use_scaling, factor = False, 8.0
    if rope_type == "llama3":
        for key, want in MCORE_LLAMA3_ROPE.items():
            if float(rope.get(key, want)) != want:
                raise ConversionError(
                    f"llama3 rope scaling with {key}={rope.get(key)} is not supported: megatron-core "
                    f"hard-codes low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192")
        use_scaling, factor = True, float(rope["factor"])
    elif rope_type != "default":
        raise ConversionError(f"rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"partial_rotary_factor={partial} is not supported")

    window = sliding_window(model_type, config)
    max_pos = config.max_position_embeddings
    if window is not None and window < max_pos and not allow_sliding_window_as_full:
        raise ConversionError(
            f"sliding_window={window} < max_position_embeddings={max_pos}: the megatron-core attention "
            f"used here (local spec) has no sliding window, so sequences longer than {window} tokens "
            f"would see past the window; pass --allow-sliding-window-as-full to convert anyway "
            f"(exact for sequences of at most {window} tokens)")

    return ModelConfig(
        vocab_size=config.vocab_size,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups if groups != heads else None,
        ffn_hidden_size=config.intermediate_size,
        kv_channels=head_dim if head_dim * heads != config.hidden_size else None,
        max_position_embeddings=max_pos,
        normalization="RMSNorm",
        norm_epsilon=config.rms_norm_eps,
        swiglu=True,
        openai_gelu=False,
        position_embedding_type="rope",
        rotary_base=_rotary_base(rope.get("rope_theta", 10000.0)),
        rotary_percent=1.0,
        use_rope_scaling=use_scaling,
        rope_scaling_factor=factor,
        untie_embeddings_and_output_weights=not getattr(config, "tie_word_embeddings", False),
        add_qkv_bias=model_type == "qwen2",
        add_bias_linear=False,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(config, "initializer_range", 0.02),
    )


def _gpt2_model_config(config, make_vocab_size_divisible_by: int) -> ModelConfig:
    act = config.activation_function
    if act in GPT2_TANH_GELUS:
        openai_gelu = True
    elif act in GPT2_EXACT_GELUS:
        openai_gelu = False
    else:
        raise ConversionError(f"GPT-2 activation_function={act!r} is not supported "
                              f"(supported: {', '.join(GPT2_TANH_GELUS + GPT2_EXACT_GELUS)})")
    if not getattr(config, "scale_attn_weights", True):
        raise ConversionError("GPT-2 with scale_attn_weights=False is not supported")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ConversionError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
    if getattr(config, "add_cross_attention", False):
        raise ConversionError("GPT-2 with add_cross_attention=True is not supported")
    hidden = config.n_embd
    return ModelConfig(
        vocab_size=config.vocab_size,
        num_layers=config.n_layer,
        hidden_size=hidden,
        num_attention_heads=config.n_head,
        num_query_groups=None,
        ffn_hidden_size=config.n_inner or 4 * hidden,
        kv_channels=None,
        max_position_embeddings=config.n_positions,
        normalization="LayerNorm",
        norm_epsilon=config.layer_norm_epsilon,
        swiglu=False,
        openai_gelu=openai_gelu,
        position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=not getattr(config, "tie_word_embeddings", True),
        add_qkv_bias=False,
        add_bias_linear=True,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(config, "initializer_range", 0.02),
    )


def infer_model_type(model_cfg: ModelConfig) -> str:
    """The HF architecture a ModelConfig without a recorded source naturally maps to."""
    if (model_cfg.position_embedding_type == "learned_absolute" and model_cfg.normalization == "LayerNorm"
            and not model_cfg.swiglu and model_cfg.add_bias_linear):
        return "gpt2"
    if model_cfg.position_embedding_type == "rope" and model_cfg.normalization == "RMSNorm" and model_cfg.swiglu:
        return "qwen2" if model_cfg.add_qkv_bias else "llama"
    raise ConversionError("this checkpoint's architecture matches none of the supported HF "
                          f"architectures ({supported_list()})")


def check_exportable(model_type: str, model_cfg: ModelConfig) -> None:
    """Refuse a ModelConfig the chosen HF architecture cannot express."""
    problems = []
    if model_type == "gpt2":
        want = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False,
                    add_bias_linear=True, num_query_groups=None, kv_channels=None)
    else:
        want = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                    add_qkv_bias=model_type == "qwen2", rotary_percent=1.0)
    for key, value in want.items():
        got = getattr(model_cfg, key)
        if key == "num_query_groups" and got in (None, model_cfg.num_attention_heads):
            continue
        if key == "kv_channels" and got in (None, model_cfg.hidden_size // model_cfg.num_attention_heads):
            continue
        if got != value:
            problems.append(f"{key}={got!r} (needs {value!r})")
    if (model_type == "qwen2" and model_cfg.kv_channels
            and model_cfg.kv_channels * model_cfg.num_attention_heads != model_cfg.hidden_size):
        problems.append(f"kv_channels={model_cfg.kv_channels} (Qwen2 needs hidden_size / num_attention_heads)")
    if problems:
        raise ConversionError(f"cannot export to {SUPPORTED[model_type]}: " + ", ".join(problems))


def hf_config_dict(model_type: str, model_cfg: ModelConfig, dtype: torch.dtype,
                   base: Optional[dict] = None) -> dict:
    """config.json content for ``model_cfg``; fields of ``base`` (the source config) are kept
    where the architecture does not determine them (token ids, sliding window, ...)."""
    check_exportable(model_type, model_cfg)
    out = dict(base or {})
    if out.get("model_type") not in (None, model_type):
        out = {}
    for legacy in ("torch_dtype", "rope_scaling", "rope_theta"):
        out.pop(legacy, None)
    heads = model_cfg.num_attention_heads
    if model_type == "gpt2":
        if model_cfg.openai_gelu:  # keep the source's spelling of the tanh approximation
            act = out.get("activation_function")
            act = act if act in GPT2_TANH_GELUS else "gelu_new"
        else:
            act = "gelu"
        ffn = model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size
        out.update(
            model_type="gpt2", architectures=[SUPPORTED["gpt2"]],
            vocab_size=model_cfg.vocab_size, n_embd=model_cfg.hidden_size, n_layer=model_cfg.num_layers,
            n_head=heads, n_inner=None if ffn == 4 * model_cfg.hidden_size else ffn,
            n_positions=model_cfg.max_position_embeddings, layer_norm_epsilon=model_cfg.norm_epsilon,
            activation_function=act, tie_word_embeddings=not model_cfg.untie_embeddings_and_output_weights,
            initializer_range=model_cfg.init_method_std,
        )
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            out.pop(key, None)
    else:
        groups = model_cfg.num_query_groups or heads
        head_dim = model_cfg.kv_channels or model_cfg.hidden_size // heads
        rope = {"rope_type": "default", "rope_theta": float(model_cfg.rotary_base)}
        if model_cfg.use_rope_scaling:
            rope = {"rope_type": "llama3", "rope_theta": float(model_cfg.rotary_base),
                    "factor": float(model_cfg.rope_scaling_factor), **MCORE_LLAMA3_ROPE}
        out.update(
            model_type=model_type, architectures=[SUPPORTED[model_type]],
            vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
            num_hidden_layers=model_cfg.num_layers, num_attention_heads=heads, num_key_value_heads=groups,
            intermediate_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
            max_position_embeddings=model_cfg.max_position_embeddings, rms_norm_eps=model_cfg.norm_epsilon,
            hidden_act="silu", rope_parameters=rope,
            tie_word_embeddings=not model_cfg.untie_embeddings_and_output_weights,
            initializer_range=model_cfg.init_method_std,
        )
        if model_type != "qwen2":  # Qwen2Config has no head_dim (check_exportable made sure it is implied)
            out["head_dim"] = head_dim
        if model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        if model_type == "mistral":
            out.setdefault("sliding_window", None)  # MistralConfig's class default is a 4096 window
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def param_count(model_cfg: ModelConfig) -> int:
    """Parameters of the unpadded HF model (for reporting)."""
    h, layers = model_cfg.hidden_size, model_cfg.num_layers
    heads = model_cfg.num_attention_heads
    groups = model_cfg.num_query_groups or heads
    d = model_cfg.kv_channels or h // heads
    f = model_cfg.ffn_hidden_size or 4 * h
    per_layer = h * (heads + 2 * groups) * d + heads * d * h + (3 if model_cfg.swiglu else 2) * h * f
    emb = model_cfg.vocab_size * h * (2 if model_cfg.untie_embeddings_and_output_weights else 1)
    positions = 0 if model_cfg.position_embedding_type == "rope" else model_cfg.max_position_embeddings * h
    return per_layer * layers + emb + positions
