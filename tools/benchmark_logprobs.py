"""Peak memory of the log-prob stage: chunked vocab-parallel log-probs vs a plain log-softmax.

Each variant runs forward + backward on the same bf16 logits ``[tokens, vocab]`` in a fresh
process, so the peak resident memory (CPU) or ``max_memory_allocated`` (GPU) of one variant
is not mixed with another's. Reported: the peak *above* the logits, in MiB and as a multiple
of one full fp32 ``[tokens, vocab]``. Both variants include the logits' bf16 gradient that
autograd returns (0.5x); the rest is what the log-prob computation itself holds.

    python tools/benchmark_logprobs.py --tokens 8192 --vocab 32000 --chunk-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

try:
    from megatron_pref.cli_errors import refuse_torchrun
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_pref.cli_errors import refuse_torchrun

VARIANTS = ("chunked", "log_softmax")


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_variant(variant: str, tokens: int, vocab: int, chunk_tokens: int, device: str) -> dict:
    import torch
    from megatron.core import parallel_state  # noqa: F401  (imported lazily by token_logprobs)

    from megatron_pref.logprobs import token_logprobs

    # Imports happen before the baseline: megatron-core's import alone raises RSS by ~400 MiB.
    torch.manual_seed(0)
    # Drawn in bf16 directly: an fp32 draw would raise the high-water mark before the baseline.
    logits = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_bytes(device)
    if variant == "chunked":
        logps = token_logprobs(logits, labels, vocab, chunk_tokens=chunk_tokens)
    else:
        logps = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    logps.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    extra = _peak_bytes(device) - baseline
    return {"variant": variant, "extra_peak_bytes": int(extra),
            "full_fp32_bytes": tokens * vocab * 4, "logps_sum": float(logps.sum())}


def main(argv=None) -> int:
    refuse_torchrun("benchmark_logprobs.py", "each variant runs in a process of its own")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.tokens, args.vocab, args.chunk_tokens) < 1:
        print("error: --tokens, --vocab and --chunk-tokens must be >= 1", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.vocab, args.chunk_tokens, device)))
        return 0

    results = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--chunk-tokens", str(args.chunk_tokens),
                              "--device", device], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        if out.returncode:
            print(f"error: the {variant} run failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = results[0]["full_fp32_bytes"]
    print(f"log-prob stage, {args.tokens} tokens x {args.vocab} vocab, bf16 logits, {device}; "
          f"one full fp32 [T, V] = {full / 2**20:.0f} MiB")
    print(f"{'variant':<12} {'extra peak MiB':>15} {'x full fp32':>12}")
    for r in results:
        print(f"{r['variant']:<12} {r['extra_peak_bytes'] / 2**20:>15.0f} {r['extra_peak_bytes'] / full:>12.2f}")
    ratio = results[1]["extra_peak_bytes"] / max(results[0]["extra_peak_bytes"], 1)
    chunk = args.chunk_tokens * args.vocab * 4
    print(f"log_softmax / chunked extra peak: {ratio:.1f}x; the bf16 gradient is {full / 2 / 2**20:.0f} MiB "
          f"and one fp32 chunk of {args.chunk_tokens} tokens {chunk / 2**20:.0f} MiB")
    if args.out:
        from megatron_pref.atomic import write_json_atomic

        write_json_atomic(args.out, {"tokens": args.tokens, "vocab": args.vocab, "device": device,
                                     "chunk_tokens": args.chunk_tokens, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
