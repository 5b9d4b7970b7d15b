"""Data-aware layer selection.

For each layer l, on harmful and benign prompts (last prompt token, the position the answer starts from):
  * the layer's harmful-minus-benign direction d_l = mean_harmful(h_l) - mean_benign(h_l) in the model's own
    activations, and σ_l, the pooled within-class spread of the activations along d_l;
  * the push of the adapter's layer-l update alone: the layer is re-run on its recorded input with only its own
    ΔW switched on, Δh_l = h_l' - h_l.
Scores must be comparable across layers (raw activation gaps grow with depth and would just pick the last
layers), so each is in units that do not depend on the layer's activation scale:
  refusal-gain  = mean_harmful(Δ log p(refusal)) - mean_benign(Δ log p(refusal))   (default)
                  where Δ log p is the change of the log-probability of a refusal answer when only layer l's update
                  is switched on: what the layer alone does for refusing harmful prompts minus what it does for
                  refusing benign ones, in nats. By default estimated as d log p / d α_l at α = 0 (one
                  backward pass for all layers); `linearize=False` runs one partial forward pass per layer.
  push          = mean_harmful(Δh·d̂)/σ  -  mean_benign(|Δh·d̂|)/σ    (moves harmful prompts towards the harmful
                                                                      side, leaves benign ones alone)
  separability  = (mean_harmful(h·d̂) - mean_benign(h·d̂)) / σ        (how strongly the layer separates the sets)
  norm          = ||ΔW_l||_F                                           (data-free baseline)
The activation scores (push, separability) cost one forward pass plus one extra pass through each single layer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .adapter.core import SafetyAdapter
from .adapter.runtime import AttachedAdapter
from .config import AdapterInOut, check, check_choices, opt, to_dict
from .data import benign_prompts, harmful_prompt_texts
from .chat import prompt_text
from .forward import _first, decoder_parts
from .io import sha256_text
from .models.placement import PlacementConfig, float32_math

log = logging.getLogger(__name__)


@dataclass
class SelectConfig(AdapterInOut):
    """Data-aware layer selection: score layers by how the adapter moves harmful vs benign prompts' activations."""

    model: str = opt("runs/degraded", "model whose activations are scored (D, or a task model of the family)")
    harmful: str = opt("harmful-pairs", "harmful prompts (disjoint from evaluation prompts)")
    benign: str = opt("arithmetic", "benign prompts: task name, benign set, or file")
    n_harmful: int = opt(32, "harmful prompts")
    n_benign: int = opt(32, "benign prompts")
    method: str = opt("refusal-gain", "refusal-gain (what the layer's update alone adds to log p(refusal) on harmful "
                      "minus benign prompts), push (its push along the harmful-benign activation direction), "
                      "separability (Fisher ratio of the layer's activations), or norm (adapter norm)",
                      choices=("refusal-gain", "push", "separability", "norm"))
    refusal_text: str = opt("I'm sorry, but I can't assist with that.", "refusal answer scored by refusal-gain")
    linearize: bool = opt(True, "refusal-gain from d log p / d α_l at α=0 (one backward pass for all layers) instead "
                          "of one forward pass per layer")
    top_k: int | None = opt(8, "keep this many top-scoring layers")
    threshold: float | None = opt(None, "or keep layers whose normalised score >= threshold (0..1)")
    batch_size: int = opt(8, "prompts per forward pass")
    seed: int = opt(0, "sampling seed")
    placement: PlacementConfig = opt(PlacementConfig(), "where the scored model runs and in what dtype (--device, "
                                     "--dtype, --device-map); scores are computed in float32", added_later=True)

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.top_k is not None or self.threshold is not None, "set top_k or threshold")
        check(self.top_k is None or self.top_k >= 1, "top_k must be >= 1")


