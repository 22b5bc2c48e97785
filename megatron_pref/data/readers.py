"""Streaming readers for preference data: JSONL (optionally gzipped) and Parquet.

Rows are read lazily so inputs larger than RAM can be processed. JSONL lines
are handed out as raw bytes and decoded/parsed by :func:`parse_jsonl_line`
(strict UTF-8, the standard :mod:`json` module) so the expensive part can run
in worker processes and every error names ``file:line``. Parquet files are
read in record batches with :mod:`pyarrow`; their rows are named
``file:row N`` (1-based).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")

# Canonical field names after --data-field-map renaming.
CANONICAL_FIELDS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
REQUIRED_FIELDS = ("chosen", "rejected")


def parse_field_map(spec: Optional[str]) -> Dict[str, str]:
    """Parse ``"old=new,old2=new2"`` into ``{"old": "new", ...}``.

    A dict is returned unchanged (after validation).
    """
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if part.count("=") != 1:
                raise DataError(
                    f"--data-field-map: expected old=new pairs separated by commas, got {part!r}"
                )
            old, new = (s.strip() for s in part.split("="))
            items.append((old, new))
    out: Dict[str, str] = {}
    for old, new in items:
        if not old or not new:
            raise DataError(f"--data-field-map: empty field name in {old!r}={new!r}")
        if old in out:
            raise DataError(f"--data-field-map: field {old!r} is mapped twice")
        out[old] = new
    return out


def apply_field_map(row: Dict[str, Any], field_map: Dict[str, str]) -> Dict[str, Any]:
    """Rename the columns of one row. A renamed column overrides an existing
    column of the target name."""
    if not field_map:
        return row
    out = {k: v for k, v in row.items() if k not in field_map}
    for old, new in field_map.items():
        if old in row:
            out[new] = row[old]
    return out


def detect_format(path: str) -> str:
    """``"jsonl"`` or ``"parquet"`` from the file name."""
    low = path.lower()
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise DataError(
        f"{path}: unknown input format (expected one of "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})"
    )


def check_input_files(paths: Sequence[str]) -> List[str]:
    """Validate input paths up front (existence, readability, format)."""
    if not paths:
        raise DataError("no input files given")
    out = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p):
            raise DataError(f"input file not found: {p}")
        if os.path.isdir(p):
            raise DataError(f"input is a directory, expected a file: {p}")
        if not os.access(p, os.R_OK):
            raise DataError(f"input file is not readable: {p}")
        detect_format(p)
        out.append(p)
    return out


def parse_jsonl_line(raw: bytes, where: str) -> Dict[str, Any]:
    """Decode one JSONL line (strict UTF-8) into a dict, or raise DataError
    naming ``where`` (``file:line``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start})"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: malformed JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass
class RawChunk:
    """A chunk of consecutive rows of one file.

    ``items`` holds ``(row_number, payload)`` where payload is the raw line
    (bytes) for JSONL or the row dict for Parquet."""

    file_index: int
    path: str
    kind: str  # "jsonl" | "parquet"
    items: List[Tuple[int, Any]]

    def where(self, row_number: int) -> str:
        return format_where(self.path, self.kind, row_number)


def format_where(path: str, kind: str, row_number: int) -> str:
    if kind == "parquet":
        return f"{path}:row {row_number}"
    return f"{path}:{row_number}"


def _open_binary(path: str):
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _iter_jsonl_chunks(file_index: int, path: str, chunk_size: int) -> Iterator[RawChunk]:
    items: List[Tuple[int, Any]] = []
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines are allowed
                items.append((lineno, raw))
                if len(items) >= chunk_size:
                    yield RawChunk(file_index, path, "jsonl", items)
                    items = []
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if items:
        yield RawChunk(file_index, path, "jsonl", items)


def _parquet_columns(path: str, field_map: Dict[str, str]):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file: {e}") from None
    names = list(pf.schema_arrow.names)
    renamed = {field_map.get(n, n): n for n in names}
    for field in REQUIRED_FIELDS:
        if field not in renamed:
            raise DataError(
                f"{path}: missing field {field!r} (columns: {', '.join(names)}; "
                f"rename with --data-field-map old=new)"
            )
    wanted = [renamed[f] for f in CANONICAL_FIELDS if f in renamed]
    return pf, wanted


def _iter_parquet_chunks(
    file_index: int, path: str, chunk_size: int, field_map: Dict[str, str]
) -> Iterator[RawChunk]:
    pf, columns = _parquet_columns(path, field_map)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=chunk_size, columns=columns):
            rows = batch.to_pylist()
            items = [(row + i + 1, r) for i, r in enumerate(rows)]
            row += len(rows)
            if items:
                yield RawChunk(file_index, path, "parquet", items)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}:row {row + 1}: cannot read Parquet data: {e}") from None


def iter_raw_chunks(
    paths: Sequence[str], chunk_size: int = 256, field_map: Optional[Dict[str, str]] = None
) -> Iterator[RawChunk]:
    """Stream all input files as chunks of at most ``chunk_size`` rows, in
    file order then row order."""
    field_map = field_map or {}
    for i, path in enumerate(paths):
        kind = detect_format(path)
        if kind == "jsonl":
            yield from _iter_jsonl_chunks(i, path, chunk_size)
        else:
            yield from _iter_parquet_chunks(i, path, chunk_size, field_map)


def decode_payload(kind: str, payload: Any, where: str, field_map: Dict[str, str]) -> Dict[str, Any]:
    """Turn a raw chunk item into a row dict with canonical field names."""
    if kind == "jsonl":
        row = parse_jsonl_line(payload, where)
    else:
        row = payload
    return apply_field_map(row, field_map)


def iter_rows(
    paths: Sequence[str], field_map: Optional[Dict[str, str]] = None
) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Single-process convenience: yield ``(where, row)`` for every row of
    every file, fields renamed by ``field_map``."""
    field_map = parse_field_map(field_map) if not isinstance(field_map, dict) else field_map
    for chunk in iter_raw_chunks(list(paths), 1024, field_map):
        for rowno, payload in chunk.items:
            where = chunk.where(rowno)
            yield where, decode_payload(chunk.kind, payload, where, field_map)
