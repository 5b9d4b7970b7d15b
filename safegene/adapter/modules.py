"""Naming of the linear modules a safety adapter targets; matching is always by name, never by order."""

from __future__ import annotations

import re
from typing import Iterable

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model, in module paths and saved tensor names
_PEFT_FACTOR = re.compile(rf"^{re.escape(PEFT_PREFIX)}(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


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
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


def parse_peft_key(key: str) -> tuple[str, str] | None:
    """(module, 'A' or 'B') for a PEFT LoRA factor's tensor name (the inverse of `peft_key`), else None."""
    m = _PEFT_FACTOR.match(key)
    return (m["module"], m["which"]) if m else None


def module_regex(modules: Iterable[str]) -> str:
    """A PEFT `target_modules` regex matching exactly these module paths (PEFT full-matches a string pattern)."""
    return "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def pattern_value(patterns: dict[str, object], module: str, default: object) -> object:
    """Value of a PEFT `rank_pattern` / `alpha_pattern` for `module` (its full dotted path), with PEFT's own
    semantics (peft.utils.other.get_pattern_key): the first key, in the dict's order, that is the whole path, a
    dotted suffix of it, or a regular expression full-matching such a suffix. Raises re.error for a bad regex."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return patterns.get(module, default)
