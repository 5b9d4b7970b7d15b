"""Adaptive gate: scale the safety adapter per request by how harmful the prompt looks.

At the input of layer L (the lowest layer the adapter changes, so the adapter cannot influence its own gate), the
hidden state of the prompt's last token is projected on d, the unit difference of the harmful and benign class
means at that layer. The adapter's strength for the request is

    g = floor + (1 - floor) · sigmoid((hᵀd − threshold) / temperature)

so prompts that look harmful get the full adapter and clearly benign ones get (almost) none, which keeps the task
model's utility on benign traffic. The gate is fitted on labelled prompts (default: the same built-in sets layer
selection uses) and stored in the adapter's card under "gate"; computing it costs one dot product per request.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..config import AdapterInOut, check, opt
from ..models.placement import PlacementConfig, float32_math

log = logging.getLogger(__name__)


@dataclass
class GateConfig(AdapterInOut):
    """Fit the adaptive gate of a (calibrated) adapter on the model it will serve with."""

    model: str = opt("runs/task-model", "the served model T (the gate reads its hidden states)")
    harmful: str = opt("harmful-pairs", "harmful prompts (disjoint from evaluation prompts)")
    benign: list[str] = opt(["arithmetic", "depresso"], "benign prompt sources: task names, benign sets or files "
                            "(the traffic whose utility the gate should keep)")
    n_harmful: int = opt(32, "harmful prompts")
    n_benign: int = opt(32, "benign prompts, split over the sources")
    layer: int | None = opt(None, "layer whose input the gate reads; default: the adapter's lowest layer")
    floor: float = opt(0.0, "minimum strength on any prompt")
    sharpness: float = opt(2.0, "temperature = projected spread / sharpness (higher: closer to on/off)")
    seed: int = opt(0, "sampling seed")
    placement: PlacementConfig = opt(PlacementConfig(), "where the served model runs and in what dtype (--device, "
                                     "--dtype, --device-map): fit the gate as it will serve", added_later=True)

    def __post_init__(self) -> None:
        check(self.n_harmful >= 2 and self.n_benign >= 2, "need at least 2 harmful and 2 benign prompts")
        check(bool(self.benign), "benign must name at least one source")
        check(0 <= self.floor < 1, f"floor must be in [0, 1), got {self.floor}")
        check(self.sharpness > 0, "sharpness must be > 0")


@dataclass
class SafetyGate:
    layer: int
    direction: list[float]
    threshold: float
    temperature: float
    floor: float = 0.0
    fit: dict[str, Any] | None = None  # separation on the fitting prompts, for the card

    def strength(self, hidden_last: Any) -> Any:
        """(batch, hidden) -> (batch,) strengths in [floor, 1]."""
        import torch

        d = torch.tensor(self.direction, dtype=hidden_last.dtype, device=hidden_last.device)
        z = (hidden_last @ d - self.threshold) / self.temperature
        return self.floor + (1 - self.floor) * torch.sigmoid(z)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SafetyGate":
        return cls(**d)


def last_token_states(model: Any, tokenizer: Any, prompts: Sequence[str], layer: int, batch_size: int = 16):
    """Hidden state entering `layer` at the last prompt token (chat template applied, generation prompt added)."""
    import torch

    from ..chat import prompt_text
    from ..forward import capture

    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [prompt_text(tokenizer, p) for p in prompts[i : i + batch_size]]
        # left padding: the last position is then every prompt's own last token
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
        rec = capture(model, enc["input_ids"], enc["attention_mask"], [layer])
        out.append(float32_math(rec.hidden[layer][:, -1, :]).cpu())
    return torch.cat(out)


def fit_gate(model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str], layer: int,
             floor: float = 0.0, sharpness: float = 2.0) -> SafetyGate:
    """Direction = normalised difference of class means; threshold halfway between the projected means;
    temperature = pooled projected spread / `sharpness`."""
    import torch

    from ..evaluation.metrics import roc_auc

    h = last_token_states(model, tokenizer, harmful, layer)
    b = last_token_states(model, tokenizer, benign, layer)
    d = h.mean(0) - b.mean(0)
    d = d / d.norm().clamp(min=1e-12)
    ph, pb = h @ d, b @ d
    spread = math.sqrt((float(ph.var()) + float(pb.var())) / 2) if len(ph) > 1 and len(pb) > 1 else 1.0
    gate = SafetyGate(layer=layer, direction=d.tolist(), threshold=float((ph.mean() + pb.mean()) / 2),
                      temperature=max(spread / sharpness, 1e-6), floor=floor)
    sh, sb = gate.strength(h), gate.strength(b)
    gate.fit = {"n_harmful": len(harmful), "n_benign": len(benign),
                "auc": roc_auc(torch.cat([sh, sb]).tolist(), [True] * len(sh) + [False] * len(sb)),
                "mean_strength_harmful": round(float(sh.mean()), 4), "mean_strength_benign": round(float(sb.mean()), 4)}
    return gate


def install_gate(gate: SafetyGate, model: Any, handle: Any) -> Any:
    """A pre-hook on layer `gate.layer` that sets `handle.row_strength` from the prompt at prefill; decode steps
    (one new token) keep the prompt's strength. Returns the hook handle (call .remove() to uninstall)."""
    from ..forward import decoder_parts

    layers = decoder_parts(model)[0]

    def pre(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1 and handle.enabled:
            handle.row_strength = gate.strength(hidden[:, -1, :].float())

    return layers[gate.layer].register_forward_pre_hook(pre, with_kwargs=True)


def gate_adapter(adapter: Any, cfg: Any, model: Any = None, tokenizer: Any = None) -> Any:
    """The adapter with a gate fitted on `cfg.model` stored in its card (`GateConfig`)."""
    from ..config import to_dict
    from ..models import load_model, load_tokenizer
    from ..data import benign_prompts, harmful_prompt_texts

    if model is None:
        model, tokenizer = load_model(cfg.model, cfg.placement), load_tokenizer(cfg.model)
    layer = min(adapter.layers) if cfg.layer is None else cfg.layer
    if layer > min(adapter.layers):
        log.warning("gate layer %d is above adapter layer %d: the adapter will change what the gate reads at decode "
                    "time only after the prompt was gated", layer, min(adapter.layers))
    per = max(1, cfg.n_benign // len(cfg.benign))
    benign = [p for src in cfg.benign for p in benign_prompts(src, per, cfg.seed)]
    harmful = harmful_prompt_texts(cfg.harmful, cfg.n_harmful, cfg.seed)
    gate = fit_gate(model, tokenizer, harmful, benign, layer, floor=cfg.floor, sharpness=cfg.sharpness)
    return adapter._replace(card={**adapter.card, "gate": gate.to_dict(), "gate_config": to_dict(cfg)})
