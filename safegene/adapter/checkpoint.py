"""Lazy, memory-mapped access to a safetensors checkpoint folder, one tensor at a time (mergekit style).

The size of a model never sets the memory needed: only the tensor being read is materialised.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

from ..errors import ModelError


class LazyCheckpoint:
    """Index of tensor name -> file for a (possibly sharded) safetensors folder; tensors read on demand."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith(("adapter_", "safegene_"))]
        if not files:
            raise ModelError(f"{self.folder}: no *.safetensors weights found")
        self._stack = ExitStack()
        self._handles = {}
        self._where: dict[str, str] = {}
        try:
            for f in files:
                h = self._stack.enter_context(safe_open(str(f), framework="pt"))
                self._handles[f.name] = h
                for k in h.keys():
                    self._where[k] = f.name
        except Exception as e:
            self._stack.close()
            raise ModelError(f"{self.folder}: cannot read safetensors ({type(e).__name__}: {e}); the file is corrupt "
                             "or truncated") from e
        cfg = self.folder / "config.json"
        self.config = json.loads(cfg.read_text()) if cfg.is_file() else {}

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str):
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise ModelError(f"{self.folder}: no tensor named {name}") from None

    def items(self) -> Iterator[tuple[str, object]]:
        for k in self._where:
            yield k, self.get(k)

    def files(self) -> list[Path]:
        return [self.folder / f for f in self._handles]
