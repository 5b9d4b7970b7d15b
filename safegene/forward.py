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


class _StopForward(Exception):
    """Raised once everything wanted is recorded: the layers above, the final norm and the LM head never run."""


def _layer_recorder(record: Any, stop: bool) -> Any:
    """A stand-in for a decoder layer during `capture_from`: records what the layer was called with and passes the
    hidden states through unchanged, so the layers above the start cost nothing. An nn.Module, because a model may
    slice its ModuleList of layers, which accepts modules only."""
    import torch

    class LayerRecorder(torch.nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            record(args, kwargs)
            if stop:
                raise _StopForward
            return args[0] if args else kwargs["hidden_states"]

    return LayerRecorder()


def _split_call(args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """(hidden states, the remaining positional arguments, keyword arguments) of one decoder-layer call."""
    if args:
        return args[0].detach(), args[1:], dict(kwargs)
    kw = dict(kwargs)
    return kw.pop("hidden_states").detach(), (), kw


def _forward_until_stopped(model: Any, input_ids: Any, attention_mask: Any) -> None:
    import torch

    device = model_device(model)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    except _StopForward:
        pass


def _as_plain(hidden: dict[int, Any], calls: dict[int, tuple[tuple, dict]]) -> LayerInputs:
    # inference tensors cannot enter autograd; clone them into ordinary tensors
    return LayerInputs({l: h.clone() for l, h in hidden.items()},
                       {l: (tuple(_plain(a) for a in args), {k: _plain(v) for k, v in kw.items()})
                        for l, (args, kw) in calls.items()})


def capture(model: Any, input_ids: Any, attention_mask: Any, layers_wanted: list[int] | None = None) -> LayerInputs:
    """Run the model once (no grad) and record each wanted layer's input (every layer's by default).

    The pass stops at the highest wanted layer's input: the layers above it, the final norm and the LM head (over
    every position, a quarter of a small model's compute) are not run."""
    layers, _, _ = decoder_parts(model)
    wanted = sorted(set(range(len(layers)) if layers_wanted is None else layers_wanted))
    hidden: dict[int, Any] = {}
    calls: dict[int, tuple[tuple, dict]] = {}

    def pre(l: int, last: bool):
        def f(mod, args, kwargs):
            hidden[l], rest, kw = _split_call(args, kwargs)
            calls[l] = (rest, kw)
            if last:
                raise _StopForward

        return f

    hooks = [layers[l].register_forward_pre_hook(pre(l, l == wanted[-1]), with_kwargs=True) for l in wanted]
    try:
        _forward_until_stopped(model, input_ids, attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return _as_plain(hidden, calls)


def capture_from(model: Any, input_ids: Any, attention_mask: Any, start: int) -> LayerInputs:
    """What `run_from(model, start, ...)` needs, computing only the layers below `start`: the hidden states entering
    layer `start` and the call arguments of every layer from `start` up (masks and positions can differ by layer,
    e.g. sliding-window layers). While it runs, layers `start`.. are swapped for recorders that pass the hidden
    states through, and the last one ends the pass; they are put back whatever happens."""
    layers, _, _ = decoder_parts(model)
    if not 0 <= start < len(layers):
        raise SafegeneError(f"capture_from: start layer {start} is outside the model's {len(layers)} layers")
    hidden: dict[int, Any] = {}
    calls: dict[int, tuple[tuple, dict]] = {}

    def record(l: int):
        def f(args: tuple, kwargs: dict) -> None:
            h, rest, kw = _split_call(args, kwargs)
            if l == start:
                hidden[l] = h
            calls[l] = (rest, kw)

        return f

    originals = {l: layers[l] for l in range(start, len(layers))}
    try:
        for l in originals:
            layers[l] = _layer_recorder(record(l), stop=l == len(layers) - 1)
        _forward_until_stopped(model, input_ids, attention_mask)
    finally:
        for l, mod in originals.items():
            layers[l] = mod
    if start not in hidden or len(calls) != len(originals):
        raise SafegeneError("capture_from: the model did not call its decoder layers in order; use capture()")
    return _as_plain(hidden, calls)


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