def layer_activations_and_pushes(adapter: SafetyAdapter, model: Any, tokenizer: Any, prompts: Sequence[str],
                                 batch_size: int = 8, progress: bool = True):
    """Last-token output of every layer (n, L, H) and the push of each layer's own update (n, L, H)."""
    import torch
    from tqdm.auto import tqdm

    from .forward import capture

    layers = decoder_parts(model)[0]
    idx = adapter.all_layers
    handle = AttachedAdapter(model, adapter.select(idx))
    zero = {l: 0.0 for l in idx}

    def layer_out(l: int, rec) -> Any:
        args, kw = rec.calls[l]
        return _first(layers[l](rec.hidden[l], *args, **kw))[:, -1, :]

    acts, pushes = [], []
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, len(prompts), batch_size), desc="scoring layers", unit="batch", disable=not progress):
                texts = [prompt_text(tokenizer, p) for p in prompts[s : s + batch_size]]
                # left padding: the last position is every row's last prompt token
                enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
                handle.disable()
                rec = capture(model, enc["input_ids"], enc["attention_mask"])
                # a layer's output is the next layer's recorded input; only the last layer must be run again
                base = torch.stack([rec.hidden[l + 1][:, -1, :] if l + 1 in rec.hidden else layer_out(l, rec)
                                    for l in idx], 1)
                push = torch.zeros_like(base)
                handle.enable()
                for j, l in enumerate(idx):
                    handle.set_coefficients({**zero, l: adapter.coefficients.get(l, 1.0)})
                    push[:, j] = layer_out(l, rec) - base[:, j]
                acts.append(float32_math(base).cpu())
                pushes.append(float32_math(push).cpu())
    finally:
        handle.remove()
    return torch.cat(acts), torch.cat(pushes)


def score_layers(acts_h, acts_b, push_h, push_b) -> dict[str, Any]:
    """Per-layer components from activations (n, L, H) of harmful (h) and benign (b) prompts."""

    d = acts_h.mean(0) - acts_b.mean(0)  # (L, H)
    d_hat = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj_h = (acts_h * d_hat).sum(-1)  # (n_h, L)
    proj_b = (acts_b * d_hat).sum(-1)
    var = ((proj_h - proj_h.mean(0)) ** 2).sum(0) + ((proj_b - proj_b.mean(0)) ** 2).sum(0)
    sigma = (var / max(proj_h.shape[0] + proj_b.shape[0] - 2, 1)).sqrt().clamp_min(1e-6)
    sep = (proj_h.mean(0) - proj_b.mean(0)) / sigma
    ph = (push_h * d_hat).sum(-1).mean(0) / sigma
    pb = (push_b * d_hat).sum(-1).abs().mean(0) / sigma
    return {"separability": sep.tolist(), "push_harmful": ph.tolist(), "push_benign": pb.tolist(),
            "push": (ph - pb).tolist(), "sigma": sigma.tolist()}


def refusal_opening(tokenizer: Any, refusal_text: str, max_tokens: int) -> str:
    """The first `max_tokens` tokens of the refusal, as text: where the decision to refuse is made."""
    return tokenizer.decode(tokenizer(refusal_text, add_special_tokens=False)["input_ids"][:max_tokens])


