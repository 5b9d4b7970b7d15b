"""Safe LoRA and SafeMERGE: act on task-update modules that drifted away from the safety subspace.

For a module with task update ΔW_t = B_t A_t and safety update ΔW_s = B_s A_s (aligned minus degraded), let
P = Q Qᵀ be the orthogonal projection onto the column space of B_s (Q = orth(B_s)). The drift measure is

    cos = ||P ΔW_t||_F / ||ΔW_t||_F        (= cosine between ΔW_t and its projection, since P is a projection)

computed from r x r products only. Safe LoRA (Hsu et al., 2024) replaces ΔW_t by P ΔW_t in drifted modules; its
paper uses the approximate projection V Vᵀ/||V||_F, we use the exact projection onto the same column space.
SafeMERGE (Djuhera et al., 2025) instead merges (1 − w) ΔW_t + w ΔW_safety-LoRA there; its safety LoRA is trained
on safety data, here it is the same A − D update SafeGene starts from, so the comparison isolates the method.
Both return the change to add to T as a `SafetyAdapter` (exact, low rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..adapter import SafetyAdapter
from ..config import check, opt, to_dict
from .registry import Defence, Method, register
from .task_update import task_update


@dataclass
class ProjectionBaselineConfig:
    """Safe LoRA / SafeMERGE: which task-update modules count as drifted from the safety subspace.

    For each module, cos = ||P ΔW_task||_F / ||ΔW_task||_F, with P the orthogonal projection onto the column space of
    the safety update (aligned minus degraded). Modules with cos below `threshold` are treated; without a threshold,
    the `fraction` of modules with the lowest cos are (the released Safe LoRA code's "number of projected layers").
    """

    threshold: float | None = opt(None, "cosine threshold τ; None: use `fraction`")
    fraction: float = opt(0.5, "share of modules treated when no threshold is set")
    merge_weight: float = opt(0.5, "SafeMERGE only: W = W_base + (1-w) ΔW_task + w ΔW_safety on treated modules")

    def __post_init__(self) -> None:
        check(0 < self.fraction <= 1, f"fraction must be in (0, 1], got {self.fraction}")
        check(self.threshold is None or 0 <= self.threshold <= 1, "threshold must be in [0, 1]")
        check(0 <= self.merge_weight <= 1, f"merge_weight must be in [0, 1], got {self.merge_weight}")


def _frob_sq(a: Any, b: Any) -> float:
    # ||B A||_F^2 = trace((A Aᵀ)(Bᵀ B))
    return float(((a @ a.T) * (b.T @ b)).sum().clamp(min=0))


def _basis(b_s: Any) -> Any:
    import torch

    q, r = torch.linalg.qr(b_s.double())
    keep = r.diagonal().abs() > 1e-10 * max(float(r.abs().max()), 1e-30)  # drop directions B_s does not span
    return q[:, keep].to(b_s.dtype)


def subspace_cosines(update: SafetyAdapter, safety: SafetyAdapter) -> dict[str, float]:
    """cos(ΔW_t, P ΔW_t) for every module the two updates share (matched by name)."""
    out = {}
    for m in update.modules():
        if m not in safety.factors:
            continue
        a_t, b_t = update.factors[m]
        b_t = b_t * update.coefficient(m)
        q = _basis(safety.factors[m][1])
        total = _frob_sq(a_t, b_t)
        out[m] = (_frob_sq(a_t, q.T @ b_t) / total) ** 0.5 if total > 0 else 1.0
    return out


def treated_modules(cosines: dict[str, float], cfg: ProjectionBaselineConfig) -> list[str]:
    if cfg.threshold is not None:
        return sorted(m for m, c in cosines.items() if c < cfg.threshold)
    k = max(1, round(cfg.fraction * len(cosines)))
    return sorted(sorted(cosines, key=lambda m: cosines[m])[:k])


def _card(name: str, cfg: ProjectionBaselineConfig, cosines: dict[str, float], treated: list[str]) -> dict[str, Any]:
    return {"name": name, "baseline": name, "config": to_dict(cfg), "n_modules": len(cosines), "n_treated": len(treated),
            "cosine": {"min": round(min(cosines.values()), 5), "max": round(max(cosines.values()), 5),
                       "mean": round(sum(cosines.values()) / len(cosines), 5)},
            "treated_layers": sorted({int(m.split(".layers.")[1].split(".")[0]) for m in treated if ".layers." in m})}


def safe_lora(update: SafetyAdapter, safety: SafetyAdapter, cfg: ProjectionBaselineConfig | None = None) -> SafetyAdapter:
    """Change to add to T: −(I − P) ΔW_t in treated modules, so they keep only P ΔW_t."""
    cfg = cfg or ProjectionBaselineConfig()
    cos = subspace_cosines(update, safety)
    treated = treated_modules(cos, cfg)
    factors = {}
    for m in treated:
        a_t, b_t = update.factors[m]
        b_t = b_t * update.coefficient(m)
        q = _basis(safety.factors[m][1])
        factors[m] = (a_t.clone(), -(b_t - q @ (q.T @ b_t)))
    return SafetyAdapter(factors=factors, card={**_card("safe-lora", cfg, cos, treated), "fingerprint": safety.card.get("fingerprint")})


def safemerge(update: SafetyAdapter, safety: SafetyAdapter, cfg: ProjectionBaselineConfig | None = None) -> SafetyAdapter:
    """Change to add to T: −w ΔW_t + w ΔW_s in treated modules (rank of both, concatenated)."""
    import torch

    cfg = cfg or ProjectionBaselineConfig()
    w = cfg.merge_weight
    cos = subspace_cosines(update, safety)
    treated = treated_modules(cos, cfg)
    factors = {}
    for m in treated:
        a_t, b_t = update.factors[m]
        a_s, b_s = safety.factors[m]
        factors[m] = (torch.cat([a_t, a_s], 0), torch.cat([-w * update.coefficient(m) * b_t, w * b_s], 1))
    return SafetyAdapter(factors=factors, card={**_card("safemerge", cfg, cos, treated), "fingerprint": safety.card.get("fingerprint")})


def _projection_method(name: str, label: str, combine: Any, description: str) -> Method:
    return register(Method(
        name, label, "update", description,
        key=lambda ctx: {"projection": to_dict(ctx.settings.projection)},
        build=lambda ctx: Defence(update=combine(task_update(ctx.task_model, ctx.aligned), ctx.adapter,
                                                 ctx.settings.projection))))


_projection_method("safe-lora", "Safe LoRA", safe_lora,
                   "in the modules least aligned with the safety subspace, only the task update's projection onto it")
_projection_method("safemerge", "SafeMERGE", safemerge,
                   "in those modules, (1 − w)·task update + w·(A − D)")
