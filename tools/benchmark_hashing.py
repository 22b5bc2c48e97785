#!/usr/bin/env python3
"""Hashing throughput: what a content identity of the training data, and the checksums of
checkpoints and datasets, cost.

The reference cache is keyed by every byte of the data (megatron_pref/data/fingerprint.py), and
every checkpoint and preprocessed dataset records the checksums of its files when it is written
and compares them on load (megatron_pref/checksums.py); both use XXH3-128. This measures, on one
core of this machine:

  memory  each candidate hash over an in-memory buffer (the hash's own speed);
  file    megatron_pref's file_digest over a file just written (page cache warm: the upper
          bound a fast disk approaches; a cold read runs at the disk's speed instead).

and prints GB/s and the seconds each GB (and a 100 GB dataset) adds to start-up.

``--checkpoint`` measures the checksums' cost per GB of checkpoint instead: writing the bytes
with an fsync (the floor of any save), recording their checksum (write_checksums, just after
the write, as a save does), verifying them (verify_checksums, as a load does), and a real
single-process megatron-core checkpoint save of a GPT of about that size with and without the
checksums. Writes a JSON file with the figures when ``--output`` is given.

    python tools/benchmark_hashing.py --megabytes 1024
    python tools/benchmark_hashing.py --checkpoint --megabytes 1024
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 1e9


def _candidates() -> dict:
    import xxhash

    hashes = {
        "xxh3_128": xxhash.xxh3_128,
        "xxh3_64": xxhash.xxh3_64,
        "blake2b": hashlib.blake2b,
        "sha256": hashlib.sha256,
        "sha1": hashlib.sha1,
        "md5": hashlib.md5,
    }
    try:
        import blake3  # optional; not a dependency

        hashes["blake3"] = blake3.blake3
    except ImportError:
        pass
    return hashes


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(megabytes: int, repeats: int, chunk_bytes: int) -> dict:
    from megatron_pref.data.fingerprint import file_digest

    size = megabytes << 20
    data = os.urandom(size)
    view = memoryview(data)
    results = {}
    for name, make in _candidates().items():
        def run(make=make):
            hasher = make()
            for offset in range(0, size, chunk_bytes):
                hasher.update(view[offset:offset + chunk_bytes])
            return hasher.hexdigest()

        seconds = _best_seconds(run, repeats)
        results[name] = {"where": "memory", "GB_per_s": size / seconds / GB, "s_per_GB": seconds / (size / GB)}
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR"), delete=False) as handle:
        handle.write(data)
        path = handle.name
    try:
        seconds = _best_seconds(lambda: file_digest(path, chunk_bytes), repeats)
        raw = _best_seconds(lambda: _read_only(path, chunk_bytes), repeats)
    finally:
        os.unlink(path)
    results["file_digest (xxh3_128, file, page cache)"] = {
        "where": "file", "GB_per_s": size / seconds / GB, "s_per_GB": seconds / (size / GB)}
    results["read only (file, page cache)"] = {"where": "file", "GB_per_s": size / raw / GB, "s_per_GB": raw / (size / GB)}
    return results


def _read_only(path: str, chunk_bytes: int) -> None:
    buffer = bytearray(chunk_bytes)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def _write_fsync(path: str, data: bytes, chunk_bytes: int) -> None:
    view = memoryview(data)
    with open(path, "wb", buffering=0) as handle:
        for offset in range(0, len(data), chunk_bytes):
            handle.write(view[offset:offset + chunk_bytes])
        os.fsync(handle.fileno())


def _forget_digests() -> None:
    """file_digest remembers digests in this process; a load in a new process has none."""
    from megatron_pref import checksums

    checksums._digests.clear()


def _demo_save_seconds(megabytes: int, repeats: int, directory: str) -> dict:
    """save_model_checkpoint of a fp32 GPT of about ``megabytes`` MiB, with and without the
    checksums (best of ``repeats``), and the checkpoint's size."""
    import shutil
    from unittest import mock

    import torch

    from megatron_pref.convert import checkpoint_io
    from megatron_pref import checkpoint_format
    from megatron_pref.convert.runtime import single_process_parallel_state
    from megatron_pref.model import ModelConfig, ParallelConfig, PrecisionConfig, build_gpt_model

    hidden = 512  # each layer: 12 * hidden^2 fp32 parameters (attention 4, MLP 8)
    layers = max(1, round((megabytes << 20) / (12 * hidden * hidden * 4)))
    cfg = ModelConfig(vocab_size=1024, num_layers=layers, hidden_size=hidden, num_attention_heads=8,
                      ffn_hidden_size=4 * hidden, max_position_embeddings=128)
    out = {"without": float("inf"), "with": float("inf")}
    with single_process_parallel_state():
        model = build_gpt_model(cfg, ParallelConfig(), PrecisionConfig(bf16=False, transformer_impl="local"))
        shutil.rmtree(checkpoint_io.save_model_checkpoint(model, cfg, os.path.join(directory, "warm-up")).parent)
        for i in range(repeats):  # alternated, so that a change in the machine's load hits both alike
            for label in ("without", "with"):
                target = os.path.join(directory, f"ck_{label}_{i}")
                torch.distributed.barrier()
                skip = mock.patch.object(checkpoint_format, "write_checksums", lambda d: None)
                with skip if label == "without" else contextlib.nullcontext():
                    start = time.perf_counter()
                    path = checkpoint_io.save_model_checkpoint(model, cfg, target)
                    out[label] = min(out[label], time.perf_counter() - start)
                out["bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.name != "checksums.json")
                shutil.rmtree(target)
    return out


def measure_checkpoint(megabytes: int, repeats: int, chunk_bytes: int) -> dict:
    """Seconds per GB: write+fsync, record (hash just written), verify (a new process's load)."""
    from megatron_pref.checksums import verify_checksums, write_checksums

    import torch.distributed  # noqa: F401  (imported by the first write_checksums: not its cost)

    size = megabytes << 20
    data = os.urandom(size)
    per_gb = size / GB
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as directory:
        iteration = os.path.join(directory, "iter_0000000")
        os.mkdir(iteration)
        path = os.path.join(iteration, "__0_0.distcp")
        write = record = verify = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            _write_fsync(path, data, chunk_bytes)
            write = min(write, time.perf_counter() - start)
            _forget_digests()
            start = time.perf_counter()
            write_checksums(iteration)
            record = min(record, time.perf_counter() - start)
            _forget_digests()
            start = time.perf_counter()
            verify_checksums(iteration)
            verify = min(verify, time.perf_counter() - start)
        os.unlink(path)
        del data
        save = _demo_save_seconds(megabytes, repeats, directory)
    save_gb = save["bytes"] / GB
    return {
        "write+fsync (baseline)": {"s_per_GB": write / per_gb},
        "record checksums (write_checksums, after the write)": {"s_per_GB": record / per_gb},
        "verify checksums (verify_checksums, on load)": {"s_per_GB": verify / per_gb},
        "checkpoint save without checksums": {"s_per_GB": save["without"] / save_gb, "seconds": save["without"],
                                              "bytes": save["bytes"]},
        "checkpoint save with checksums": {"s_per_GB": save["with"] / save_gb, "seconds": save["with"],
                                           "bytes": save["bytes"]},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=512, help="buffer / file size in MiB (512)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes (3)")
    parser.add_argument("--chunk-bytes", type=int, default=8 << 20, help="bytes per update/read (8 MiB)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    parser.add_argument("--checkpoint", action="store_true",
                        help="the checksums' cost per GB of checkpoint: write+fsync, record, verify, and a "
                             "megatron-core checkpoint save with and without them")
    args = parser.parse_args(argv)
    if args.megabytes < 1 or args.repeats < 1 or args.chunk_bytes < 1:
        parser.error("--megabytes, --repeats and --chunk-bytes must be >= 1")
    if args.checkpoint:
        results = measure_checkpoint(args.megabytes, args.repeats, args.chunk_bytes)
        print(f"{'checkpoint of ' + str(args.megabytes) + ' MiB':52s} {'s per GB':>9s} {'seconds':>8s}")
        for name, r in results.items():
            seconds = f"{r['seconds']:8.2f}" if "seconds" in r else ""
            print(f"{name:52s} {r['s_per_GB']:9.3f} {seconds}")
        if args.output:
            from megatron_pref.atomic import write_json_atomic

            write_json_atomic(args.output, {"megabytes": args.megabytes, "checkpoint": True, "results": results})
        return 0
    results = measure(args.megabytes, args.repeats, args.chunk_bytes)
    print(f"{'hash':44s} {'GB/s':>8s} {'s per GB':>9s} {'s per 100 GB':>13s}")
    for name, r in results.items():
        print(f"{name:44s} {r['GB_per_s']:8.2f} {r['s_per_GB']:9.3f} {100 * r['s_per_GB']:13.1f}")
    if args.output:
        from megatron_pref.atomic import write_json_atomic

        write_json_atomic(args.output, {"megabytes": args.megabytes, "chunk_bytes": args.chunk_bytes,
                                        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
