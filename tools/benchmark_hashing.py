#!/usr/bin/env python3
"""Hashing throughput: what a content identity of the training data costs at start-up.

The reference cache is keyed by every byte of the data (megatron_pref/data/fingerprint.py,
XXH3-128). This measures, on one core of this machine:

  memory  each candidate hash over an in-memory buffer (the hash's own speed);
  file    megatron_pref's file_digest over a file just written (page cache warm: the upper
          bound a fast disk approaches; a cold read runs at the disk's speed instead).

and prints GB/s and the seconds each GB (and a 100 GB dataset) adds to start-up. Writes a JSON
file with the figures when ``--output`` is given.

    python tools/benchmark_hashing.py --megabytes 1024
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=512, help="buffer / file size in MiB (512)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes (3)")
    parser.add_argument("--chunk-bytes", type=int, default=8 << 20, help="bytes per update/read (8 MiB)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.megabytes < 1 or args.repeats < 1 or args.chunk_bytes < 1:
        parser.error("--megabytes, --repeats and --chunk-bytes must be >= 1")
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
