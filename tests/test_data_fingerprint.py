"""Content identity of data files (megatron_pref.data.fingerprint): every byte counts, the
location does not."""

import json
import shutil

from megatron_pref.data.fingerprint import data_fingerprint, file_digest, files_digest, tree_fingerprint

MIB = 1 << 20


def write_padded_jsonl(path, rows=96, filler=23_000):
    """Demo-like pairs padded with an ignored field to 2.1 MiB (96 x 23 kB)."""
    with open(path, "w") as f:
        for i in range(rows):
            a, b = divmod(i * 37, 100)
            f.write(json.dumps({"note": "x" * filler, "prompt": f"{a}+{b}=", "chosen": f"{a + b:03d}",
                                "rejected": f"{a + b + 1:03d}"}, separators=(",", ":")) + "\n")
    return str(path)


def swap_chosen_rejected_near(path, offset):
    """Swap chosen and rejected (same length) in the row that holds byte ``offset``: the
    size is unchanged. Returns (row index, byte offset of the chosen value)."""
    lines = open(path, "rb").read().split(b"\n")
    start = 0
    for index, line in enumerate(lines):
        if start + len(line) >= offset:
            row = json.loads(line)
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            new = json.dumps(row, separators=(",", ":")).encode()
            assert len(new) == len(line)
            lines[index] = new
            open(path, "wb").write(b"\n".join(lines))
            return index, start + line.index(b'"chosen"')
        start += len(line) + 1
    raise AssertionError("offset beyond the file")


def head_tail_fingerprint(paths):
    """The original key (names, sizes, first and last MiB): the negative control."""
    import hashlib
    import os

    digest = hashlib.sha256()
    for f in paths:
        size = os.path.getsize(f)
        digest.update(f"{os.path.basename(f)}:{size}".encode())
        with open(f, "rb") as handle:
            digest.update(handle.read(MIB))
            if size > 2 * MIB:
                handle.seek(-MIB, os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()


def test_same_size_swap_in_the_middle_changes_the_identity(tmp_path):
    path = write_padded_jsonl(tmp_path / "train.jsonl")
    size = (tmp_path / "train.jsonl").stat().st_size
    assert 2 * MIB < size < 2.2 * MIB
    before, old_before = data_fingerprint([path]), head_tail_fingerprint([path])
    _, where = swap_chosen_rejected_near(path, MIB + 1000)
    assert MIB < where < size - MIB  # outside the bytes the old key read
    assert (tmp_path / "train.jsonl").stat().st_size == size
    assert head_tail_fingerprint([path]) == old_before  # the old key misses it
    assert data_fingerprint([path]) != before


def test_one_byte_anywhere_changes_the_identity(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytearray(range(256)) * (3 * 4096 + 17)  # > one read chunk, not a multiple of it
    path.write_bytes(data)
    before = file_digest(str(path), chunk_bytes=1 << 16)
    for position in (0, len(data) // 2, (1 << 16) - 1, 1 << 16, len(data) - 1):
        edited = bytearray(data)
        edited[position] ^= 1
        path.write_bytes(edited)
        assert file_digest(str(path), chunk_bytes=1 << 16) != before, position
    path.write_bytes(data)
    assert file_digest(str(path), chunk_bytes=1 << 16) == before
    assert file_digest(str(path)) == before  # the chunk size does not matter


def test_an_identical_copy_elsewhere_keeps_the_identity(tmp_path):
    """Negative control: same bytes under another directory and name -> same identity; the
    order of the files given (it decides pair ids) does count."""
    first = write_padded_jsonl(tmp_path / "a.jsonl", rows=8, filler=10)
    second = write_padded_jsonl(tmp_path / "b.jsonl", rows=9, filler=10)
    (tmp_path / "copy").mkdir()
    copy = shutil.copy(first, tmp_path / "copy" / "renamed.jsonl")
    assert data_fingerprint([copy]) == data_fingerprint([first])
    assert data_fingerprint([first, second]) != data_fingerprint([second, first])
    assert files_digest([("", first)]).startswith("xxh3_128:")


def test_a_directory_identity_sees_names_and_contents(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "a.json").write_text("{}")
    (tmp_path / "tok" / "b.model").write_bytes(b"abc")
    before = tree_fingerprint(str(tmp_path / "tok"))
    shutil.copytree(tmp_path / "tok", tmp_path / "tok2")
    assert tree_fingerprint(str(tmp_path / "tok2")) == before
    (tmp_path / "tok2" / "b.model").write_bytes(b"abd")
    assert tree_fingerprint(str(tmp_path / "tok2")) != before
    (tmp_path / "tok2" / "b.model").rename(tmp_path / "tok2" / "c.model")
    assert tree_fingerprint(str(tmp_path / "tok2")) != before
