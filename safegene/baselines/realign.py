"""Re-align: safety SFT of the task model (LoRA on refusal shots mixed with task shots), the cost SafeGene must beat.

It trains on the same shots SafeGene's recalibration uses (harmful prompts with the refusal answer, and task
examples so utility is kept), with the foundation's LoRA settings; the trained LoRA comes back as the change to
add to T, so it is evaluated like every other method. Its wall time is in the card.
"""

from __future__ import annotations

import time
from typing import Any

from ..adapter import SafetyAdapter
from ..config import settings, to_dict
from ..recalibration import RecalibrateConfig, refusal_shots, task_shots
from ..training import LoraTrainConfig, train_lora
from .registry import Defence, Method, register


def lora_factors(peft_model: Any) -> dict[str, tuple[Any, Any]]:
    """(A, B·scaling) of every LoRA-wrapped module of a PEFT model, keyed by the base model's module path."""
    factors = {}
    for name, mod in peft_model.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
            continue
        a = mod.lora_A["default"].weight.detach().float().clone()
        b = mod.lora_B["default"].weight.detach().float().clone() * float(mod.scaling["default"])
        key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        factors[key] = (a, b)
    return factors


def realign(task_model: str, cfg: RecalibrateConfig, train: LoraTrainConfig | None = None,
            progress: bool = True) -> SafetyAdapter:
    from ..models import load_model, load_tokenizer

    train = train or LoraTrainConfig()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(task_model, padding_side="right")
    model = load_model(task_model, cfg.placement)  # its own copy: training wraps it
    pairs = refusal_shots(cfg) + task_shots(cfg)
    peft_model, stats = train_lora(model, tokenizer, pairs, train, progress=progress)
    factors = lora_factors(peft_model)
    seconds = time.perf_counter() - t0
    del peft_model, model
    return SafetyAdapter(factors=factors, card={"name": "realign", "baseline": "realign", "task_model": task_model,
                                                 "train": to_dict(train), "shots": len(pairs), "training": stats.to_dict(),
                                                 "seconds": round(seconds, 1)})


register(Method(
    "realign", "re-align (safety SFT)", "update", "a LoRA trained on T by safety SFT on the same shots",
    key=lambda ctx: {"recalibrate": settings(ctx.recalibrate), "train": to_dict(ctx.train(ctx.settings.realign_steps))},
    build=lambda ctx: Defence(update=realign(ctx.task_model, ctx.recalibrate, ctx.train(ctx.settings.realign_steps),
                                             progress=ctx.progress))))
