"""Write a random Llama-shaped Hugging Face checkpoint (sharded bf16 safetensors + index), to
measure conversion time and memory without downloading a model.

    python -m megatron_pref.convert.synthetic --out /tmp/llama-1b        # ~1.1B parameters

Tensors are generated one at a time and flushed per shard, so memory stays at about one shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_random_llama(out_dir, hidden: int = 2048, layers: int = 16, heads: int = 32, kv_heads: int = 8,
                       ffn: int = 8192, vocab: int = 32000, max_shard_bytes: int = 10**9, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """Returns the parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch.")
                ).save_pretrained(str(out))
    d = hidden // heads
    g = torch.Generator().manual_seed(seed)

    def shapes():
        yield "model.embed_tokens.weight", (vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (hidden,)
            yield p + "self_attn.q_proj.weight", (heads * d, hidden)
            yield p + "self_attn.k_proj.weight", (kv_heads * d, hidden)
            yield p + "self_attn.v_proj.weight", (kv_heads * d, hidden)
            yield p + "self_attn.o_proj.weight", (hidden, heads * d)
            yield p + "post_attention_layernorm.weight", (hidden,)
            yield p + "mlp.gate_proj.weight", (ffn, hidden)
            yield p + "mlp.up_proj.weight", (ffn, hidden)
            yield p + "mlp.down_proj.weight", (hidden, ffn)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (vocab, hidden)

    shards, current, size, total, count = [], {}, 0, 0, 0

    def flush():
        nonlocal current, size
        name = f"shard-{len(shards)}.tmp"
        save_file(current, str(out / name), metadata={"format": "pt"})
        shards.append((name, list(current)))
        current, size = {}, 0

    for name, shape in shapes():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t
        size += nbytes
        total += nbytes
        count += t.numel()
    if current:
        flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / tmp).rename(out / final)
        weight_map.update({n: final for n in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return count


def main(argv=None) -> int:
    from megatron_pref.cli_errors import OneLineArgumentParser, check_output_dir

    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--num-attention-heads", type=int, default=32)
    p.add_argument("--num-query-groups", type=int, default=8)
    p.add_argument("--ffn-hidden-size", type=int, default=8192)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-shard-bytes", type=int, default=10**9)
    args = p.parse_args(argv)
    for name, value in vars(args).items():
        if name != "out" and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    problem = check_output_dir(args.out, "--out")
    if problem:
        p.error(problem)
    n = write_random_llama(args.out, args.hidden_size, args.num_layers, args.num_attention_heads,
                           args.num_query_groups, args.ffn_hidden_size, args.vocab_size, args.max_shard_bytes)
    print(f"wrote {args.out}: {n / 1e9:.3f}B parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
