"""SafeGene itself and its two ablations, as benchmark methods: the selected layers of A − D with one recalibrated
coefficient per layer; every layer with one coefficient each (no selection); the selected layers at α = 1 (no
recalibration)."""

from __future__ import annotations

from ..config import settings
from ..recalibration import recalibrate
from .registry import Defence, Method, MethodContext, register


def _recalibrated(ctx: MethodContext, adapter: object) -> Defence:
    return Defence(update=recalibrate(adapter, ctx.recalibrate, model=ctx.model, tokenizer=ctx.tokenizer,
                                      progress=ctx.progress))


register(Method(
    "safegene", "SafeGene", "update", "the selected layers of A − D, one coefficient per layer fitted on few shots",
    key=lambda ctx: {"recalibrate": settings(ctx.recalibrate)},
    build=lambda ctx: _recalibrated(ctx, ctx.selected)))

register(Method(
    "safegene-all-layers", "SafeGene, no layer selection", "update",
    "ablation: every layer of A − D, one coefficient per layer",
    key=lambda ctx: {"recalibrate": settings(ctx.recalibrate), "layers": "all"},
    build=lambda ctx: _recalibrated(ctx, ctx.adapter.select(ctx.adapter.all_layers))))

register(Method(
    "safegene-alpha1", "SafeGene, α=1 (no recalibration)", "update", "ablation: the selected layers at α = 1",
    key=lambda ctx: {"alpha": 1.0},
    build=lambda ctx: Defence(update=ctx.selected.with_coefficients(1.0))))
