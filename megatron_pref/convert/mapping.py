"""Tensor mappings between Hugging Face checkpoints and megatron-core ``GPTModel`` state dicts.

Megatron tensors here are the *full* (TP=1) tensors under the local-spec names. The layouts
are the ones megatron-core's tensor-parallel split expects, so a TP=1 checkpoint reshards to
any TP on load (``dist_checkpointing`` splits dim 0 / dim 1 contiguously):

* ``linear_qkv``: rows grouped per query group ``[q_g0 (heads/groups*d) | k_g0 (d) | v_g0 (d) |
  q_g1 | ...]``; TP gives each rank ``groups/TP`` whole groups. Same for the QKV bias.
* ``linear_fc1`` (SwiGLU): ``[gate; up]``. megatron-core's sharded state dict stores gate and
  up as two halves of one global tensor (``apply_swiglu_sharded_factory``), so each TP rank
  loads ``[gate_r; up_r]`` -- the per-rank concatenation the layer computes with.
* Norms: the local spec has separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules; the
  Transformer Engine spec fuses them into the next linear as ``layer_norm_weight`` (and
  ``layer_norm_bias``). :func:`te_key` / :func:`local_key` translate; the distributed
  checkpoint itself always uses the TE names (the local spec maps to them), so one
  checkpoint serves both specs.
* GPT-2: ``Conv1D`` stores ``[in, out]`` (transposed here); ``c_attn``'s ``[Q | K | V]`` is
  re-laid per head (multi-head attention = one query group per head).
* Vocabulary rows (embedding, output layer) are unpadded here; the caller pads with zeros.

Every mapping is a permutation/transposition of whole values, so HF -> Megatron -> HF is
bit-exact.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from megatron_pref.model import ModelConfig

Getter = Callable[[str], torch.Tensor]
Group = Dict[str, torch.Tensor]

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
POSITION_EMBEDDINGS = "embedding.position_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
VOCAB_KEYS = (WORD_EMBEDDINGS, OUTPUT_LAYER)

_TE_RENAMES = (
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".input_layernorm.bias", ".self_attention.linear_qkv.layer_norm_bias"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
    (".pre_mlp_layernorm.bias", ".mlp.linear_fc1.layer_norm_bias"),
)


def te_key(key: str) -> str:
    """Local-spec name -> Transformer Engine spec name (norms fused into the next linear)."""
    for local, te in _TE_RENAMES:
        if key.endswith(local):
            return key[: -len(local)] + te
    return key


def local_key(key: str) -> str:
    """Transformer Engine spec name -> local-spec name (identity on local names)."""
    for local, te in _TE_RENAMES:
        if key.endswith(te):
            return key[: -len(te)] + local
    return key


def uses_te_names(keys) -> bool:
    return any(k.endswith(te) for k in keys for _, te in _TE_RENAMES)


# --- elementary re-layouts (module-level so tests can substitute broken versions) ----------------

def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Separate Q, K, V (weights [rows, in] or biases [rows]) -> megatron's per-group layout."""
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`."""
    rest = qkv.shape[1:]
    q_rows = heads // groups * head_dim
    x = qkv.reshape(groups, q_rows + 2 * head_dim, *rest)
    q = x[:, :q_rows].reshape(-1, *rest)
    k = x[:, q_rows:q_rows + head_dim].reshape(-1, *rest)
    v = x[:, q_rows + head_dim:].reshape(-1, *rest)
    return q, k, v


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: megatron's fc1 is ``[gate; up]`` (silu applies to the first half)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def gpt2_qkv_to_megatron(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """``[Q | K | V]`` rows (already transposed to [out, in], or a bias) -> per-head ``[q_h k_h v_h]``."""
    rest = qkv.shape[1:]
    return qkv.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def gpt2_qkv_from_megatron(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    rest = qkv.shape[1:]
    return qkv.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


# --- per-architecture mappings ------------------------------------------------------------------

class Mapping:
    """Names, shapes and re-layouts of one architecture. ``get`` reads one tensor by name."""

    ignored_hf_patterns: Tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, hf_prefix: str = ""):
        self.cfg = cfg
        self.prefix = hf_prefix
        self.heads = cfg.num_attention_heads
        self.groups = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        self.ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
        self.tied = not cfg.untie_embeddings_and_output_weights

    def is_ignored(self, hf_name: str) -> bool:
        """Buffers some checkpoints carry (causal masks, rotary inv_freq) and a tied lm_head copy."""
        if self.tied and hf_name == "lm_head.weight":
            return True
        return any(re.search(p, hf_name) for p in self.ignored_hf_patterns)

    def hf_shapes(self) -> Dict[str, tuple]:
        raise NotImplementedError

    def megatron_shapes(self) -> Dict[str, tuple]:
        """Full unpadded local-spec shapes (vocab rows = true vocab)."""
        raise NotImplementedError

    def to_megatron(self, get: Getter) -> Iterator[Group]:
        """Yields groups (embedding, each layer, final norm/output) of megatron tensors."""
        raise NotImplementedError

    def to_hf(self, get: Getter) -> Iterator[Group]:
        """Yields groups of HF tensors from megatron tensors (``get`` returns unpadded vocab rows)."""
        raise NotImplementedError


class LlamaMapping(Mapping):
    """Llama, Mistral, Qwen2: RMSNorm, RoPE, SwiGLU, optional QKV bias (Qwen2)."""

    ignored_hf_patterns = (r"\.rotary_emb\.inv_freq$",)

    def _layer_hf(self, i: int) -> Dict[str, tuple]:
        h, d, p = self.cfg.hidden_size, self.head_dim, f"model.layers.{i}."
        shapes = {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (self.heads * d, h),
            p + "self_attn.k_proj.weight": (self.groups * d, h),
            p + "self_attn.v_proj.weight": (self.groups * d, h),
            p + "self_attn.o_proj.weight": (h, self.heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (self.ffn, h),
            p + "mlp.up_proj.weight": (self.ffn, h),
            p + "mlp.down_proj.weight": (h, self.ffn),
        }
        if self.cfg.add_qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (self.heads * d,)
            shapes[p + "self_attn.k_proj.bias"] = (self.groups * d,)
            shapes[p + "self_attn.v_proj.bias"] = (self.groups * d,)
        return shapes

    def hf_shapes(self):
        h, V = self.cfg.hidden_size, self.cfg.vocab_size
        shapes = {"model.embed_tokens.weight": (V, h)}
        for i in range(self.cfg.num_layers):
            shapes.update(self._layer_hf(i))
        shapes["model.norm.weight"] = (h,)
        if not self.tied:
            shapes["lm_head.weight"] = (V, h)
        return shapes

    def megatron_shapes(self):
        h, V, d = self.cfg.hidden_size, self.cfg.vocab_size, self.head_dim
        shapes = {WORD_EMBEDDINGS: (V, h)}
        for i in range(self.cfg.num_layers):
            m = f"decoder.layers.{i}."
            shapes.update({
                m + "input_layernorm.weight": (h,),
                m + "self_attention.linear_qkv.weight": ((self.heads + 2 * self.groups) * d, h),
                m + "self_attention.linear_proj.weight": (h, self.heads * d),
                m + "pre_mlp_layernorm.weight": (h,),
                m + "mlp.linear_fc1.weight": (2 * self.ffn, h),
                m + "mlp.linear_fc2.weight": (h, self.ffn),
            })
            if self.cfg.add_qkv_bias:
                shapes[m + "self_attention.linear_qkv.bias"] = ((self.heads + 2 * self.groups) * d,)
        shapes["decoder.final_layernorm.weight"] = (h,)
        if not self.tied:
            shapes[OUTPUT_LAYER] = (V, h)
        return shapes

    def to_megatron(self, get):
        yield {WORD_EMBEDDINGS: get("model.embed_tokens.weight")}
        for i in range(self.cfg.num_layers):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            out = {
                m + "input_layernorm.weight": get(p + "input_layernorm.weight"),
                m + "self_attention.linear_qkv.weight": interleave_qkv(
                    get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                    get(p + "self_attn.v_proj.weight"), self.groups),
                m + "self_attention.linear_proj.weight": get(p + "self_attn.o_proj.weight"),
                m + "pre_mlp_layernorm.weight": get(p + "post_attention_layernorm.weight"),
                m + "mlp.linear_fc1.weight": merge_gate_up(get(p + "mlp.gate_proj.weight"),
                                                           get(p + "mlp.up_proj.weight")),
                m + "mlp.linear_fc2.weight": get(p + "mlp.down_proj.weight"),
            }
            if self.cfg.add_qkv_bias:
                out[m + "self_attention.linear_qkv.bias"] = interleave_qkv(
                    get(p + "self_attn.q_proj.bias"), get(p + "self_attn.k_proj.bias"),
                    get(p + "self_attn.v_proj.bias"), self.groups)
            yield out
        final = {"decoder.final_layernorm.weight": get("model.norm.weight")}
        if not self.tied:
            final[OUTPUT_LAYER] = get("lm_head.weight")
        yield final

    def to_hf(self, get):
        yield {"model.embed_tokens.weight": _c(get(WORD_EMBEDDINGS))}
        for i in range(self.cfg.num_layers):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            q, k, v = split_qkv(get(m + "self_attention.linear_qkv.weight"), self.heads, self.groups, self.head_dim)
            gate, up = split_gate_up(get(m + "mlp.linear_fc1.weight"))
            out = {
                p + "input_layernorm.weight": _c(get(m + "input_layernorm.weight")),
                p + "self_attn.q_proj.weight": _c(q),
                p + "self_attn.k_proj.weight": _c(k),
                p + "self_attn.v_proj.weight": _c(v),
                p + "self_attn.o_proj.weight": _c(get(m + "self_attention.linear_proj.weight")),
                p + "post_attention_layernorm.weight": _c(get(m + "pre_mlp_layernorm.weight")),
                p + "mlp.gate_proj.weight": _c(gate),
                p + "mlp.up_proj.weight": _c(up),
                p + "mlp.down_proj.weight": _c(get(m + "mlp.linear_fc2.weight")),
            }
            if self.cfg.add_qkv_bias:
                qb, kb, vb = split_qkv(get(m + "self_attention.linear_qkv.bias"), self.heads, self.groups,
                                       self.head_dim)
                out.update({p + "self_attn.q_proj.bias": _c(qb), p + "self_attn.k_proj.bias": _c(kb),
                            p + "self_attn.v_proj.bias": _c(vb)})
            yield out
        final = {"model.norm.weight": _c(get("decoder.final_layernorm.weight"))}
        if not self.tied:
            final["lm_head.weight"] = _c(get(OUTPUT_LAYER))
        yield final


class GPT2Mapping(Mapping):
    """GPT-2: LayerNorm with bias, learned positions, Conv1D ([in, out]) weights, biases."""

    # Old checkpoints store the causal-mask buffers (h.N.attn.bias / masked_bias).
    ignored_hf_patterns = (r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",)

    def _n(self, name: str) -> str:
        return self.prefix + name

    def hf_shapes(self):
        h, V, f = self.cfg.hidden_size, self.cfg.vocab_size, self.ffn
        shapes = {self._n("wte.weight"): (V, h), self._n("wpe.weight"): (self.cfg.max_position_embeddings, h)}
        for i in range(self.cfg.num_layers):
            p = self._n(f"h.{i}.")
            shapes.update({
                p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
                p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
                p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
                p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                p + "mlp.c_fc.weight": (h, f), p + "mlp.c_fc.bias": (f,),
                p + "mlp.c_proj.weight": (f, h), p + "mlp.c_proj.bias": (h,),
            })
        shapes.update({self._n("ln_f.weight"): (h,), self._n("ln_f.bias"): (h,)})
        if not self.tied:
            shapes["lm_head.weight"] = (V, h)
        return shapes

    def megatron_shapes(self):
        h, V, f = self.cfg.hidden_size, self.cfg.vocab_size, self.ffn
        shapes = {WORD_EMBEDDINGS: (V, h), POSITION_EMBEDDINGS: (self.cfg.max_position_embeddings, h)}
        for i in range(self.cfg.num_layers):
            m = f"decoder.layers.{i}."
            shapes.update({
                m + "input_layernorm.weight": (h,), m + "input_layernorm.bias": (h,),
                m + "self_attention.linear_qkv.weight": (3 * h, h), m + "self_attention.linear_qkv.bias": (3 * h,),
                m + "self_attention.linear_proj.weight": (h, h), m + "self_attention.linear_proj.bias": (h,),
                m + "pre_mlp_layernorm.weight": (h,), m + "pre_mlp_layernorm.bias": (h,),
                m + "mlp.linear_fc1.weight": (f, h), m + "mlp.linear_fc1.bias": (f,),
                m + "mlp.linear_fc2.weight": (h, f), m + "mlp.linear_fc2.bias": (h,),
            })
        shapes.update({"decoder.final_layernorm.weight": (h,), "decoder.final_layernorm.bias": (h,)})
        if not self.tied:
            shapes[OUTPUT_LAYER] = (V, h)
        return shapes

    def to_megatron(self, get):
        yield {WORD_EMBEDDINGS: get(self._n("wte.weight")), POSITION_EMBEDDINGS: get(self._n("wpe.weight"))}
        for i in range(self.cfg.num_layers):
            p, m = self._n(f"h.{i}."), f"decoder.layers.{i}."
            yield {
                m + "input_layernorm.weight": get(p + "ln_1.weight"),
                m + "input_layernorm.bias": get(p + "ln_1.bias"),
                m + "self_attention.linear_qkv.weight": gpt2_qkv_to_megatron(get(p + "attn.c_attn.weight").t(),
                                                                             self.heads),
                m + "self_attention.linear_qkv.bias": gpt2_qkv_to_megatron(get(p + "attn.c_attn.bias"), self.heads),
                m + "self_attention.linear_proj.weight": get(p + "attn.c_proj.weight").t(),
                m + "self_attention.linear_proj.bias": get(p + "attn.c_proj.bias"),
                m + "pre_mlp_layernorm.weight": get(p + "ln_2.weight"),
                m + "pre_mlp_layernorm.bias": get(p + "ln_2.bias"),
                m + "mlp.linear_fc1.weight": get(p + "mlp.c_fc.weight").t(),
                m + "mlp.linear_fc1.bias": get(p + "mlp.c_fc.bias"),
                m + "mlp.linear_fc2.weight": get(p + "mlp.c_proj.weight").t(),
                m + "mlp.linear_fc2.bias": get(p + "mlp.c_proj.bias"),
            }
        final = {"decoder.final_layernorm.weight": get(self._n("ln_f.weight")),
                 "decoder.final_layernorm.bias": get(self._n("ln_f.bias"))}
        if not self.tied:
            final[OUTPUT_LAYER] = get("lm_head.weight")
        yield final

    def to_hf(self, get):
        yield {self._n("wte.weight"): _c(get(WORD_EMBEDDINGS)), self._n("wpe.weight"): _c(get(POSITION_EMBEDDINGS))}
        for i in range(self.cfg.num_layers):
            p, m = self._n(f"h.{i}."), f"decoder.layers.{i}."
            yield {
                p + "ln_1.weight": _c(get(m + "input_layernorm.weight")),
                p + "ln_1.bias": _c(get(m + "input_layernorm.bias")),
                p + "attn.c_attn.weight": _c(gpt2_qkv_from_megatron(get(m + "self_attention.linear_qkv.weight"),
                                                                    self.heads).t()),
                p + "attn.c_attn.bias": _c(gpt2_qkv_from_megatron(get(m + "self_attention.linear_qkv.bias"),
                                                                  self.heads)),
                p + "attn.c_proj.weight": _c(get(m + "self_attention.linear_proj.weight").t()),
                p + "attn.c_proj.bias": _c(get(m + "self_attention.linear_proj.bias")),
                p + "ln_2.weight": _c(get(m + "pre_mlp_layernorm.weight")),
                p + "ln_2.bias": _c(get(m + "pre_mlp_layernorm.bias")),
                p + "mlp.c_fc.weight": _c(get(m + "mlp.linear_fc1.weight").t()),
                p + "mlp.c_fc.bias": _c(get(m + "mlp.linear_fc1.bias")),
                p + "mlp.c_proj.weight": _c(get(m + "mlp.linear_fc2.weight").t()),
                p + "mlp.c_proj.bias": _c(get(m + "mlp.linear_fc2.bias")),
            }
        final = {self._n("ln_f.weight"): _c(get("decoder.final_layernorm.weight")),
                 self._n("ln_f.bias"): _c(get("decoder.final_layernorm.bias"))}
        if not self.tied:
            final["lm_head.weight"] = _c(get(OUTPUT_LAYER))
        yield final


GPT2_PREFIX = "transformer."


def mapping_for(model_type: str, cfg: ModelConfig, hf_names: Optional[set] = None) -> Mapping:
    """The mapping for ``model_type``; ``hf_names`` (the checkpoint's tensors) picks GPT-2's prefix."""
    if model_type == "gpt2":
        prefix = GPT2_PREFIX
        if hf_names is not None and "wte.weight" in hf_names and GPT2_PREFIX + "wte.weight" not in hf_names:
            prefix = ""
        return GPT2Mapping(cfg, prefix)
    return LlamaMapping(cfg)
