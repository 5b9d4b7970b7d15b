"""RESTA (Bhardwaj et al., 2024): add the whole safety vector A − D to T with one global coefficient γ.

γ is fitted on exactly the few shots SafeGene's recalibration gets, by the same objective, with every layer
sharing one coefficient (`RecalibrateConfig.tied`); so RESTA and SafeGene differ only in layer selection and
per-layer coefficients. The paper's DARE sparsification step is not applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..adapter import SafetyAdapter
from ..config import settings
from ..recalibration import RecalibrateConfig, recalibrate
from .registry import Defence, Method, register


def resta(safety: SafetyAdapter, cfg: RecalibrateConfig, model: Any = None, tokenizer: Any = None,
          progress: bool = True) -> SafetyAdapter:
    full = safety.select(safety.all_layers).with_coefficients(1.0)
    out = recalibrate(full, dataclasses.replace(cfg, tied=True), model=model, tokenizer=tokenizer, progress=progress)
    out.card["baseline"] = "resta"
    return out


register(Method(
    "resta", "RESTA", "update", "every layer of A − D with one global coefficient, fitted on the same shots",
    key=lambda ctx: {"recalibrate": settings(ctx.recalibrate), "tied": True},
    build=lambda ctx: Defence(update=resta(ctx.adapter, ctx.recalibrate, model=ctx.model, tokenizer=ctx.tokenizer,
                                           progress=ctx.progress))))