def refusal_gain(adapter: SafetyAdapter, model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str],
                 refusal_text: str, batch_size: int = 8, progress: bool = True, max_refusal_tokens: int = 4,
                 reuse_prefix: bool = True) -> dict[str, Any]:
    """Per layer: change of log p(refusal opening | prompt) with only that layer's update on, harmful vs benign.

    Only the first `max_refusal_tokens` tokens of the refusal are scored: the decision to refuse is made there.
    Each layer's pass starts from the recorded input of that layer, and logits are computed at scored positions only;
    with `reuse_prefix`, the chat-template opening a batch's prompts share runs once per pass on one row
    (`forward.ShotPasses`: the same scores up to float rounding, on the model layouts it knows).
    """
    import torch
    from tqdm.auto import tqdm

    from .data.records import PromptResponse
    from .forward import ShotPasses, capture
    from .objectives import encode_batch, target_logprob_sums

    opening = refusal_opening(tokenizer, refusal_text, max_refusal_tokens)
    pairs = [PromptResponse(p, opening) for p in list(harmful) + list(benign)]
    nh = len(harmful)
    idx = adapter.all_layers
    handle = AttachedAdapter(model, adapter.select(idx))
    sums = {l: torch.zeros(len(pairs)) for l in idx}
    base = torch.zeros(len(pairs))

    try:
        with torch.inference_mode():
            steps = [(s, encode_batch(tokenizer, pairs[s : s + batch_size], 256)) for s in range(0, len(pairs), batch_size)]
            bar = tqdm(total=len(steps) * (len(idx) + 1), desc="scoring layers", unit="pass", disable=not progress)
            for s, batch in steps:
                handle.disable()
                rec = capture(model, batch.input_ids, batch.attention_mask)
                rows, every = slice(s, s + len(batch)), list(range(len(batch)))
                base[rows] = target_logprob_sums(ShotPasses(model, 0, rec, batch, reuse_prefix).logits(every), batch)
                handle.enable()
                bar.update(1)
                for l in idx:
                    handle.set_coefficients({j: (adapter.coefficients.get(l, 1.0) if j == l else 0.0) for j in idx})
                    passes = ShotPasses(model, l, rec, batch, reuse_prefix)
                    sums[l][rows] = target_logprob_sums(passes.logits(every), batch)
                    bar.update(1)
            bar.close()
    finally:
        handle.remove()
    gain_h = [float((sums[l] - base)[:nh].mean()) for l in idx]
    gain_b = [float((sums[l] - base)[nh:].mean()) for l in idx]
    return {"refusal_gain_harmful": gain_h, "refusal_gain_benign": gain_b,
            "refusal-gain": [h - b for h, b in zip(gain_h, gain_b)],
            "base_logprob_harmful": float(base[:nh].mean()), "base_logprob_benign": float(base[nh:].mean()),
            "scored_opening": opening}


def refusal_gain_linear(adapter: SafetyAdapter, model: Any, tokenizer: Any, harmful: Sequence[str],
                        benign: Sequence[str], refusal_text: str, batch_size: int = 8, progress: bool = True,
                        max_refusal_tokens: int = 4, reuse_prefix: bool = True) -> dict[str, Any]:
    """First-order refusal gain: d log p(refusal opening) / d α_l at α = 0, for every layer from one backward pass.

    The exact gain needs one forward pass per layer; the derivative ranks layers the same way when updates are
    small, at the cost of one forward + backward pass for all layers together. The pass runs from the embeddings
    (`forward.ShotPasses`): the LM head only at the scored positions, and with `reuse_prefix` the chat-template
    opening a batch's prompts share once, on one row.
    """
    import torch
    from tqdm.auto import tqdm

    from .data.records import PromptResponse
    from .forward import ShotPasses
    from .objectives import encode_batch

    opening = refusal_opening(tokenizer, refusal_text, max_refusal_tokens)
    idx = adapter.all_layers
    handle = AttachedAdapter(model, adapter.select(idx))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    grads = {}
    try:
        for name, prompts in (("harmful", harmful), ("benign", benign)):
            total = torch.zeros(len(idx))
            pairs = [PromptResponse(p, opening) for p in prompts]
            for s in tqdm(range(0, len(pairs), batch_size), desc=f"scoring layers ({name})", unit="batch",
                          disable=not progress):
                batch = encode_batch(tokenizer, pairs[s : s + batch_size], 256)
                passes = ShotPasses.capture(model, 0, batch, reuse_prefix)  # the embeddings: no α reaches them
                alpha = torch.zeros(len(idx), requires_grad=True)
                for j, l in enumerate(idx):
                    handle.scales[l] = alpha[j]
                logits = passes.logits(list(range(len(batch))))
                targets = batch.targets[batch.target_mask].to(logits.device)
                lp = torch.log_softmax(float32_math(logits), -1).gather(-1, targets.unsqueeze(-1)).sum()
                (g,) = torch.autograd.grad(lp, alpha)
                total += g
            grads[name] = total / max(len(prompts), 1)
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(True)
    gh, gb = grads["harmful"].tolist(), grads["benign"].tolist()
    return {"refusal_gain_harmful": gh, "refusal_gain_benign": gb, "refusal-gain": [h - b for h, b in zip(gh, gb)],
            "scored_opening": opening}


