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


def capture_from(model: Any, input_ids: Any, attention_mask: Any, start: int, prefix_length: int = 0) -> LayerInputs:
    """What `run_from(model, start, ...)` needs, computing only the layers below `start`: the hidden states entering
    layer `start` and the call arguments of every layer from `start` up (masks and positions can differ by layer,
    e.g. sliding-window layers). While it runs, layers `start`.. are swapped for recorders that pass the hidden
    states through, and the last one ends the pass; they are put back whatever happens.

    With `prefix_length` P > 0 (the rows' first P tokens are the same; `shared_prefix_length`, for a
    `can_cut_positions` model), the layers below `start` run those P positions once, on one row, and the rest of
    every row with the prefix as cached keys and values; what is returned is the same."""
    layers, _, _ = decoder_parts(model)
    if not 0 <= start < len(layers):
        raise SafegeneError(f"capture_from: start layer {start} is outside the model's {len(layers)} layers")
    if prefix_length > 0 and start > 0:
        return _capture_from_with_prefix(model, input_ids, attention_mask, start, prefix_length)
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


def _capture_from_with_prefix(model: Any, input_ids: Any, attention_mask: Any, start: int, prefix: int) -> LayerInputs:
    """`capture_from` with the shared prefix run once: every layer's call is recorded from the embeddings up (the
    model computes masks and positions), then layers 0..start-1 run here, the prefix on row 0 and the rest of every
    row on its keys and values."""
    import torch

    whole = capture_from(model, input_ids, attention_mask, 0)
    if not can_cut_positions(model, whole):
        return capture_from(model, input_ids, attention_mask, start)  # calls of a form not known: whole rows
    attention = model.config._attn_implementation
    layers, _, _ = decoder_parts(model)
    width = whole.hidden[0].shape[1]
    lower = LayerInputs(whole.hidden, {l: c for l, c in whole.calls.items() if l < start})
    with torch.inference_mode():
        head = cut_positions(lower.subset([0]), 0, prefix, attention)
        record = _RecordKV()
        rest = cut_positions(lower, prefix, width, attention)
        h_head, h_rest = head.hidden[0], rest.hidden[0]
        cache = _PrefixKV(record.kv)
        for l in range(start):
            h_head = _first(layers[l](h_head, *head.calls[l][0], **{**head.calls[l][1], "past_key_values": record}))
            h_rest = _first(layers[l](h_rest, *rest.calls[l][0], **{**rest.calls[l][1], "past_key_values": cache}))
        hidden = torch.cat([h_head.expand(h_rest.shape[0], -1, -1), h_rest.to(h_head.device)], dim=1)
    # the recorded calls are plain already (capture_from cloned them): only the new hidden states need it
    return LayerInputs({start: hidden.clone()}, {l: c for l, c in whole.calls.items() if l >= start})


