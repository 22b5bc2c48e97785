"""GPTModel from a config: the architecture dataclass, the layer spec (TE or local), and the
packed-pair forward (THD with TE, a block-diagonal causal mask on the local spec).

The architecture (``ModelConfig``) is what a checkpoint stores, so ``--load`` alone rebuilds
the model. Parallel layout and precision (``ParallelConfig``, ``PrecisionConfig``) are run
choices and are not part of it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
TRANSFORMER_IMPLS = ("transformer_engine", "local")
THD_MAX_SEQLEN_MULTIPLE = 64


# Stored-config value checks by declared field type (bool is an int subclass: not a number here).
_IS_CONFIG_TYPE = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                   "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                   "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str)}


@dataclass
class ModelConfig:
    """A GPT-style decoder. Flag names follow Megatron-LM (``--hidden-size`` -> hidden_size)."""

    vocab_size: int  # the tokenizer's true vocabulary; padding is derived, never stored here
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = multi-head attention
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    kv_channels: Optional[int] = None  # head dim; None = hidden_size / heads
    max_position_embeddings: int = 2048
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    openai_gelu: bool = False  # tanh-approximated GELU (GPT-2's "gelu_new")
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    use_rope_scaling: bool = False  # Llama-3.x frequency scaling
    rope_scaling_factor: float = 8.0
    untie_embeddings_and_output_weights: bool = True
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first inconsistent field."""
        positive = ("vocab_size", "num_layers", "hidden_size", "num_attention_heads",
                    "max_position_embeddings", "make_vocab_size_divisible_by", "rotary_base")
        optional_positive = ("num_query_groups", "ffn_hidden_size", "kv_channels")  # None: derived
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(f"--position-embedding-type must be one of {POSITION_EMBEDDINGS}, "
                             f"got {self.position_embedding_type!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by "
                             f"--num-attention-heads {self.num_attention_heads}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                             f"--num-query-groups {groups}")
        if self.position_embedding_type == "rope":
            # megatron-core's RotaryEmbedding rotates pairs of channels: an odd rotary dimension
            # builds one frequency too many (a size mismatch in the first forward pass).
            head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
            rotary_dim = int(head_dim * self.rotary_percent)
            if rotary_dim < 2 or rotary_dim % 2:
                source = "--kv-channels" if self.kv_channels else "--hidden-size / --num-attention-heads"
                raise ValueError(f"RoPE needs an even rotary dimension >= 2: the head dimension {head_dim} "
                                 f"({source}) x --rotary-percent {self.rotary_percent} = {rotary_dim}")
        if self.swiglu and self.openai_gelu:
            raise ValueError("--swiglu and --openai-gelu are exclusive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        if not isinstance(values, dict):
            raise ValueError(f"the model config is a {type(values).__name__}, not a mapping")
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        for name, value in values.items():  # a hand-edited file must fail here, not deep in a build
            # rotary_base: converted from HF's float rope_theta, an int when it is whole.
            expected = "float" if name == "rotary_base" else known[name].replace("Optional[", "").rstrip("]")
            optional = known[name].startswith("Optional[")
            if value is None and optional:
                continue
            if not _IS_CONFIG_TYPE[expected](value):
                raise ValueError(f"model config field {name} = {value!r} is not a{'n' if expected == 'int' else ''} "
                                 f"{expected}")
        return cls(**values)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1

    def validate_for(self, model: ModelConfig, world_size: Optional[int] = None) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        vpp = self.virtual_pipeline_model_parallel_size or 1
        if model.num_layers % (pp * vpp):
            raise ValueError(f"--num-layers {model.num_layers} is not divisible by "
                             f"--pipeline-model-parallel-size {pp}" + (f" x virtual {vpp}" if vpp > 1 else ""))
        if model.num_attention_heads % tp:
            raise ValueError(f"--num-attention-heads {model.num_attention_heads} is not divisible by "
                             f"--tensor-model-parallel-size {tp}")
        groups = model.num_query_groups or model.num_attention_heads
        if groups % tp:
            raise ValueError(f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}")
        ffn = model.ffn_hidden_size or 4 * model.hidden_size
        if ffn % tp:  # fc1/fc2 are split over TP ranks (megatron-core's divide())
            raise ValueError(f"--ffn-hidden-size {ffn} is not divisible by --tensor-model-parallel-size {tp}")
        if self.sequence_parallel and tp == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if world_size is not None and world_size % (tp * pp * self.context_parallel_size):
            raise ValueError(f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                             f"{tp} x --pipeline-model-parallel-size {pp}")


@dataclass
class PrecisionConfig:
    bf16: bool = False
    fp8_format: Optional[str] = None  # "hybrid" | "e4m3"
    fp8_recipe: str = "delayed"  # "delayed" | "tensorwise" | "blockwise" | "mxfp8"
    transformer_impl: str = "local"

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron-LM's padding: a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401  (the torch extension, not only the package)
    except Exception:
        return False
    return True


def default_transformer_impl() -> str:
    return "transformer_engine" if te_available() else "local"


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                       use_cpu_initialization: Optional[bool] = None, perform_initialization: bool = True):
    """megatron-core's TransformerConfig for this architecture, layout and precision.

    ``perform_initialization=False`` skips drawing random weights, for models whose every
    tensor is loaded next (checkpoints, conversion). ``use_cpu_initialization`` defaults to
    True without a GPU (TP-invariant draws, and the only device there) and False with one.
    """
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    from megatron.core.transformer.transformer_config import TransformerConfig

    if model.swiglu:
        activation = F.silu
    elif model.openai_gelu:
        activation = functools.partial(F.gelu, approximate="tanh")
    else:
        activation = F.gelu
    fp8 = {}
    if precision.fp8_format:
        fp8 = dict(fp8=precision.fp8_format, fp8_recipe=precision.fp8_recipe)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=activation,
        add_qkv_bias=model.add_qkv_bias,
        add_bias_linear=model.add_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        params_dtype=precision.params_dtype,
        pipeline_dtype=precision.params_dtype,
        bf16=precision.bf16,
        # Packs differ in length from one micro-batch to the next.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # the default (allgather) refuses variable lengths
        # The global pair count, not the micro-batch count, normalises the loss (see step.py).
        calculate_per_token_loss=True,
        # On CPU: TP-invariant initialisation (the full weight is drawn, then split).
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        # TE's fused RoPE (THD-aware); megatron-core's unfused THD RoPE splits every pack
        # per sequence with host synchronisations in every layer.
        apply_rope_fusion=precision.transformer_impl == "transformer_engine",
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **fp8,
    )


