"""Lazy access to a safetensors checkpoint folder, one tensor at a time (mergekit style).

Tensors are read with plain positioned reads rather than a memory map: a memory-mapped file's touched pages count
towards the process's resident memory until the kernel drops them, so reading two 2.5 GB checkpoints through a
map shows ~5 GB of RSS although only one tensor is alive. With reads, memory is one tensor (plus the caller's work).
The format is small: an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets per tensor),
then the raw data.

Which files make up the checkpoint follows transformers' own choice, so safegene reads the weights the model loader
loads: `model.safetensors` if present, else the shards named by `model.safetensors.index.json` (tensors found by the
index's name -> shard map, so a stray or stale shard in the folder is never read), else every `*.safetensors` file.
Offsets are Python ints and every read is positioned, so tensors (and files) past 2 GiB or 4 GiB read like small
ones; `get_rows`/`row_blocks` read part of a tensor, for work whose memory must not grow with the largest tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Iterator

from ..errors import ModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: bytes asked of one positioned read; Linux returns at most 0x7ffff000 anyway, and smaller reads cost nothing
READ_CHUNK = 1 << 30

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a ModelError naming the file and `fix` if it is not valid JSON or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read it ({type(e).__name__}: {e}); {fix}") from e
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from e
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object, found a {type(obj).__name__}; {fix}")
    return obj


def _entry_problem(e: Any) -> str | None:
    """What is wrong with one header entry, or None."""
    if not isinstance(e, dict):
        return f"a {type(e).__name__} instead of an object"
    if not isinstance(e.get("dtype"), str):
        return "no dtype"
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} is not a [start, end] byte range"
    return None


def _read_index(index: Path) -> dict[str, str]:
    """The name -> shard file map of a sharded checkpoint's index."""
    fix = "re-download the model (every shard and the index) or re-save it"
    obj = read_json_object(index, fix)
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ModelError(f"{index}: no 'weight_map' of tensor name -> shard file; {fix}")
    bad = next((v for v in wm.values() if Path(v).name != v or not v.endswith(".safetensors")), None)
    if bad is not None:
        raise ModelError(f"{index}: shard '{bad}' is not a .safetensors file name in the folder; {fix}")
    return wm


def _check_shards_present(index: Path, paths: list[Path], weight_map: dict[str, str]) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        p = missing[0]
        n = sum(1 for v in weight_map.values() if v == p.name)
        more = f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""
        raise ModelError(f"{p}: missing, but {index.name} lists it for {n} tensors{more}; the download is "
                         "incomplete: download every shard the index names")


