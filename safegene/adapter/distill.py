"""Distillation refinement: train the adapter's factors so that D + BA reproduces A's next-token distribution.

The SVD factors are the starting point. A's responses (greedy) to harmful and benign prompts define the
positions; A's top-k next-token probabilities there are the targets; only the factors train. A and D are never
in memory together: A's targets are computed first (and kept on the CPU), then A is released. Both load with the
extraction's placement (device, dtype, dispatch); the factors train in float32 whatever the models' dtype, and the
targets and losses are float32 (`safegene.objectives`).
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import check, opt
from ..generation import GenerationConfig, generate
from ..data import benign_prompts, harmful_prompt_texts
from ..data.records import PromptResponse
from ..models import PlacementConfig, load_model, load_tokenizer
from ..objectives import encode_batch, target_logits, teacher_topk, topk_cross_entropy, topk_kl
from .core import SafetyAdapter
from .runtime import AttachedAdapter


@dataclass
class DistillConfig:
    """Optional refinement: train the SVD factors so D + BA matches A's next-token distribution on safety prompts."""

    enabled: bool = opt(False, "run the distillation refinement after SVD", aliases=("--distill",))
    harmful: str = opt("harmful-pairs", "harmful prompts used for distillation (their responses are ignored)")
    benign: str = opt("arithmetic", "benign prompts (task name or pairs) so the fit keeps benign behaviour")
    n_harmful: int = opt(16, "harmful prompts")
    n_benign: int = opt(16, "benign prompts")
    response_tokens: int = opt(16, "A's greedy response tokens per prompt used as distillation positions")
    top_k: int = opt(64, "A's top-k next-token probabilities kept per position")
    steps: int = opt(20, "optimizer steps")
    batch_size: int = opt(8, "sequences per step")
    learning_rate: float = opt(5e-4, "AdamW learning rate on the factors")
    seed: int = opt(0, "sampling seed")

    def __post_init__(self) -> None:
        check(self.steps >= 1 and self.batch_size >= 1, "distill steps and batch_size must be >= 1")
        check(self.top_k >= 1, "top_k must be >= 1")


def distill_factors(adapter: SafetyAdapter, aligned: Path, degraded: Path, cfg: DistillConfig, progress: bool = True,
                    placement: PlacementConfig | None = None):
    """(refined adapter, statistics). `placement`: where A and D run (None: the CPU in float32)."""
    import torch
    from tqdm.auto import tqdm

    prompts = (harmful_prompt_texts(cfg.harmful, cfg.n_harmful, cfg.seed)
               + benign_prompts(cfg.benign, cfg.n_benign, cfg.seed))
    tok = load_tokenizer(aligned)
    teacher = load_model(aligned, placement)
    responses = generate(teacher, tok, prompts, GenerationConfig(max_new_tokens=cfg.response_tokens, batch_size=8),
                         progress=progress, desc="A's responses")
    pairs = [PromptResponse(p, r) for p, r in zip(prompts, responses) if r]
    batch = encode_batch(tok, pairs, max_length=256)
    t_vals, t_idx = teacher_topk(teacher, batch, cfg.top_k)
    t_vals, t_idx = t_vals.cpu(), t_idx.cpu()  # small; A's devices are freed whole for D
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the cached blocks A used go back before D is loaded

    student = load_model(degraded, placement)
    for p in student.parameters():
        p.requires_grad_(False)
    handle = AttachedAdapter(student, adapter, trainable_factors=True)
    params = [t for ab in handle.factors.values() for t in ab]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    def kl_all() -> float:
        with torch.no_grad():
            tot, n = 0.0, 0
            for s in range(0, len(batch), 8):
                idx = list(range(s, min(s + 8, len(batch))))
                rows = batch.target_rows(idx)
                lg = target_logits(student, batch.subset(idx))
                tot += float(topk_kl(lg, t_vals[rows], t_idx[rows])) * len(rows)
                n += len(rows)
            return tot / max(n, 1)

    handle.disable()
    kl_d = kl_all()
    handle.enable()
    kl_svd = kl_all()
    rng = random.Random(cfg.seed)
    t0 = time.perf_counter()
    losses = []
    for _ in tqdm(range(cfg.steps), desc="distilling", unit="step", disable=not progress):
        idx = rng.sample(range(len(batch)), min(cfg.batch_size, len(batch)))
        rows = batch.target_rows(idx)
        loss = topk_cross_entropy(target_logits(student, batch.subset(idx)), t_vals[rows], t_idx[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.detach().item(), 4))
    kl_after = kl_all()
    new_factors = dict(adapter.factors)
    for m, (a, b) in handle.factors.items():
        new_factors[m] = (a.detach().float().clone(), b.detach().float().clone())
    handle.remove()
    refined = SafetyAdapter(factors=new_factors, coefficients=dict(adapter.coefficients), selected=adapter.selected,
                            card=adapter.card)
    stats = {
        "n_sequences": len(batch),
        "n_positions": int(batch.target_mask.sum()),
        "kl_to_A": {"D": round(kl_d, 5), "D+svd": round(kl_svd, 5), "D+distilled": round(kl_after, 5)},
        "losses": losses,
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    return refined, stats
