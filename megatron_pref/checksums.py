"""Checksums of checkpoint and dataset files: recorded when they are written, verified on load.

A damaged byte inside a tensor file (a bad disk sector, a partial copy, an edit) loads and
trains silently: torch's reader notices only a file that ends early. So every file of a
checkpoint iteration directory is hashed right after the save wrote it (its pages are still in
memory) and listed in ``checksums.json`` next to it, and a preprocessed dataset lists its
``.bin``/``.idx``/``.pairs.npy`` in its ``.meta.json``. Every load compares sizes and digests
first (``--no-verify-checksums`` skips it); a checkpoint written before checksums existed
loads with one warning line.

The hash is xxHash's XXH3-128, streamed in 8 MiB reads (tools/benchmark_hashing.py measures
its cost per GB). This module is the one hashing routine of the package: the content
fingerprints of data files (``data/fingerprint.py``) use :func:`file_digest` too, and a digest
is computed once per process for a file whose status has not changed since (same device,
inode, size, mtime and ctime: writing a file changes its ctime, which no user can set back).

Several ranks: a save hashes its files round-robin over the ranks and rank 0 writes the
manifest; a load is checked by the first rank of each node (the files every rank of the
node reads), and under a process group every rank raises the same one-line error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional

import xxhash

from megatron_pref.errors import UserError

ALGORITHM = "xxh3_128"
CHUNK_BYTES = 8 << 20  # large sequential reads; the buffer is reused
MANIFEST = "checksums.json"  # in a checkpoint's iteration directory
SKIP_HINT = "pass --no-verify-checksums to load it anyway"


class ChecksumError(UserError, ValueError):
    """A file differs from what was recorded when it was written (one line naming it)."""


# --------------------------------------------------------------------------- hashing

_digests: Dict[str, tuple] = {}  # absolute path -> (status key, digest), this process only
_warned: set = set()  # directories already warned about (no manifest)


def _status_key(status: os.stat_result) -> tuple:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def file_digest(path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex XXH3-128 of every byte of ``path`` (remembered in this process while the file's
    status is unchanged)."""
    path = os.path.abspath(path)
    key = _status_key(os.stat(path))
    known = _digests.get(path)
    if known is not None and known[0] == key:
        return known[1]
    hasher = xxhash.xxh3_128()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        status = os.fstat(handle.fileno())
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            hasher.update(view[:n])
    digest = hasher.hexdigest()
    if _status_key(status) == _status_key(os.stat(path)):  # not rewritten while it was read
        _digests[path] = (_status_key(status), digest)
    return digest


def file_entry(path) -> dict:
    return {"size": os.path.getsize(path), "digest": file_digest(path)}


def record(files: Dict[str, str]) -> dict:
    """The manifest of ``files`` (label -> path): ``{"algorithm", "files": {label: {size, digest}}}``."""
    return {"algorithm": ALGORITHM, "files": {label: file_entry(path) for label, path in sorted(files.items())}}


def problem(manifest, files: Dict[str, str], where: str) -> Optional[str]:
    """Why ``files`` (label -> path) do not match ``manifest`` (None: they do). ``where`` names
    the manifest in the message. A label the manifest lacks is not checked."""
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or manifest.get("algorithm") != ALGORITHM:
        return f"{where}: not a {ALGORITHM} checksum list"
    for label, path in sorted(files.items()):
        entry = listed.get(label)
        if entry is None:
            continue
        if not isinstance(entry, dict) or not {"size", "digest"} <= entry.keys():
            return f"{where}: bad entry for {label}"
        if not os.path.isfile(path):
            return f"{path}: missing (listed in {where})"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"{path}: {size} bytes, {entry['size']} when it was written (truncated or changed since)"
        if file_digest(path) != entry["digest"]:
            return f"{path}: checksum mismatch (the file changed after it was written)"
    return None


# --------------------------------------------------------------------------- checkpoints

def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def checkpoint_files(directory) -> Dict[str, str]:
    """Every file below a checkpoint iteration directory but the manifest (relative name -> path)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): str(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_checksums(directory) -> None:
    """Record ``directory/checksums.json`` (atomically). Collective: every rank calls it after
    its part of the save; after a barrier (every file written) the ranks hash the files
    round-robin, and rank 0 writes the list."""
    from megatron_pref.atomic import write_json_atomic

    dist = _distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    if dist:
        dist.barrier()
    files = checkpoint_files(directory)
    mine = {name: file_entry(path) for i, (name, path) in enumerate(files.items()) if i % world == rank}
    if dist:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {name: entry for part in gathered for name, entry in part.items()}
    if rank == 0:
        write_json_atomic(Path(directory) / MANIFEST, {"algorithm": ALGORITHM, "files": dict(sorted(mine.items()))})


def checkpoint_problem(directory, flag: str) -> Optional[str]:
    """Why the files of the iteration ``directory`` differ from its manifest (None: they match,
    or there is no manifest: one warning line, once per directory)."""
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        if str(Path(directory).resolve()) not in _warned:
            _warned.add(str(Path(directory).resolve()))
            print(f"warning: {flag} {directory}: no {MANIFEST} (saved before checksums were recorded): its files "
                  "are loaded unverified", file=sys.stderr, flush=True)
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{flag} {manifest_path}: cannot be read ({exc})"
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    files = {name: str(Path(directory) / name) for name in (listed if isinstance(listed, dict) else {})}
    found = problem(manifest, files, str(manifest_path))
    return f"{flag} {found}; {SKIP_HINT}" if found else None


def verify_checksums(directory, flag: str = "--load", enabled: bool = True, error: type = ChecksumError) -> None:
    """Raise ``error`` (one line naming the file) if a file of the checkpoint iteration
    ``directory`` differs from its manifest. ``enabled=False`` (``--no-verify-checksums``): no
    check. Collective under a process group (every rank raises alike); without one, only the
    first rank of each node (LOCAL_RANK 0) checks, and the others go on to meet it there."""
    if not enabled:
        return
    dist = _distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist else 0))
    found = checkpoint_problem(directory, flag) if local_rank == 0 else None
    if dist:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, found)
        found = next((g for g in gathered if g), None)
    if found:
        raise error(found)


# --------------------------------------------------------------------------- datasets

def verify_dataset(meta: dict, files: Dict[str, str], where: str, enabled: bool = True,
                   error: type = ChecksumError) -> None:
    """Raise ``error`` (one line naming the file) if a preprocessed dataset's ``files`` (suffix ->
    path) differ from the checksums in its ``.meta.json`` (``where``); one warning line when it
    has none. Only the first rank of each node (LOCAL_RANK 0) checks; ``enabled=False``: none."""
    if not enabled or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    if "checksums" not in meta:
        if where not in _warned:
            _warned.add(where)
            print(f"warning: {where}: no checksums (preprocessed before they were recorded): the dataset is "
                  "read unverified", file=sys.stderr, flush=True)
        return
    found = problem(meta["checksums"], files, where)
    if found:
        raise error(f"{found}; {SKIP_HINT}")
