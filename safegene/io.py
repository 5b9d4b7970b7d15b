"""Atomic output helpers and hashing.

Outputs are built in a temporary sibling (same filesystem) and renamed into place, so a crash or Ctrl-C never
leaves a half-written artifact under the final name, and an input is never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import OutputExistsError


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _resolve(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def check_output_path(
    output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False
) -> Path:
    """Refuse an output that is, contains or lies inside an input; refuse an existing output unless `overwrite`."""
    out = _resolve(output)
    for inp in inputs:
        if inp is None:
            continue
        src = _resolve(inp)
        if not src.exists():
            continue
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise OutputExistsError(
                f"output {out} overlaps the input {src}; choose an output path outside every input "
                "(safegene never writes over its inputs)"
            )
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite (overwrite=True) or pick a new path")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `output` only if the block finishes without error."""
    out = _resolve(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes a private (0700) folder; the output is an ordinary folder, readable as the umask allows
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"output {out} appeared while writing; nothing was replaced")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(output: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `output` for writing; rename over `output` on success."""
    out = _resolve(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # as for atomic_dir: mkstemp's 0600 is for secrets, not outputs
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")

