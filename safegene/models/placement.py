"""Where a model runs and in what precision: one setting, honoured by every stage.

`PlacementConfig` is the one place a user says "run on this device, in this dtype" (`--device`, `--dtype`,
`--device-map` on every command that loads a model; `placement:` in a config file). `auto` picks CUDA when present and
bfloat16 where that GPU supports it, else the CPU in float32 — so the same config runs on a laptop, one GPU or a
dispatched model larger than one device (`device_map`, accelerate's big-model inference).

Numerically sensitive work (log-probabilities, KL, SVD of ΔW, the recalibration scalars) is done in float32 whatever
the weights are; `float32_math` is the one helper for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import check, opt
from ..errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class PlacementConfig:
    """Device, precision and (optionally) a big-model dispatch of the models a command loads."""

    cli_leaf_flags: ClassVar[bool] = True  # `--device` as well as `--placement.device`
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "weights' dtype: auto (bfloat16 on GPUs that support it, float32 on CPU), float32, "
                     "bfloat16 or float16", choices=DTYPES)
    device_map: str | None = opt(None, "dispatch a model larger than one device with accelerate: 'auto', or a JSON "
                                 "map of module name -> device, 'cpu' or 'disk'; None: the whole model on `device`")
    offload_folder: str | None = opt(None, "folder for weights a device_map sends to 'disk' (default: a temporary one)")

    def __post_init__(self) -> None:
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
              f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.device_map not in (None, "auto", "balanced", "sequential"):
            try:
                parsed = json.loads(self.device_map)
            except json.JSONDecodeError as e:
                raise ConfigError(f"device_map must be 'auto' or a JSON object of module -> device, got "
                                  f"{self.device_map!r} ({e.msg})") from None
            check(isinstance(parsed, dict) and bool(parsed),
                  f"device_map must be 'auto' or a non-empty JSON object, got {self.device_map!r}")
            bad = [f"{k}: {v!r}" for k, v in parsed.items() if not _map_target_ok(v)]
            check(not bad, f"device_map sends {', '.join(bad)}; each module goes to a GPU index (0), cuda:N, mps, "
                  "'cpu' or 'disk'")

    def torch_device(self) -> Any:
        """The device inputs go to (the first device of a dispatched model is found from the model instead)."""
        return resolve_device(self.device)

    def torch_dtype(self) -> Any:
        return resolve_dtype(self.dtype, resolve_device(self.device))

    def dtype_name(self) -> str:
        """The dtype `auto` resolves to here, by name ("float32"): what a stage that records its settings records."""
        return str(self.torch_dtype()).removeprefix("torch.")

    def offloads_to_disk(self) -> bool:
        """Whether weights may go to disk, so that loading needs an offload folder ('auto' may spill to disk too)."""
        hf_map = self.hf_device_map()
        return hf_map is not None and (isinstance(hf_map, str) or "disk" in hf_map.values())

    def hf_device_map(self) -> str | dict[str, Any] | None:
        """`device_map` as `from_pretrained` takes it."""
        if self.device_map is None or self.device_map in ("auto", "balanced", "sequential"):
            return self.device_map
        return json.loads(self.device_map)


def resolve_device(spec: str = "auto") -> Any:
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for but CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r} asked for but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s); use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r} asked for but MPS is not available here; use --device cpu or auto")
    return device


def resolve_dtype(spec: str, device: Any) -> Any:
    """bfloat16 on a GPU that supports it, float32 elsewhere (CPU matmuls in bf16 are several times slower)."""
    import torch

    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _map_target_ok(target: Any) -> bool:
    """One value of a JSON device_map: a GPU index, or a device or place name accelerate knows."""
    if isinstance(target, int) and not isinstance(target, bool):
        return target >= 0
    if not isinstance(target, str):
        return False
    kind, _, index = target.partition(":")
    return target in ("cpu", "disk", "mps") or (kind == "cuda" and (not index or index.isdigit()))


def is_dispatched(model: Any) -> bool:
    """Whether accelerate spread `model` over several devices or offloaded part of it (its `hf_device_map`):
    such a model must not be moved or cast as a whole."""
    places = set((getattr(model, "hf_device_map", None) or {}).values())
    return len(places) > 1 or "disk" in places


def module_device(module: Any, default: Any = None) -> Any:
    """Where `module` computes: the execution device accelerate's hook gives it in a dispatched model (its weights
    may sit on the meta device between calls, offloaded to CPU or disk), else the device of its weights."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return default


def model_device(model: Any) -> Any:
    """Where a model's inputs go: the embedding's device (right for dispatched models too)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if embeddings is not None:
        device = module_device(embeddings)
        if device is not None:
            return device
    return next(model.parameters()).device


def float32_math(t: Any) -> Any:
    """A tensor up-cast for numerically sensitive work (log-softmax, KL, SVD); a float32 tensor is returned as is."""
    import torch

    return t if t.dtype == torch.float32 else t.float()
