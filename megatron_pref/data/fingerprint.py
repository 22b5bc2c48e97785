"""Content identity of files: a streaming hash of every byte.

The reference cache is keyed by what the files
hold, not by their names, sizes or timestamps: a same-size edit in the middle of a 100 GB file
must change the key. xxHash's XXH3-128 streams at memory speed (tools/benchmark_hashing.py
measures it: ~10x sha256 on one core), so hashing is bound by the disk, and it happens once
per run, only where a precomputed reference needs the key.

No digest is remembered between runs. (Within one process, megatron_pref.checksums.file_digest,
the one hashing routine, hashes a file once while its status is unchanged, so that the checksum
check of a dataset and its fingerprint read it once.) A memo kept across runs, keyed by (inode,
size, mtime, ctime), would be cheap, but mtime can be set by anyone (``touch -d``, ``rsync -t``, ``cp -p``), and ctime is
not trustworthy on every filesystem a cluster mounts (FUSE and object-store mounts, some
network filesystems, report synthetic values): one wrong memo hit silently trains on stale
reference log-probs, which costs far more than re-reading the data at disk speed.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple

import xxhash

from megatron_pref.checksums import ALGORITHM, CHUNK_BYTES, file_digest  # noqa: F401  (the one hashing routine)


def files_digest(entries: Iterable[Tuple[str, str]]) -> str:
    """``"xxh3_128:<hex>"`` over ``(label, path)`` entries, in order: each entry's label, size and
    content digest. The label says what a file is (a role such as ``.bin``, or a name inside
    a directory); where the file lives does not count, so an identical copy keeps the identity."""
    hasher = xxhash.xxh3_128()
    for label, path in entries:
        hasher.update(f"{label}\0{os.path.getsize(path)}\0{file_digest(path)}\n".encode())
    return f"{ALGORITHM}:{hasher.hexdigest()}"


def data_files(path: str) -> list:
    """``(role, file)`` of a raw data file (role: its extension) or of a preprocessed prefix
    (role: the suffix after the prefix, e.g. ``.bin``, ``.idx``)."""
    from megatron_pref.data.datasets import output_paths

    if os.path.isfile(path):
        return [(os.path.splitext(path)[1], path)]
    files = [p for p in output_paths(path).values() if os.path.isfile(p)]
    return [(p[len(path):], p) for p in sorted(files)]


def data_fingerprint(paths: Sequence[str]) -> str:
    """Identity of a split given as raw files or preprocessed prefixes, in the order given (the
    order decides the pair ids)."""
    return files_digest(entry for path in paths for entry in data_files(path))


def tree_fingerprint(path: str) -> str:
    """Identity of one file, or of the files directly in a directory (by name)."""
    if os.path.isfile(path):
        return files_digest([("", path)])
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    return files_digest((name, os.path.join(path, name)) for name in names)


def agreed_fingerprint(compute) -> str:
    """``compute()`` run once per node and checked to agree across nodes.

    Without a process group it simply runs here. With one, the first rank of each node
    (LOCAL_RANK 0) hashes; the other ranks of the node, which read the same files, wait.
    Nodes holding different copies of the data would otherwise read different pairs under
    one cache key: that is an error. The others wait inside a collective, so hashing must
    finish within the process group's timeout (10 minutes: ~300 GB at 0.5 GB/s per node)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return compute()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    mine: Optional[str] = compute() if local_rank == 0 else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    values = sorted({v for v in gathered if v is not None})
    if len(values) != 1:
        from megatron_pref.data.errors import DataError

        raise DataError("the data files differ between nodes (content fingerprints "
                        f"{', '.join(values) or 'none'}): give every node the same files")
    return values[0]
