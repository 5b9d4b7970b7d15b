"""Partial forward passes for decoder-only transformers (Llama/Qwen2/Mistral layout).

Layer selection and recalibration change only some layers. Everything below the lowest changed layer is the
same on every pass, so it is computed once: `capture` records what each decoder layer received, and `run_from`
re-runs the stack from layer l on that recorded input. The LM head is applied only at the positions that are
scored (the vocabulary projection is a quarter of a small model's compute).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import SafegeneError
from .models.placement import model_device


def decoder_parts(model: Any) -> tuple[Any, Any, Any]:
    """(layers, final_norm, lm_head) of a causal LM; PEFT wrappers are looked through."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "model", None)
    layers = getattr(body, "layers", None)
    norm = getattr(body, "norm", None)
    head = getattr(inner, "lm_head", None)
    if layers is None or norm is None or head is None:
        raise SafegeneError("partial forward needs a Llama-style model (model.layers, model.norm, lm_head)")
    return layers, norm, head


def _first(x):
    """A decoder layer returns a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return x[0] if isinstance(x, tuple) else x


@dataclass
class LayerInputs:
    """What each decoder layer received in one forward pass: hidden states and the remaining call arguments."""

    hidden: dict[int, Any]
    calls: dict[int, tuple[tuple, dict]]

    def subset(self, idx) -> "LayerInputs":
        # the batch dimension of hidden states and masks/positions is dim 0; rotary tables are shared (batch 1)
        def take(v):
            import torch

            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.batch:
                return v[idx]
            if isinstance(v, tuple):
                return tuple(take(x) for x in v)
            return v

        return LayerInputs(
            hidden={l: h[idx] for l, h in self.hidden.items()},
            calls={l: (tuple(take(a) for a in args), {k: take(v) for k, v in kw.items()}) for l, (args, kw) in self.calls.items()},
        )

    @property
    def batch(self) -> int:
        return next(iter(self.hidden.values())).shape[0]


def capture(model: Any, input_ids: Any, attention_mask: Any, layers_wanted: list[int] | None = None) -> LayerInputs:
    """Run the model once (no grad) and record each wanted layer's input."""
    import torch

    layers, _, _ = decoder_parts(model)
    wanted = set(range(len(layers)) if layers_wanted is None else layers_wanted)
    hidden: dict[int, Any] = {}
    calls: dict[int, tuple[tuple, dict]] = {}

    def pre(l):
        def f(mod, args, kwargs):
            if args:
                hidden[l] = args[0].detach()
                calls[l] = (args[1:], dict(kwargs))
            else:
                kw = dict(kwargs)
                hidden[l] = kw.pop("hidden_states").detach()
                calls[l] = ((), kw)
        return f

    hooks = [layers[l].register_forward_pre_hook(pre(l), with_kwargs=True) for l in sorted(wanted)]
    device = model_device(model)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    # inference tensors cannot enter autograd; clone them into ordinary tensors
    hidden = {l: h.clone() for l, h in hidden.items()}
    calls = {l: (tuple(_plain(a) for a in args), {k: _plain(v) for k, v in kw.items()}) for l, (args, kw) in calls.items()}
    return LayerInputs(hidden, calls)


def _plain(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def run_from(model: Any, start: int, inputs: LayerInputs, positions: Any) -> Any:
    """Logits at `positions` (a bool mask over batch x time) after running layers start.. on the recorded input."""
    layers, norm, head = decoder_parts(model)
    h = inputs.hidden[start]
    for l in range(start, len(layers)):
        args, kw = inputs.calls[l]
        h = _first(layers[l](h, *args, **kw))
    # a dispatched model's hooks move the hidden states from layer to layer: the mask follows them
    return head(norm(h[positions.to(h.device)]))
