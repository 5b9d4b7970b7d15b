"""Runtime application of a SafetyAdapter: forward hooks on the target linear modules, or an in-place merge.

A hook adds  scale_l · (x Aᵀ) Bᵀ  to the module's output: the low-rank path costs O(r·(in+out)) per token, so
attaching is cheap, and removing the hooks restores the model bit for bit. Scales live in a dict of tensors so
recalibration can make them learnable and a server can change them per request without touching the weights.

Each module's factors sit on the device that module computes on and in its weights' dtype (factors being trained,
by distillation, stay float32 and are cast on use), so the adapter attaches to a model on a GPU, in bfloat16, or
dispatched over several devices, CPU and disk (accelerate's hooks load an offloaded module's weights just for its
call; the adapter's forward hook runs after that, on the same device).
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import FamilyMismatchError, SafegeneError
from ..models.placement import float32_math, module_device
from .modules import PEFT_PREFIX, layer_of


def _named_modules(model: Any) -> dict[str, Any]:
    mods = dict(model.named_modules())
    # a PEFT-wrapped model names modules 'base_model.model.<name>'
    for k in list(mods):
        if k.startswith(PEFT_PREFIX):
            mods.setdefault(k[len(PEFT_PREFIX):], mods[k])
    return mods


#: attribute of a model holding the AttachedAdapter handles on it (see `attached_to`)
ATTACHED = "_safegene_attached"


def attached_to(model: Any) -> list["AttachedAdapter"]:
    """The enabled adapters attached to `model` by `AttachedAdapter`, in the order they were attached."""
    return [h for h in model.__dict__.get(ATTACHED, []) if h.enabled]


class AttachedAdapter:
    """Hooks that apply an adapter to a loaded model; toggle, rescale or remove without reloading."""

    def __init__(self, model: Any, adapter: Any, scales: dict[int, Any] | None = None, trainable_factors: bool = False,
                 enabled: bool = True):
        import torch

        self.model = model
        self.adapter = adapter
        self.enabled = enabled  # set before any hook exists, so a handle created disabled never fires
        # optional per-sequence strength (batch,) multiplying every layer's scale: the serving gate sets it per
        # request so one batch can hold prompts that get the adapter at different strengths
        self.row_strength: Any = None
        mods = _named_modules(model)
        ref = next(model.parameters())
        self.factors: dict[str, tuple[Any, Any]] = {}
        self.scales: dict[int, Any] = {}
        self._handles = []
        missing = [m for m in adapter.modules() if m not in mods]
        if missing:
            raise FamilyMismatchError(f"model has no module(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                                      "the adapter belongs to another architecture")
        for m in adapter.modules():
            device = module_device(mods[m], default=ref.device)
            dtype = getattr(getattr(mods[m], "weight", None), "dtype", ref.dtype)
            a, b = adapter.factors[m]
            if trainable_factors:
                # trained factors stay float32 whatever the model's dtype (in bfloat16 small optimizer steps round
                # away); the hook casts them to the module's dtype, and the gradient flows back through the cast
                a, b = (torch.nn.Parameter(t.to(device, torch.float32, copy=True)) for t in (a, b))
            else:
                a, b = a.to(device, dtype), b.to(device, dtype)
            self.factors[m] = (a, b)
            l = layer_of(m)
            if l not in self.scales:
                s = scales[l] if scales and l in scales else torch.tensor(adapter.coefficients.get(l, 1.0),
                                                                          dtype=dtype, device=device)
                self.scales[l] = s
            self._handles.append(mods[m].register_forward_hook(self._hook(m, l)))
        # the model lists the handles attached to it, so code that only holds the model (the vLLM backend, which
        # must hand the same adapter to another engine) can find them
        registry = model.__dict__.setdefault(ATTACHED, [])
        registry.append(self)

    def _hook(self, module_name: str, layer: int) -> Callable:
        def hook(mod, inputs, output):
            if not self.enabled:
                return None
            a, b = self.factors[module_name]
            x = inputs[0]
            if a.dtype != x.dtype:  # float32 factors in training on a bfloat16 or float16 model
                a, b = a.to(x.dtype), b.to(x.dtype)
            # a 0-d scale on another device (recalibration's learnable α on the CPU) multiplies like a number
            delta = self.scales[layer] * ((x @ a.T) @ b.T)
            if self.row_strength is not None:
                delta = delta * self.row_strength.to(delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
            return output + delta

        return hook

    def set_coefficients(self, coefficients: dict[int, float] | float) -> None:
        import torch

        for l, s in self.scales.items():
            v = coefficients if isinstance(coefficients, (int, float)) else coefficients.get(l, float(s))
            self.scales[l] = torch.tensor(float(v), dtype=s.dtype, device=s.device)

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.enabled = False
        registry = self.model.__dict__.get(ATTACHED, [])
        if self in registry:
            registry.remove(self)

    def __enter__(self) -> "AttachedAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def merge_into_model(adapter: Any, model: Any, sign: float = 1.0) -> Any:
    """W_m += sign · α_l · B_m A_m for every selected module, in place. Returns the model."""
    import torch

    mods = _named_modules(model)
    with torch.no_grad():
        for m in adapter.modules():
            if m not in mods:
                raise FamilyMismatchError(f"model has no module {m}: the adapter belongs to another architecture")
            w = mods[m].weight
            if w.device.type == "meta":
                raise SafegeneError(f"{m}'s weights are offloaded (device_map): merge into the model folder with "
                                    "`safegene apply`, or attach the adapter instead")
            # W + α·BA in float32, rounded once: adding a bfloat16-rounded ΔW to bfloat16 weights rounds twice
            w.copy_((float32_math(w) + sign * adapter.delta(m).to(w.device)).to(w.dtype))
    return model