def choose(scores: dict[int, float], top_k: int | None, threshold: float | None) -> list[int]:
    ranked = sorted(scores, key=lambda l: scores[l], reverse=True)
    best = max(scores.values())
    if threshold is not None:
        keep = [l for l in ranked if best > 0 and scores[l] / best >= threshold]
    else:
        keep = [l for l in ranked if scores[l] > 0][:top_k]
    return sorted(keep or ranked[:1])


def select_layers(adapter: SafetyAdapter, cfg: SelectConfig, model: Any = None, tokenizer: Any = None,
                  progress: bool = True) -> SafetyAdapter:
    """Score every layer of `adapter` on `cfg.model` (or the given model) and return the adapter with its
    selection set and the scores recorded in its card."""
    from .models import load_model, load_tokenizer

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(cfg.model, cfg.placement), load_tokenizer(cfg.model)
    for msg in adapter.check_model(model, what=f"model {cfg.model}"):
        log.warning(msg)
    harm = harmful_prompt_texts(cfg.harmful, cfg.n_harmful, cfg.seed)
    ben = benign_prompts(cfg.benign, cfg.n_benign, cfg.seed)
    idx = adapter.all_layers
    comp: dict[str, Any] = {}
    if cfg.method == "norm":
        norms = adapter.layer_norms()
        raw = {l: norms[l] for l in idx}
    elif cfg.method == "refusal-gain":
        gain = refusal_gain_linear if cfg.linearize else refusal_gain
        comp = gain(adapter, model, tokenizer, harm, ben, cfg.refusal_text, cfg.batch_size, progress)
        raw = {l: comp["refusal-gain"][j] for j, l in enumerate(idx)}
        opening = comp.pop("scored_opening")
        comp = {k: v for k, v in comp.items() if isinstance(v, list)}
    else:
        acts, pushes = layer_activations_and_pushes(adapter, model, tokenizer, harm + ben, cfg.batch_size, progress)
        nh = len(harm)
        comp = score_layers(acts[:nh], acts[nh:], pushes[:nh], pushes[nh:])
        raw = {l: comp[cfg.method][j] for j, l in enumerate(idx)}
    selected = choose(raw, cfg.top_k, cfg.threshold)
    out = adapter.select(selected)
    out.card["selection"] = {
        "config": to_dict(cfg),
        "scores": {str(l): round(v, 6) for l, v in raw.items()},
        "components": {k: {str(l): round(v[j], 6) for j, l in enumerate(idx)} for k, v in comp.items()},
        "selected_layers": selected,
        "data_sha256": sha256_text("\n".join(harm + ["\x1e"] + ben)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cfg.method == "refusal-gain":
        out.card["selection"]["scored_refusal_opening"] = opening
    return out


def plot_layer_scores(adapter: SafetyAdapter, path: str | Path) -> Path | None:
    """Bar chart of the selection scores over depth, selected layers highlighted (PNG). None without matplotlib."""
    sel = adapter.card.get("selection")
    if not sel:
        return None
    from .plotting import figure

    layers = sorted(int(l) for l in sel["scores"])
    try:
        fig = figure(figsize=(max(6, len(layers) * 0.35), 3.2))
    except ImportError:
        log.warning("matplotlib is not installed: no layer-score plot (pip install matplotlib)")
        return None
    vals = [sel["scores"][str(l)] for l in layers]
    chosen = set(sel["selected_layers"])
    ax = fig.subplots()
    ax.bar(layers, vals, color=["#c0392b" if l in chosen else "#95a5a6" for l in layers])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{sel['config']['method']} score")
    ax.set_title(f"SafeGene layer scores (selected in red: {sorted(chosen)})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
