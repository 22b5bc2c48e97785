"""Lazy reading and sharded writing of Hugging Face safetensors checkpoints."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from megatron_pref.atomic import default_file_mode
from megatron_pref.convert.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsReader:
    """Tensors of a checkpoint directory, read one at a time.

    Opening only parses the headers (names, shapes, dtypes), so every consistency check runs
    before any tensor data is read. ``get`` memory-maps the shard and copies out one tensor;
    one shard handle is kept open at a time.
    """

    def __init__(self, hf_dir):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        single = self.dir / SINGLE_FILE
        self.weight_map: Dict[str, str] = {}
        if index.is_file():
            try:
                listed = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise ConversionError(f"cannot read {index}: {exc}") from None
            files = sorted(set(listed.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise ConversionError(f"missing shard {missing[0]} (listed in {INDEX_FILE}; "
                                      f"{len(missing)} of {len(files)} shards missing)")
        elif single.is_file():
            listed, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
            hint = f" (found {found[0]}: only safetensors checkpoints are supported)" if found else ""
            raise ConversionError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}{hint}")

        self.shapes: Dict[str, tuple] = {}
        self.dtypes: Dict[str, torch.dtype] = {}
        for name in files:
            try:
                with safe_open(str(self.dir / name), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.shapes[key] = tuple(sl.get_shape())
                        self.dtypes[key] = _ST_DTYPES.get(sl.get_dtype(), None)
                        self.weight_map[key] = name
            except ConversionError:
                raise
            except Exception as exc:
                raise ConversionError(f"cannot read shard {name}: {str(exc).splitlines()[0]}") from None
        if listed is not None:
            for key, name in listed.items():
                if self.weight_map.get(key) != name:
                    raise ConversionError(f"tensor {key!r} is listed in {INDEX_FILE} under shard {name} "
                                          f"but that shard does not contain it")
        self._open_name: Optional[str] = None
        self._open = None

    def names(self):
        return set(self.shapes)

    def shard_of(self, name: str) -> str:
        return self.weight_map[name]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.weight_map[name]
        if shard != self._open_name:
            self.close()
            self._open = safe_open(str(self.dir / shard), framework="pt")
            self._open.__enter__()
            self._open_name = shard
        return self._open.get_tensor(name)

    def close(self):
        if self._open is not None:
            self._open.__exit__(None, None, None)
        self._open, self._open_name = None, None


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB' / '500MB' / '1000' -> bytes (decimal units, as transformers uses); at least 1 byte.

    Raises ConversionError naming ``flag`` for anything else (garbage, 0, negative, nan, inf).
    """
    raw = str(text)
    upper = raw.strip().upper()
    number, mult = upper, 1
    for suffix, m in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                      ("KB", 10**3), ("B", 1)):
        if upper.endswith(suffix):
            number, mult = upper[: -len(suffix)].strip(), m
            break
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise ConversionError(f"{flag} {raw!r}: expected a size such as 5GB, 500MB or a number of bytes")
    size = int(value * mult)
    if size < 1:
        raise ConversionError(f"{flag} {raw!r}: must be at least 1 byte")
    return size


class ShardedSafetensorsWriter:
    """Writes tensors to ``model-0000k-of-0000N.safetensors`` shards of at most ``max_shard_bytes``
    (a single larger tensor gets a shard of its own) plus ``model.safetensors.index.json``.

    Tensors are buffered until a shard is full, so memory holds at most one shard.
    """

    def __init__(self, out_dir, max_shard_bytes: int):
        self.dir = Path(out_dir)
        self.max = max_shard_bytes
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, names)
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.total += size

    def _flush(self):
        from safetensors.torch import save_file

        tmp = f"shard-{len(self.shards):05d}.tmp"
        save_file(self.buffer, str(self.dir / tmp), metadata={"format": "pt"})
        self.shards.append((tmp, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.buffer:
            self._flush()
        n = len(self.shards)
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp, self.dir / final)
            os.chmod(self.dir / final, default_file_mode())
            names.append(final)
            for key in keys:
                weight_map[key] = final
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
