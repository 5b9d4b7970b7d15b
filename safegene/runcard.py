"""The run card: one JSON file next to every command's output saying exactly how it was made.

`safegene_run.json` records the effective config, what the inputs were (path and content hash), the library
versions, wall time per phase and the process's peak memory. Every command writes it through `write_run_card`, so a
folder found on disk months later can be traced and reproduced.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from .config import to_dict

RUN_CARD = "safegene_run.json"

# Files up to this size are hashed whole; larger ones (weights) by size plus their first and last MiB, so that a
# card for a 70B model does not cost minutes of reading. The card names which kind of hash each input got.
_WHOLE_HASH_LIMIT = 64 << 20
_EDGE = 1 << 20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from . import __version__

    return {"safegene": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _file_digest(path: Path) -> tuple[str, str]:
    from .io import sha256_file

    size = path.stat().st_size
    if size <= _WHOLE_HASH_LIMIT:
        return sha256_file(path), "sha256"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(str(size).encode())
        h.update(f.read(_EDGE))
        f.seek(size - _EDGE)
        h.update(f.read(_EDGE))
    return h.hexdigest(), "sha256(size, first MiB, last MiB)"


def input_digest(ref: str | os.PathLike) -> dict[str, Any]:
    """Path and content hash of one input: a file, or a folder (hash over its files' names and digests). A name that
    is not on disk (an embedded model's short name, a built-in data set) is recorded as a name."""
    p = Path(ref).expanduser()
    if not p.exists():
        return {"ref": str(ref), "kind": "name"}
    if p.is_file():
        digest, how = _file_digest(p)
        return {"ref": str(p.resolve()), "kind": "file", "bytes": p.stat().st_size, "hash": digest, "hash_kind": how}
    h = hashlib.sha256()
    total, kinds = 0, set()
    # the card describes its folder and is not part of what it describes: a folder hashes the same before and after
    for f in sorted(x for x in p.rglob("*") if x.is_file() and x.name != RUN_CARD):
        digest, how = _file_digest(f)
        kinds.add(how)
        total += f.stat().st_size
        h.update(f"{f.relative_to(p)}\0{digest}\n".encode())
    return {"ref": str(p.resolve()), "kind": "folder", "bytes": total, "hash": h.hexdigest(),
            "hash_kind": "sha256 over files' " + " / ".join(sorted(kinds)) if kinds else "empty folder"}


def run_card(command: str, config: Any, inputs: dict[str, str | None] | None = None, started: float | None = None,
             timings: dict[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    """The card's content; `started` is a `time.perf_counter()` value taken when the command began."""
    card: dict[str, Any] = {
        "kind": command,
        "config": to_dict(config) if config is not None and not isinstance(config, dict) else config,
        "inputs": {name: input_digest(ref) for name, ref in (inputs or {}).items() if ref},
        "versions": library_versions(),
        "command_line": sys.argv[:],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timings": {**(timings or {}),
                    **({"total_s": round(time.perf_counter() - started, 2)} if started is not None else {})},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    card.update(extra)
    return card


def write_run_card(path: str | os.PathLike, card: dict[str, Any], since: float | None = None) -> Path:
    """Write the card atomically to `path` (a file, or a folder to put `safegene_run.json` in). A card of the same
    kind that the command's own stage wrote there after `since` (a wall-clock time: training statistics, data
    hashes) is completed, not replaced; any other card there is from an earlier command and is replaced."""
    from .io import write_json

    path = Path(path)
    if path.is_dir():
        path = path / RUN_CARD
    existing: dict[str, Any] = {}
    try:
        if since is not None and path.stat().st_mtime >= since - 1:
            existing = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if existing.get("kind") == card["kind"]:
        card = {**card, **existing, "command_line": card["command_line"],
                "timings": {**(existing.get("timings") or {}), **card.get("timings", {})},
                "inputs": {**card.get("inputs", {}), **(existing.get("inputs") or {})}}
    write_json(path, card)
    return path
