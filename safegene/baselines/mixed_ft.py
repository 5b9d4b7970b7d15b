"""Mixed safety + task fine-tuning (Safety-Tuned LLaMAs): instead of T, fine-tune A again on the task data with a
share of refusals mixed in. It is a whole task fine-tune, paid again for every task model; its cost is that
training's wall time."""

from __future__ import annotations

from ..config import settings
from ..stages import trained_or_reused
from ..training import FinetuneConfig, finetune
from .registry import Defence, Method, MethodContext, register


def mixed_config(ctx: MethodContext) -> FinetuneConfig:
    s = ctx.settings
    return FinetuneConfig(model=ctx.aligned, task=ctx.task, n_examples=ctx.task_examples, poison_ratio=s.poison_ratio,
                          safety_ratio=s.mixed_safety_ratio, save="adapter",
                          output=str(ctx.output / f"task-{ctx.task}-mixed"), train=ctx.train(s.task_steps),
                          placement=s.placement)


def _build(ctx: MethodContext) -> Defence:
    from pathlib import Path

    cfg = mixed_config(ctx)
    card, rebuilt = trained_or_reused(f"mixed-ft {ctx.task}", Path(cfg.output), cfg,
                                      lambda c, overwrite: finetune(c, overwrite=overwrite, progress=ctx.progress))
    return Defence(model=cfg.output, row={"data": card.get("data")}, seconds=card["training"]["seconds"],
                   rebuilt=rebuilt)


register(Method(
    "mixed-ft", "mixed safety+task FT", "retrain",
    "A fine-tuned again on the task data with refusals mixed in, instead of T",
    # settings, not to_dict: a placement left at its default keeps the key of the runs recorded before it existed
    key=lambda ctx: {"mixed": settings(mixed_config(ctx))}, build=_build, demo=False, upstream=False))
