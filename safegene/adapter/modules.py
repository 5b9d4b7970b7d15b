"""Naming of the linear modules a safety adapter targets; matching is always by name, never by order."""

from __future__ import annotations

import re
from typing import Iterable

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(module: str) -> int | None:
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def is_target(module: str, targets: Iterable[str]) -> bool:
    """`module` (a dotted path without '.weight') ends with one of `targets` and sits inside a numbered layer."""
    leaf = module.rsplit(".", 1)[-1]
    return leaf in set(targets) and layer_of(module) is not None


def target_weight_names(names: Iterable[str], targets: Iterable[str], layers: Iterable[int] | None = None) -> list[str]:
    """Weight tensor names of target modules, sorted by (layer, module name)."""
    keep = set(layers) if layers is not None else None
    out = []
    for n in names:
        if not n.endswith(".weight"):
            continue
        mod = n[: -len(".weight")]
        if is_target(mod, targets) and (keep is None or layer_of(mod) in keep):
            out.append(n)
    return sorted(out, key=lambda n: (layer_of(n), n))


def parse_layers(spec: str | Iterable[int] | None, n_layers: int | None = None) -> list[int] | None:
    """'0-5,8,10' or a list -> sorted unique layer indices (None stays None = all layers)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        out: set[int] = set()
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
        layers = sorted(out)
    else:
        layers = sorted(set(int(x) for x in spec))
    if n_layers is not None:
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            from ..errors import ConfigError

            raise ConfigError(f"layer indices {bad} are out of range for a model with {n_layers} layers")
    return layers


def peft_key(module: str, which: str) -> str:
    """PEFT's tensor name for a LoRA factor of `module` ('A' or 'B')."""
    return f"base_model.model.{module}.lora_{which}.weight"


def module_regex(modules: Iterable[str]) -> str:
    """A PEFT `target_modules` regex matching exactly these module paths (PEFT full-matches a string pattern)."""
    return "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"