class _File:
    def __init__(self, path: Path):
        self.path = path
        corrupt = "the file is corrupt: re-download or re-save it"
        try:
            size = path.stat().st_size
            self.fh = open(path, "rb")
        except OSError as e:
            raise ModelError(f"{path}: cannot open it ({type(e).__name__}: {e}); check that it exists and is readable") from e
        try:
            try:
                (n,) = struct.unpack("<Q", self.fh.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(self.fh.read(n))
                if not isinstance(header, dict):
                    raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
            except (OSError, ValueError, struct.error) as e:
                raise ModelError(f"{path}: cannot read safetensors ({type(e).__name__}: {e}); the file is corrupt or "
                                 "truncated") from e
            self.metadata = header.pop("__metadata__", {}) or {}
            for name, e in header.items():
                problem = _entry_problem(e)
                if problem:
                    raise ModelError(f"{path}: the header entry of tensor '{name}' is malformed ({problem}); {corrupt}")
            self.entries: dict[str, dict[str, Any]] = header
            self.data_start = 8 + n
            end = max((e["data_offsets"][1] for e in header.values()), default=0)
            if self.data_start + end > size:
                raise ModelError(f"{path}: tensor data run past the end of the file ({self.data_start + end} > {size} "
                                 "bytes); the file is corrupt or truncated: re-download or re-save it")
        except BaseException:
            self.fh.close()
            raise

    def _layout(self, name: str) -> tuple[Any, list[int], int, int]:
        """(torch dtype, shape, start, end) of a tensor, its byte range checked against its shape."""
        import torch

        e = self.entries[name]
        shape, (start, end) = e["shape"], e["data_offsets"]
        if e["dtype"] not in _DTYPES:
            raise ModelError(f"{self.path}: tensor '{name}' has dtype {e['dtype']}, which safegene cannot read; "
                             "convert the checkpoint to float32, float16 or bfloat16")
        dtype = getattr(torch, _DTYPES[e["dtype"]])
        if math.prod(shape) * dtype.itemsize != end - start:
            raise ModelError(f"{self.path}: tensor '{name}' spans {end - start} bytes but shape {shape} of {e['dtype']} "
                             f"needs {math.prod(shape) * dtype.itemsize}; the file is corrupt: re-download or re-save it")
        return dtype, shape, start, end

    def read(self, name: str, rows: tuple[int, int] | None = None):
        """The tensor, or rows [a, b) of its first dimension (a 0-d tensor has no rows to pick)."""
        import torch

        dtype, shape, start, end = self._layout(name)
        if rows is not None:
            a, b = rows
            if not shape or not 0 <= a <= b <= shape[0]:
                raise ModelError(f"{self.path}: rows {a}:{b} of tensor '{name}' of shape {shape} do not exist; ask for "
                                 f"rows within 0:{shape[0] if shape else 0}")
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            start, end, shape = start + a * row_bytes, start + b * row_bytes, [b - a, *shape[1:]]
        # an uninitialised buffer the read fills: a zero-filled bytearray would touch every page once more
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            self._read_into(memoryview(buf.numpy()), self.data_start + start, name)
        return buf.view(dtype).reshape(shape)

    def _read_into(self, view: memoryview, offset: int, name: str, chunk: int = READ_CHUNK) -> None:
        # one positioned read returns at most 0x7ffff000 bytes on Linux (a 7B model's float32 embedding is larger),
        # and may return less on other systems: only a read of 0 bytes means the file really ends here
        done, size = 0, len(view)
        while done < size:
            n = os.preadv(self.fh.fileno(), [view[done : done + chunk]], offset + done)
            if n == 0:
                raise ModelError(f"{self.path}: tensor '{name}' ends after {done} of its {size} bytes; the file is "
                                 "truncated: re-download or re-save it")
            done += n

    def close(self) -> None:
        self.fh.close()


class LazyCheckpoint:
    """Index of tensor name -> file for a (possibly sharded) safetensors folder; tensors read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        weight_map = _read_index(index) if not single.is_file() and index.is_file() else None
        if weight_map is not None:
            paths = sorted({self.folder / f for f in weight_map.values()})
            _check_shards_present(index, paths, weight_map)
        elif single.is_file():
            paths = [single]
        else:
            paths = [f for f in sorted(self.folder.glob("*.safetensors"))
                     if not f.name.startswith(("adapter_", "safegene_", "."))]
        if not paths:
            raise ModelError(f"{self.folder}: no *.safetensors weights found")
        cfg = self.folder / "config.json"  # read before any file is open, so a bad one leaks no handle
        self.config = read_json_object(cfg, "re-download the model or fix the file") if cfg.is_file() else {}
        self._files: list[_File] = []
        self._where: dict[str, _File] = {}
        try:
            for p in paths:
                f = _File(p)
                self._files.append(f)
                if weight_map is not None:
                    continue
                for k in f.entries:
                    if k in self._where:
                        raise ModelError(f"{self.folder}: tensor {k} appears in two shards")
                    self._where[k] = f
            if weight_map is not None:
                by_path = {f.path: f for f in self._files}
                for k, shard in weight_map.items():
                    f = by_path[self.folder / shard]
                    if k not in f.entries:
                        raise ModelError(f"{index}: tensor '{k}' is mapped to {shard}, which does not contain it; the "
                                         "index and the shards come from different saves: re-download the model "
                                         "(every shard and the index) or re-save it")
                    self._where[k] = f
        except Exception:
            self.close()
            raise

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

    def _file(self, name: str) -> _File:
        f = self._where.get(name)
        if f is None:
            files = [p.name for p in self.files()]
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise ModelError(f"{self.folder}: no tensor named '{name}' in {shown}; the checkpoint is incomplete or of "
                             "another architecture: re-download it or use a model of the same architecture")
        return f

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        a, b = self._file(name).entries[name]["data_offsets"]
        return b - a

    def get(self, name: str):
        return self._file(name).read(name)

    def get_rows(self, name: str, start: int, stop: int):
        """Rows [start, stop) of a tensor's first dimension, reading only those bytes."""
        return self._file(name).read(name, (start, stop))

    def row_blocks(self, name: str, max_bytes: int = 64 * 2**20) -> Iterator[tuple[int, object]]:
        """(first row, block) over a tensor in blocks of at most `max_bytes` (at least one row each): a pass over a
        tensor larger than memory allows, e.g. a norm of the 2 GiB float32 embedding of a 7B model."""
        shape = self.shape(name)
        if not shape:
            yield 0, self.get(name)
            return
        row_bytes = max(self.nbytes(name) // max(shape[0], 1), 1)
        step = max(1, max_bytes // row_bytes)
        for a in range(0, shape[0], step):
            yield a, self.get_rows(name, a, min(a + step, shape[0]))

    def items(self) -> Iterator[tuple[str, object]]:
        for k in self._where:
            yield k, self.get(k)

    def files(self) -> list[Path]:
        return [f.path for f in self._files]