def _plain(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def run_from(model: Any, start: int, inputs: LayerInputs, positions: Any, prefix: dict[int, tuple] | None = None) -> Any:
    """Logits at `positions` (a bool mask over batch x time) after running layers start.. on the recorded input.
    With `prefix` (from `prefix_keys_values`), `inputs` holds the positions after a shared prefix (`cut_positions`)
    and each attention layer reads the prefix's keys and values in front of its own."""
    layers, norm, head = decoder_parts(model)
    h = inputs.hidden[start]
    cache = _PrefixKV(prefix) if prefix else None
    for l in range(start, len(layers)):
        args, kw = inputs.calls[l]
        if cache is not None:
            kw = {**kw, "past_key_values": cache}
        h = _first(layers[l](h, *args, **kw))
    if cache is not None and cache.reads != len(layers) - start:
        # a layer that ignored the cache attended to its own positions only: the logits would be silently wrong
        raise SafegeneError(f"run_from: {cache.reads} of {len(layers) - start} layers read the shared prefix; "
                            "run whole rows (RecalibrateConfig.reuse_prefix = false)")
    # a dispatched model's hooks move the hidden states from layer to layer: the mask follows them
    return head(norm(h[positions.to(h.device)]))


# Cutting recorded positions. A recorded layer call of these model types carries per-position tensors by these names
# only (transformers 5), and their attention layers read a cache through `update(key, value, layer_idx)` alone.
# Masks are cut, or built when the model skipped one (no padding), for the two attention kernels whose mask format
# is known; other kernels (flash attention's unpadding) run whole sequences.
CUTTABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
CUTTABLE_ATTENTION = ("sdpa", "eager")
_PER_POSITION = {"attention_mask", "position_embeddings", "position_ids", "cache_position"}
_PASSED_THROUGH = {"past_key_values", "use_cache", "output_attentions"}


def can_cut_positions(model: Any, inputs: LayerInputs | None = None) -> bool:
    """Whether `cut_positions` and a prefix cache are known to be exact for `model` and (when given) these recorded
    calls."""
    cfg = getattr(model, "config", None)
    # a layer that checkpoints activations in training mode drops the cache it is given (transformers 5)
    if getattr(model, "training", False) or any(layer.training for layer in decoder_parts(model)[0]):
        return False
    if getattr(cfg, "model_type", None) not in CUTTABLE_MODEL_TYPES:
        return False
    if getattr(cfg, "_attn_implementation", None) not in CUTTABLE_ATTENTION:
        return False
    return inputs is None or all(not args and set(kw) <= _PER_POSITION | _PASSED_THROUGH
                                 for args, kw in inputs.calls.values())


class _PrefixKV:
    """Stands in for a transformers Cache in `run_from`: each attention layer's keys and values get the shared
    prefix's (computed once, on one row) put in front, expanded over the batch."""

    def __init__(self, prefix: dict[int, tuple]) -> None:
        self.prefix = prefix
        self.reads = 0

    def update(self, key: Any, value: Any, layer_idx: int, *_: Any, **__: Any) -> tuple[Any, Any]:
        import torch

        self.reads += 1
        pk, pv = self.prefix[layer_idx]
        b = key.shape[0]
        return (torch.cat([pk.expand(b, *pk.shape[1:]), key], dim=2),
                torch.cat([pv.expand(b, *pv.shape[1:]), value], dim=2))


class _RecordKV:
    """Stands in for a cache while the prefix runs: keeps each attention layer's keys and values."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple] = {}

    def update(self, key: Any, value: Any, layer_idx: int, *_: Any, **__: Any) -> tuple[Any, Any]:
        self.kv[layer_idx] = (key, value)
        return key, value


def prefix_keys_values(model: Any, start: int, prefix_inputs: LayerInputs) -> dict[int, tuple]:
    """Every attention layer's keys and values over a prefix (one row, `cut_positions(inputs, 0, P)`), layers
    start.. with the model as it is now (adapter and coefficients included; with grad where grad is on)."""
    layers, _, _ = decoder_parts(model)
    record = _RecordKV()
    h = prefix_inputs.hidden[start]
    for l in range(start, len(layers)):
        args, kw = prefix_inputs.calls[l]
        h = _first(layers[l](h, *args, **{**kw, "past_key_values": record}))
    return record.kv


def cut_positions(inputs: LayerInputs, begin: int, end: int, attention: str) -> LayerInputs:
    """The recorded inputs of positions begin..end-1 alone, attending to keys 0..end-1: those below `begin` come
    from a prefix cache, and positions from `end` on (padding past every row's end) are dropped. Only for
    `can_cut_positions` models; `attention` is the model's attention kernel, which sets the format of a mask built
    where the model passed none."""
    import torch

    def cut(name: str, v: Any) -> Any:
        if name == "attention_mask":
            if v is not None:
                return v[:, :, begin:end, :end]
            # none recorded: no row is padded, so plain causal attention over keys 0..end-1
            q = torch.arange(begin, end, device=device).unsqueeze(1)
            allowed = (torch.arange(end, device=device).unsqueeze(0) <= q)[None, None].expand(batch, 1, -1, -1)
            if attention == "sdpa":
                return allowed
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        if name == "position_embeddings":
            return tuple(t[:, begin:end] for t in v)
        if name == "position_ids":
            return v[:, begin:end]
        if name == "cache_position":
            return v[begin:end]
        return v

    first = next(iter(inputs.hidden.values()))
    device, dtype, batch = first.device, first.dtype, first.shape[0]
    calls = {l: (args, {k: cut(k, v) for k, v in kw.items()}) for l, (args, kw) in inputs.calls.items()}
    return LayerInputs({l: h[:, begin:end] for l, h in inputs.hidden.items()}, calls)


class ShotPasses:
    """Repeated partial passes (layers start..) over a fixed set of right-padded sequences, without the work every
    pass would repeat: the prefix all rows share (a chat template's system prompt and opening: 24 of 57 tokens of
    the default harmful shots, 45 of 63 of the sst2 task shots) runs once per pass on one row and reaches the
    other rows as cached keys and values, and a group of rows runs only up to its longest row, not to the width of
    the whole set. `groups` orders the rows by length so that a group's rows are alike.

    Exact up to float rounding (tested against whole sequences); for models `can_cut_positions` does not know, or
    with `cut=False`, every pass runs whole padded rows as before. The prefix runs on row 0 for every row: hooks
    on the model must treat rows alike (an adapter's per-row strength would not be)."""

    def __init__(self, model: Any, start: int, inputs: LayerInputs, batch: Any, cut: bool = True) -> None:
        """`batch` has the rows' `input_ids`, `attention_mask` and `target_mask` (an objectives.SeqBatch);
        `inputs` is what `capture_from(model, batch.input_ids, batch.attention_mask, start)` recorded."""
        self.model, self.start, self.inputs, self.target_mask = model, start, inputs, batch.target_mask
        self.lengths = [int(n) for n in batch.attention_mask.sum(1)]
        self.cut = cut and can_cut_positions(model, inputs)
        self.attention = getattr(model.config, "_attn_implementation", "sdpa") if self.cut else ""
        self.prefix_length = shared_prefix_length(batch.input_ids, batch.attention_mask,
                                                  batch.target_mask) if self.cut else 0
        self._prefix_inputs = (cut_positions(inputs.subset([0]), 0, self.prefix_length, self.attention)
                               if self.prefix_length else None)

    @classmethod
    def capture(cls, model: Any, start: int, batch: Any, cut: bool = True) -> "ShotPasses":
        """Run the layers below `start` once over `batch` (their shared prefix once, when `cut` applies) and make
        the passes from `start` up."""
        cut = cut and can_cut_positions(model)
        prefix = shared_prefix_length(batch.input_ids, batch.attention_mask, batch.target_mask) if cut else 0
        inputs = capture_from(model, batch.input_ids, batch.attention_mask, start, prefix)
        return cls(model, start, inputs, batch, cut)

    def __len__(self) -> int:
        return len(self.lengths)

    def groups(self, size: int) -> list[list[int]]:
        """Row indices in groups of at most `size`, shortest rows first (the original order without cutting)."""
        order = sorted(range(len(self)), key=lambda i: self.lengths[i]) if self.cut else list(range(len(self)))
        return [order[s:s + size] for s in range(0, len(order), size)]

    def prefix(self) -> dict[int, tuple] | None:
        """The shared prefix's keys and values with the model as it is now (None where nothing is shared)."""
        if self._prefix_inputs is None:
            return None
        return prefix_keys_values(self.model, self.start, self._prefix_inputs)

    def logits(self, idx: list[int], prefix: dict[int, tuple] | None = None) -> Any:
        """Logits at the target positions of rows `idx`, flattened in row then position order. `prefix` is the
        result of `prefix()` when one pass runs many groups; without it each call computes its own (None where
        nothing is shared, at no cost)."""
        rows = self.inputs.subset(idx)
        mask = self.target_mask[idx]
        if not self.cut:
            return run_from(self.model, self.start, rows, mask)
        if prefix is None:
            prefix = self.prefix()
        begin, end = self.prefix_length, max(self.lengths[i] for i in idx)
        return run_from(self.model, self.start, cut_positions(rows, begin, end, self.attention),
                        mask[:, begin:end], prefix)


def shared_prefix_length(input_ids: Any, attention_mask: Any, target_mask: Any) -> int:
    """How many leading positions every row shares: the same tokens (under causal attention, so the same states in
    every layer), none of them scored, and at least one position left per row. 0 for fewer than two rows."""
    n = min(int(x) for x in attention_mask.sum(1)) - 1
    scored = target_mask.any(0).nonzero()
    if len(scored):
        n = min(n, int(scored[0]))
    if n <= 0 or input_ids.shape[0] < 2:
        return 0
    differs = (input_ids[:, :n] != input_ids[:1, :n]).any(0).nonzero()
    return int(differs[0]) if len(differs) else n