def local_norms_support_sequence_parallel(normalization: str) -> bool:
    """The local spec normalises with apex's fused LayerNorm when apex is installed, else (and
    always for RMSNorm) with torch's norms, which megatron-core refuses with sequence parallelism
    (``WrappedTorchNorm``). Transformer Engine's norms support it."""
    from megatron.core.models.gpt import gpt_layer_specs

    return normalization == "LayerNorm" and gpt_layer_specs.HAVE_APEX


def layer_spec(model: ModelConfig, precision: PrecisionConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    if precision.transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    vp_stage: Optional[int] = None, perform_initialization: bool = True):
    """This pipeline stage's GPTModel. Requires megatron-core parallel state to be initialised."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    model.validate()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    config = transformer_config(model, parallel, precision, perform_initialization=perform_initialization)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, precision),
        vocab_size=padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by,
                                     parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # keep logits vocab-parallel: logprobs.py reduces across TP
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        rope_scaling=model.use_rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    gpt.true_vocab_size = model.vocab_size
    mark_tensor_parallel_weights(gpt)
    return gpt


def mark_tensor_parallel_weights(gpt) -> None:
    """Mark megatron-core's tensor-parallel weights as its initialisation would have.

    megatron-core 0.16.1 sets ``tensor_model_parallel``, ``partition_dim`` and
    ``partition_stride`` on the weights of ``ColumnParallelLinear``, ``RowParallelLinear`` and
    ``VocabParallelEmbedding`` only inside its initialisation functions (its biases and
    Transformer Engine's layers are marked either way). Built with
    ``perform_initialization=False`` (train(), the reference, the converters), the weights
    stayed unmarked, and the gradient norm counts an unmarked parameter on TP rank 0 only: the
    norm and clipping left out every other TP rank's shards. Marking here keeps a CPU build of
    1B parameters at 0.2 s; initialising takes 19.5 s, and megatron-core's initialisation path
    with init methods that draw nothing 8 s (``_initialize_affine_weight_cpu`` allocates and
    copies each full weight). Idempotent: marked weights are left as they are.
    """
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)
    from megatron.core.transformer.mlp import MLP

    # mlp.py builds linear_fc1 with stride 2 for gated units: each rank holds [gate, up] slices.
    strides = {id(m.linear_fc1): 2 for m in gpt.modules()
               if isinstance(m, MLP) and m.config.gated_linear_unit and not m.config.use_kitchen}
    for module in gpt.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = module.weight  # None where the output layer uses the embedding's weight
        if isinstance(weight, torch.nn.Parameter) and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=strides.get(id(module), 1))


@dataclass
class PackedForwardInputs:
    """What GPTModel.forward takes for one pack, laid out as [batch=1, tokens]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    packed_seq_params: Optional[object] = None
    extra: dict = field(default_factory=dict)


def block_diagonal_causal_mask(cu_seqlens: torch.Tensor, total_length: int) -> torch.Tensor:
    """[1, 1, T, T] bool mask, True where attention is *not* allowed (megatron-core convention).

    Token i attends to j iff both lie in the same sequence and j <= i. Padding after the last
    sequence forms one more segment, so its rows are never empty (softmax stays finite).
    """
    device = cu_seqlens.device
    boundaries = cu_seqlens.to(torch.long)
    if int(boundaries[-1]) < total_length:
        boundaries = torch.cat([boundaries, torch.tensor([total_length], device=device)])
    positions = torch.arange(total_length, device=device)
    segment = torch.bucketize(positions, boundaries[1:], right=True)
    same_segment = segment[:, None] == segment[None, :]
    causal = positions[None, :] <= positions[:, None]
    return ~(same_segment & causal)[None, None]


def packed_forward_inputs(tokens: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                          use_thd: bool) -> PackedForwardInputs:
    """Inputs that make one pack of whole sequences attend within each sequence only.

    THD (TE): ``PackedSeqParams`` with ``cu_seqlens``; the tail padding becomes its own segment
    because TE expects the segments to cover every token.
    Local spec: the same pack with a block-diagonal causal mask. RoPE is relative, so global
    positions inside a segment give the same scores as restarted ones; learned absolute
    positions read ``position_ids``, which restart at every sequence.
    """
    total = tokens.numel()
    if use_thd:
        from megatron.core.packed_seq_params import PackedSeqParams

        # Boundaries are worked out on the host (cu_seqlens come from the CPU-side packer),
        # then copied once: no device synchronisation per pack.
        boundaries = cu_seqlens.detach().to("cpu", torch.int32)
        if int(boundaries[-1]) < total:
            boundaries = torch.cat([boundaries, boundaries.new_tensor([total])])
        # Rounded up to 64 as TE does when it infers it: fewer distinct values across ragged
        # packs, so TE's backend choice and the RoPE table are reused instead of rebuilt.
        max_len = THD_MAX_SEQLEN_MULTIPLE * math.ceil(int((boundaries[1:] - boundaries[:-1]).max())
                                                       / THD_MAX_SEQLEN_MULTIPLE)
        boundaries = boundaries.to(tokens.device, non_blocking=True)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=boundaries, cu_seqlens_kv=boundaries,
                                 max_seqlen_q=max_len, max_seqlen_kv=max_len)
        return PackedForwardInputs(tokens[None], position_ids[None], None, params)
    mask = block_diagonal_causal_mask(cu_seqlens.to(tokens.device), total)
    return PackedForwardInputs(tokens[None], position_ids[None], mask)


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _stable_seed(seed: int, key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def layout_invariant_init(model, model_cfg: ModelConfig, seed: int) -> None:
    """Re-initialise every parameter so its *global* value depends only on (seed, name).

    megatron-core's CPU initialisation is TP-invariant but not PP-invariant (later stages start
    from a different RNG state). Here each parameter's full tensor is drawn from a generator
    seeded by its distributed-checkpoint key, and each rank keeps its slice (the same slicing
    ``dist_checkpointing`` uses). The same seed then gives the same model at any TP/PP, so
    parallel layouts can be compared exactly. Scheme: N(0, std) weights, std/sqrt(2L) for the
    output projections (as megatron-core), ones for norm weights, zeros for biases.

    Every rank draws full tensors (on the parameter's device): meant for random
    initialisation; large runs start from a converted checkpoint.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    std = model_cfg.init_method_std
    output_std = std / math.sqrt(2.0 * model_cfg.num_layers)

    def fill(sharded: ShardedTensor) -> None:
        if sharded.data is None:
            return
        key = sharded.key
        short = key.rsplit(".", 1)
        leaf = short[-1]
        shape = tuple(sharded.global_shape)
        if leaf == "bias" or key.endswith("_bias"):
            full = torch.zeros(shape, device=sharded.data.device)
        elif "norm" in key and leaf == "weight" or key.endswith("layer_norm_weight"):
            full = torch.ones(shape, device=sharded.data.device)
        else:
            # Drawn where the parameter lives: on a GPU, seconds instead of minutes for billions
            # of values (the values then differ from a CPU draw, and stay layout-invariant).
            device = sharded.data.device
            generator = torch.Generator(device=device).manual_seed(_stable_seed(seed, key))
            scale = output_std if ("linear_proj" in key or "linear_fc2" in key) else std
            full = torch.randn(shape, generator=generator, device=device) * scale
        prepend = sharded.prepend_axis_num
        local_shape = (1,) * prepend + tuple(sharded.data.shape)
        index = tuple(slice(o, o + s) for o, s in zip(sharded.global_offset, local_shape))
        sharded.data.copy_(full[index].reshape(sharded.data.shape).to(sharded.data.dtype))

    def visit(item) -> None:
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            for sub in (built if isinstance(built, (list, tuple)) else [built]):
                visit(sub)
        elif isinstance(item, ShardedTensor):
            fill(item)
        elif isinstance(item, dict):
            for v in item.values():
                visit(v)
        elif isinstance(item, (list, tuple)):
            for v in item:
                visit(v)

    gpt = unwrap_model(model)
    # NaN first, so a parameter the sharded state dict does not reach cannot go unnoticed
    # (models built with perform_initialization=False hold uninitialised memory).
    for param in gpt.parameters():
        param.data.fill_(float("nan"))
    visit(gpt.sharded_state_dict())
    missed = [name for name, param in gpt.named_parameters() if torch.isnan(param).any()]
    if missed:
        raise RuntimeError(f"layout_invariant_init did not reach parameters: {missed}")
