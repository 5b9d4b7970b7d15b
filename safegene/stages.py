"""Stage reuse: a stage whose recorded config matches what is asked now is not run again.

A training stage records its config in its run card; an adapter stage records a key (what its result depends on) in
the adapter's card. `bench`, `family build` and `protect` build on these, so that an interrupted or repeated run
resumes from what it stored.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from .config import to_dict
from .runcard import RUN_CARD


def same_config(recorded: Any, cfg: Any) -> bool:
    """Does a stage's recorded config equal `cfg`? A key the record lacks matches when `cfg` leaves it at its
    default: an option added in a later version does not invalidate finished stages that never used it."""
    current = json.loads(json.dumps(to_dict(cfg) if not isinstance(cfg, dict) else cfg))
    defaults = json.loads(json.dumps(to_dict(type(cfg)()))) if dataclasses.is_dataclass(cfg) else {}
    return match_recorded(recorded, current, defaults)


def match_recorded(recorded: Any, current: Any, defaults: Any) -> bool:
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        return recorded == current
    defaults = defaults if isinstance(defaults, dict) else {}
    for key, value in current.items():
        if key in recorded:
            if not match_recorded(recorded[key], value, defaults.get(key)):
                return False
        elif key not in defaults or defaults[key] != value:
            return False
    return set(recorded) <= set(current)


def read_card(path: Path) -> dict[str, Any] | None:
    """The JSON object stored at `path`, or None when it is missing, unreadable or not an object (a stage with no
    usable record runs again)."""
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def trained_or_reused(name: str, output: Path, cfg: Any, fn: Callable) -> tuple[dict[str, Any], bool]:
    """(run card, rebuilt?) of a training stage; a folder whose card records the same config is reused. A config
    with machine-dependent settings (`resolved()`: a training dtype of `auto`) is compared as it would run here,
    which is how its run card recorded it."""
    card = read_card(output / RUN_CARD)
    if card and same_config(card.get("config"), cfg.resolved() if hasattr(cfg, "resolved") else cfg):
        print(f"[{name}] reusing {output}")
        return card, False
    print(f"[{name}] training -> {output}")
    return fn(cfg, overwrite=True), True


def adapter_stage(name: str, output: Path, key: dict[str, Any], build: Callable[[], Any]) -> tuple[Any, float, bool]:
    """(adapter, build seconds, rebuilt?): reuse `output` when its card's bench key matches, else build and save."""
    from .adapter import SafetyAdapter

    card = read_card(output / "safegene.json")
    if card and same_config((card.get("bench") or {}).get("key"), key):
        print(f"[{name}] reusing {output}")
        return SafetyAdapter.load(output), float(card["bench"]["seconds"]), False
    print(f"[{name}] -> {output}")
    t = time.perf_counter()
    adapter = build()
    seconds = round(time.perf_counter() - t, 1)
    adapter.card["bench"] = {"key": key, "seconds": seconds}
    adapter.save(output, overwrite=True)
    return adapter, seconds, True
