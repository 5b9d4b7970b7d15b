"""Few-shot recalibration: one bounded coefficient per selected layer for a task model T.

    W'_l = W_l + α_l · ΔW_l,   α_l = α_max · sigmoid(θ_l) ∈ (0, α_max)

Only θ trains (the adapter's factors and T are frozen). The objective on a few dozen shots is

    NLL(refusal | harmful prompt)  +  λ · KL(T || T + adapter) on task shots' answer positions

so the coefficients buy back refusals where T lost them while leaving T's task outputs where they were.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from .adapter.core import SafetyAdapter
from .adapter.runtime import AttachedAdapter
from .config import AdapterInOut, check, opt, to_dict
from .data import harmful_prompt_texts, prompt_response_pairs
from .data.records import PromptResponse
from .io import sha256_text
from .forward import capture, decoder_parts, run_from
from .models.placement import PlacementConfig, float32_math
from .objectives import encode_batch, token_nll, topk_kl

log = logging.getLogger(__name__)


@dataclass
class RecalibrateConfig(AdapterInOut):
    """Few-shot recalibration: learn one bounded coefficient per selected layer for a task model T."""

    task_model: str = opt("runs/task-model", "task model T (HF folder, PEFT adapter folder, or embedded name)")
    harmful: str = opt("harmful-pairs", "harmful prompts for the refusal shots")
    refusals: str | None = opt(None, "prompt/response file of refusals; default: the refusal text below")
    refusal_text: str = opt("I'm sorry, but I can't assist with that.", "refusal target used when `refusals` is unset "
                            "(the default model's own most frequent refusal)")
    task: str = opt("arithmetic", "task name or prompt/response file for the utility shots")
    n_harmful: int = opt(32, "harmful shots (<= 32 by default)")
    n_task: int = opt(32, "task shots whose outputs must not move")
    utility_weight: float = opt(1.0, "weight of the KL-to-T term on task shots")
    alpha_max: float = opt(2.0, "coefficients are bounded to [0, alpha_max]")
    alpha_init: float = opt(1.0, "starting coefficient")
    steps: int = opt(30, "optimizer steps")
    batch_size: int = opt(8, "shots per step (half harmful, half task)")
    learning_rate: float = opt(0.1, "Adam learning rate on the coefficients' logits")
    max_length: int = opt(96, "token limit per shot")
    tied: bool = opt(False, "one coefficient shared by all layers (the RESTA baseline) instead of one per layer")
    sensitive: str | None = opt(None, "benign-but-sensitive prompts whose answers must not move: T's own greedy "
                                "answers join the task shots in the KL-to-T term, so the adapter learns not to refuse "
                                "what only sounds harmful (built-in: sensitive-shots; never an over-refusal "
                                "evaluation set)", added_later=True)
    n_sensitive: int = opt(32, "benign-but-sensitive shots (with `sensitive`)", added_later=True)
    sensitive_tokens: int = opt(32, "tokens of T's answer kept as each sensitive shot's target", added_later=True)
    seed: int = opt(0, "sampling seed")
    placement: PlacementConfig = opt(PlacementConfig(), "where T runs and in what dtype (--device, --dtype, "
                                     "--device-map); the coefficients and the objective stay float32",
                                     added_later=True)

    def __post_init__(self) -> None:
        check(self.alpha_max > 0, "alpha_max must be > 0")
        check(0 < self.alpha_init < self.alpha_max, f"alpha_init must be in (0, alpha_max={self.alpha_max})")
        check(self.steps >= 1 and self.batch_size >= 2, "steps >= 1 and batch_size >= 2 are needed")
        check(self.n_harmful >= 1 and self.n_task >= 1, "need at least one harmful and one task shot")


def refusal_shots(cfg: RecalibrateConfig) -> list[PromptResponse]:
    if cfg.refusals:
        return prompt_response_pairs(cfg.refusals, n=cfg.n_harmful, seed=cfg.seed)
    return [PromptResponse(p, cfg.refusal_text) for p in harmful_prompt_texts(cfg.harmful, cfg.n_harmful, cfg.seed)]


def task_shots(cfg: RecalibrateConfig) -> list[PromptResponse]:
    from .data.tasks import TASKS

    if cfg.task in TASKS:
        return [e.as_pair() for e in TASKS[cfg.task].load("train", n=cfg.n_task, seed=cfg.seed + 1)]
    return prompt_response_pairs(cfg.task, n=cfg.n_task, seed=cfg.seed + 1)


def sensitive_shots(cfg: RecalibrateConfig, model: Any, tokenizer: Any) -> list[PromptResponse]:
    """Benign-but-sensitive prompts with T's own answers (T alone: call before the adapter is attached)."""
    from .data import harmful_prompts
    from .generation import GenerationConfig, generate

    if not cfg.sensitive:
        return []
    prompts = [p.prompt for p in harmful_prompts(cfg.sensitive, n=cfg.n_sensitive, seed=cfg.seed + 2)]
    answers = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=cfg.sensitive_tokens,
                                                                   batch_size=16), progress=False)
    return [PromptResponse(p, a) for p, a in zip(prompts, answers) if a.strip()]


def _n_layers(model: Any) -> int:
    return len(decoder_parts(model)[0])


