"""Lazy access to a safetensors checkpoint folder, one tensor at a time (mergekit style).

Tensors are read with plain positioned reads rather than a memory map: a memory-mapped file's touched pages count
towards the process's resident memory until the kernel drops them, so reading two 2.5 GB checkpoints through a
map shows ~5 GB of RSS although only one tensor is alive. With reads, memory is one tensor (plus the caller's work).
The format is small: an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets per tensor),
then the raw data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

from ..errors import ModelError

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class _File:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            self.fh = open(path, "rb")
            (n,) = struct.unpack("<Q", self.fh.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(self.fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelError(f"{path}: cannot read safetensors ({type(e).__name__}: {e}); the file is corrupt or "
                             "truncated") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            self.fh.close()
            raise ModelError(f"{path}: tensor data run past the end of the file ({self.data_start + end} > {size} "
                             "bytes); the file is truncated")

    def read(self, name: str):
        import torch

        e = self.entries[name]
        start, end = e["data_offsets"]
        dtype = getattr(torch, _DTYPES[e["dtype"]])
        buf = bytearray(end - start)
        n = os.preadv(self.fh.fileno(), [buf], self.data_start + start) if buf else 0
        if n != len(buf):
            raise ModelError(f"{self.path}: short read for {name}; the file is truncated")
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])

    def close(self) -> None:
        self.fh.close()


class LazyCheckpoint:
    """Index of tensor name -> file for a (possibly sharded) safetensors folder; tensors read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        paths = [f for f in sorted(self.folder.glob("*.safetensors")) if not f.name.startswith(("adapter_", "safegene_", "."))]
        if not paths:
            raise ModelError(f"{self.folder}: no *.safetensors weights found")
        self._files: list[_File] = []
        self._where: dict[str, _File] = {}
        try:
            for p in paths:
                f = _File(p)
                self._files.append(f)
                for k in f.entries:
                    if k in self._where:
                        raise ModelError(f"{self.folder}: tensor {k} appears in two shards")
                    self._where[k] = f
        except Exception:
            self.close()
            raise
        cfg = self.folder / "config.json"
        self.config = json.loads(cfg.read_text()) if cfg.is_file() else {}

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        a, b = self._where[name].entries[name]["data_offsets"]
        return b - a

    def get(self, name: str):
        try:
            f = self._where[name]
        except KeyError:
            raise ModelError(f"{self.folder}: no tensor named {name}") from None
        return f.read(name)

    def items(self) -> Iterator[tuple[str, object]]:
        for k in self._where:
            yield k, self.get(k)

    def files(self) -> list[Path]:
        return [f.path for f in self._files]
