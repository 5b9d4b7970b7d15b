"""SafeGene itself and its two ablations, as benchmark methods: the selected layers of A − D with one recalibrated
coefficient per layer; every layer with one coefficient each (no selection); the selected layers at α = 1 (no
recalibration).

Then SafeGene with the opt-in shot knobs of `RecalibrateConfig` (issue 15), one per row so the benchmark compares
each with plain SafeGene on the same layers and shots: A's own refusals as targets, the preference term against
compliance, half of the harmful shots jailbreak-wrapped (a template family disjoint from the evaluation's), all
three together, and a floor on the refusal NLL at the aligned model's level (for tasks that contradict refusals);
and SafeGene fitted as first written (Adam steps on mini-batches instead of the line search), to compare the two
fits on the same rows. They are left out of the demo preset."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..config import settings
from ..recalibration import RecalibrateConfig, recalibrate
from .registry import Defence, Method, MethodContext, register


def _recalibrated(ctx: MethodContext, adapter: object, cfg: RecalibrateConfig | None = None) -> Defence:
    return Defence(update=recalibrate(adapter, cfg or ctx.recalibrate, model=ctx.model, tokenizer=ctx.tokenizer,
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


def aligned_refusals(ctx: MethodContext) -> RecalibrateConfig:
    return dataclasses.replace(ctx.recalibrate, refusal_target="aligned", aligned=ctx.aligned)


def preference(ctx: MethodContext) -> RecalibrateConfig:
    return dataclasses.replace(ctx.recalibrate, preference_weight=1.0)


def jailbreak_shots(ctx: MethodContext) -> RecalibrateConfig:
    return dataclasses.replace(ctx.recalibrate, jailbreak_shots=0.5)


def adam_steps(ctx: MethodContext) -> RecalibrateConfig:
    return dataclasses.replace(ctx.recalibrate, optimizer="adam")


def robust_shots(ctx: MethodContext) -> RecalibrateConfig:
    return dataclasses.replace(ctx.recalibrate, refusal_target="aligned", aligned=ctx.aligned, preference_weight=1.0,
                               jailbreak_shots=0.5)


def refusal_floor(ctx: MethodContext) -> RecalibrateConfig:
    return dataclasses.replace(ctx.recalibrate, refusal_floor="aligned", aligned=ctx.aligned)


def sensitive_kl(ctx: MethodContext) -> RecalibrateConfig:
    return dataclasses.replace(ctx.recalibrate, sensitive="sensitive-shots")


def _shot_variant(name: str, label: str, description: str, config: Callable[[MethodContext], RecalibrateConfig]) -> Any:
    # the key is the variant's whole recalibration config: its knobs are non-default, so it never matches plain
    # SafeGene's key, and a change of the shared settings rebuilds it like SafeGene
    return register(Method(name, label, "update", description, key=lambda ctx: {"recalibrate": settings(config(ctx))},
                           build=lambda ctx: _recalibrated(ctx, ctx.selected, config(ctx)), demo=False,
                           experimental=True))


_shot_variant("safegene-aligned-refusals", "SafeGene, A's own refusals as targets",
              "SafeGene trained towards the aligned model's greedy refusal to each harmful shot (the fixed sentence "
              "where A does not refuse)", aligned_refusals)
_shot_variant("safegene-preference", "SafeGene + preference against compliance",
              "SafeGene with softplus(NLL(refusal) − NLL(compliant answer)) per harmful shot, weight 1",
              preference)
_shot_variant("safegene-jailbreak-shots", "SafeGene, half the shots jailbreak-wrapped",
              "SafeGene with half of the harmful shots wrapped in PyRIT jailbreak templates (none of the evaluation's)",
              jailbreak_shots)
_shot_variant("safegene-robust-shots", "SafeGene, A's refusals + preference + jailbreak shots",
              "SafeGene with all three shot knobs: A's refusals, the preference term (weight 1), half the shots wrapped",
              robust_shots)
_shot_variant("safegene-refusal-floor", "SafeGene, refusal NLL floored at A's",
              "SafeGene whose harmful shots' refusal NLL may not end above the aligned model's own (the coefficients "
              "follow the refusal gradient as far as that needs, whatever the task pays): for tasks whose data "
              "contradicts refusals", refusal_floor)
_shot_variant("safegene-sensitive", "SafeGene + sensitive prompts kept (KL)",
              "SafeGene with 32 benign-but-sensitive prompts (built-in sensitive-shots, disjoint from XSTest) and T's "
              "own answers to them added to the keep-T's-behaviour KL term: the over-refusal knob of issue 15",
              sensitive_kl)
_shot_variant("safegene-adam", "SafeGene, Adam steps (as first written)",
              "SafeGene fitted by the bench's recal_steps Adam steps on mini-batches of shots instead of the line search: "
              "the recalibration before issue 15, for comparison on the same shots", adam_steps)