def recalibrate(adapter: SafetyAdapter, cfg: RecalibrateConfig, model: Any = None, tokenizer: Any = None,
                progress: bool = True) -> SafetyAdapter:
    """Learn α_l for `adapter`'s selected layers on task model `cfg.task_model`; returns the calibrated adapter."""
    import torch
    from tqdm.auto import tqdm

    from .models import load_model, load_tokenizer

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(cfg.task_model, cfg.placement), load_tokenizer(cfg.task_model)
    for msg in adapter.check_model(model, what=f"task model {cfg.task_model}"):
        log.warning(msg)
    for p in model.parameters():
        p.requires_grad_(False)
    harm = refusal_shots(cfg)
    task = task_shots(cfg) + sensitive_shots(cfg, model, tokenizer)
    hb = encode_batch(tokenizer, harm, cfg.max_length)
    tb = encode_batch(tokenizer, task, cfg.max_length)
    layers = adapter.layers
    start_layer = min(layers)
    handle = AttachedAdapter(model, adapter)
    try:
        handle.disable()
        t_phase = time.perf_counter()
        # layers below the lowest selected one never change: record their output once, run only the rest per step
        h_rec = capture(model, hb.input_ids, hb.attention_mask, list(range(start_layer, _n_layers(model))))
        t_rec = capture(model, tb.input_ids, tb.attention_mask, list(range(start_layer, _n_layers(model))))
        with torch.inference_mode():
            t_logp = torch.log_softmax(float32_math(run_from(model, start_layer, t_rec, tb.target_mask)), -1)
            t_vals, t_idx = t_logp.topk(64, -1)  # T's own answer distribution: what must not move
        t_vals, t_idx = t_vals.clone(), t_idx.clone()
        handle.enable()
        frac = cfg.alpha_init / cfg.alpha_max
        # θ is a float32 CPU tensor whatever the model's dtype and devices: each α_l reaches its layer's hook as a
        # 0-d tensor, which multiplies a bfloat16 or GPU activation like a number and takes its gradient back
        # tied: one θ broadcast over every layer (RESTA's single global coefficient, fitted by the same objective)
        theta = torch.nn.Parameter(torch.full((1 if cfg.tied else len(layers),), math.log(frac / (1 - frac))))
        opt = torch.optim.Adam([theta], lr=cfg.learning_rate)

        def set_alphas() -> Any:
            alpha = (cfg.alpha_max * torch.sigmoid(theta)).expand(len(layers))
            for j, l in enumerate(layers):
                handle.scales[l] = alpha[j]
            return alpha

        def objective(h_idx: list[int], t_idx_: list[int]):
            hm = hb.target_mask[h_idx]
            lh = token_nll(run_from(model, start_layer, h_rec.subset(h_idx), hm), hb.targets[h_idx][hm])
            rows = tb.target_rows(t_idx_)
            tm = tb.target_mask[t_idx_]
            kl = topk_kl(run_from(model, start_layer, t_rec.subset(t_idx_), tm), t_vals[rows], t_idx[rows])
            return lh, kl

        def full_eval() -> tuple[float, float]:
            with torch.no_grad():
                lh, kl = objective(list(range(len(hb))), list(range(len(tb))))
            return float(lh), float(kl)

        handle.disable()
        with torch.no_grad():  # T alone: its KL to itself is 0 by definition, so only the refusal term is run
            hm = hb.target_mask
            before = (float(token_nll(run_from(model, start_layer, h_rec, hm), hb.targets[hm])), 0.0)
        handle.enable()
        phases = {"cache_lower_layers_s": round(time.perf_counter() - t_phase, 2)}
        t_phase = time.perf_counter()
        set_alphas()
        rng = random.Random(cfg.seed)
        half = max(1, cfg.batch_size // 2)
        history = []
        for _ in tqdm(range(cfg.steps), desc="recalibrating α", unit="step", disable=not progress):
            alpha = set_alphas()
            lh, kl = objective(rng.sample(range(len(hb)), min(half, len(hb))), rng.sample(range(len(tb)), min(half, len(tb))))
            loss = lh + cfg.utility_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"loss": round(loss.detach().item(), 4), "refusal_nll": round(lh.detach().item(), 4),
                            "task_kl": round(kl.detach().item(), 5)})
        alpha = set_alphas().detach()
        phases["steps_s"] = round(time.perf_counter() - t_phase, 2)
        t_phase = time.perf_counter()
        after = full_eval()
        handle.set_coefficients(1.0)
        unit = full_eval()  # α = 1 everywhere: the uncalibrated adapter, for comparison
        phases["objective_checks_s"] = round(time.perf_counter() - t_phase, 2)
    finally:
        handle.remove()
    coeffs = {l: round(float(a), 6) for l, a in zip(layers, alpha)}
    out = adapter.with_coefficients(coeffs)
    out.card["recalibration"] = {
        "task_model": cfg.task_model,
        "config": to_dict(cfg),
        "coefficients": {str(l): c for l, c in coeffs.items()},
        "shots": {"harmful": len(harm), "task": len(task),
                  "data_sha256": sha256_text("\n".join(f"{p.prompt}\x1f{p.response}" for p in harm + task))},
        "objective": {
            "task_model_alone": {"refusal_nll": round(before[0], 4), "task_kl": round(before[1], 5)},
            "alpha_1": {"refusal_nll": round(unit[0], 4), "task_kl": round(unit[1], 5)},
            "after": {"refusal_nll": round(after[0], 4), "task_kl": round(after[1], 5)},
        },
        "history": history,
        "seconds": round(time.perf_counter() - t0, 2),
        "phases": phases,
    }
    return out
