"""The SafetyAdapter: low-rank factors of the aligned-minus-degraded discrepancy, per target module.

For module m in layer l with factors A_m (r x in) and B_m (out x r), the adapter's update is

    ΔW_m = α_l · B_m A_m

where α_l is the layer's coefficient (1.0 after extraction, learnt by recalibration). Only the selected layers
take part. On disk an adapter is a folder that plain PEFT loads as a LoRA adapter:

    adapter_config.json          PEFT LoRA config (r, lora_alpha = r so scaling is 1, target_modules regex)
    adapter_model.safetensors    PEFT factors with α_l folded into B, selected layers only
    safegene_factors.safetensors raw factors of every layer (so selection/recalibration can be redone)
    safegene.json                card: family fingerprint, provenance, config, norms, scores, coefficients
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import FamilyMismatchError, ModelError, SafegeneError
from ..io import atomic_dir, write_json
from ..models.fingerprint import FamilyFingerprint, fingerprint_model
from .checkpoint import read_json_object
from .modules import PEFT_PREFIX, layer_of, module_regex, parse_peft_key, pattern_value, peft_key

CARD = "safegene.json"
FACTORS = "safegene_factors.safetensors"
FORMAT_VERSION = 1

# LoraConfig fields whose effect is more than B·A·alpha/r added to each target module's output
_UNSUPPORTED_PEFT = {
    "use_dora": "DoRA also rescales the weight's column norms",
    "modules_to_save": "it stores whole trained copies of modules",
    "trainable_token_indices": "it trains embedding rows",
    "bias": "it trains the base layers' biases",
    "lora_bias": "it trains a bias on lora_B",
    "fan_in_fan_out": "it marks GPT-2-style Conv1D layers, whose weights are stored transposed",
    "layer_replication": "it duplicates decoder layers",
    "target_parameters": "it adapts parameters, not modules",
    "alora_invocation_tokens": "activated LoRA applies only after the invocation tokens",
    "use_qalora": "QA-LoRA pools the inputs of lora_A",
}


@dataclass
class SafetyAdapter:
    """Low-rank safety update for one model family. Factors are keyed by module path, e.g.
    'model.layers.3.mlp.down_proj'."""

    factors: dict[str, tuple[Any, Any]]  # module -> (A: r x in, B: out x r), float32 torch tensors
    coefficients: dict[int, float] = field(default_factory=dict)
    selected: list[int] | None = None  # None: every layer with factors
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m, (a, b) in self.factors.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ModelError(f"adapter factors of {m} have inconsistent shapes A{tuple(a.shape)} B{tuple(b.shape)}")
        for l in self.all_layers:
            self.coefficients.setdefault(l, 1.0)

    # --- what it holds -------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str | None:
        return (self.card.get("fingerprint") or {}).get("structure", {}).get("model_type")

    @property
    def fingerprint(self) -> FamilyFingerprint | None:
        fp = self.card.get("fingerprint")
        return FamilyFingerprint.from_dict(fp) if fp else None

    @property
    def all_layers(self) -> list[int]:
        return sorted({layer_of(m) for m in self.factors})

    @property
    def layers(self) -> list[int]:
        """The layers that take part (the selection, or all)."""
        return list(self.selected) if self.selected is not None else self.all_layers

    def modules(self, layers: list[int] | None = None) -> list[str]:
        keep = set(self.layers if layers is None else layers)
        return sorted((m for m in self.factors if layer_of(m) in keep), key=lambda m: (layer_of(m), m))

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    def coefficient(self, module: str) -> float:
        return float(self.coefficients.get(layer_of(module), 1.0))

    def delta(self, module: str):
        """Dense ΔW of one module, coefficient applied (out x in)."""
        if module not in self.factors:
            raise ModelError(f"the adapter has no factors for module {module} (it covers layers {self.all_layers}); "
                             "pick one of adapter.modules()")
        a, b = self.factors[module]
        return self.coefficient(module) * (b @ a)

    def layer_norms(self) -> dict[int, float]:
        """Frobenius norm of each layer's update at coefficient 1 (sum over its modules), cheaply via factors."""
        out: dict[int, float] = {}
        for m, (a, b) in self.factors.items():
            # ||B A||_F^2 = trace((A A^T)(B^T B)) needs only r x r products
            sq = float(((a @ a.T) * (b.T @ b)).sum())
            out[layer_of(m)] = out.get(layer_of(m), 0.0) + max(sq, 0.0)
        return {l: math.sqrt(v) for l, v in sorted(out.items())}

    # --- arithmetic (new adapters; factors are shared, not copied) -------------------------------------------
    def _replace(self, **kw) -> "SafetyAdapter":
        new = SafetyAdapter(
            factors=kw.get("factors", self.factors),
            coefficients=dict(kw.get("coefficients", self.coefficients)),
            selected=kw.get("selected", None if self.selected is None else list(self.selected)),
            card=copy.deepcopy(kw.get("card", self.card)),
        )
        return new

    def __mul__(self, k: float) -> "SafetyAdapter":
        return self._replace(coefficients={l: c * float(k) for l, c in self.coefficients.items()})

    __rmul__ = __mul__

    def __neg__(self) -> "SafetyAdapter":
        return self * -1.0

    def __add__(self, other: "SafetyAdapter") -> "SafetyAdapter":
        """Exact sum of two adapters' updates: factors are concatenated along the rank (coefficients folded in)."""
        import torch

        if not isinstance(other, SafetyAdapter):
            return NotImplemented
        self._check_same_family(other)
        factors = {}
        for m in sorted(set(self.factors) | set(other.factors)):
            parts = [(ad.factors[m], ad.coefficient(m)) for ad in (self, other)
                     if m in ad.factors and layer_of(m) in set(ad.layers)]
            if not parts:
                continue
            a = torch.cat([p[0][0] for p in parts], 0)
            b = torch.cat([p[0][1] * p[1] for p in parts], 1)
            factors[m] = (a, b)
        card = copy.deepcopy(self.card)
        card["composed_from"] = [self.card.get("name"), other.card.get("name")]
        return SafetyAdapter(factors=factors, card=card)

    def select(self, layers: list[int]) -> "SafetyAdapter":
        missing = sorted(set(layers) - set(self.all_layers))
        if missing:
            raise SafegeneError(f"layers {missing} have no factors in this adapter (it has {self.all_layers})")
        return self._replace(selected=sorted(set(layers)))

    def with_coefficients(self, coefficients: dict[int, float] | float) -> "SafetyAdapter":
        if isinstance(coefficients, (int, float)):
            coefficients = {l: float(coefficients) for l in self.all_layers}
        merged = dict(self.coefficients)
        merged.update({int(k): float(v) for k, v in coefficients.items()})
        return self._replace(coefficients=merged)

    def _check_same_family(self, other: "SafetyAdapter") -> None:
        a, b = self.fingerprint, other.fingerprint
        if a and b:
            a.check_compatible(b, what="the other adapter's family")

    # --- family guard ------------------------------------------------------------------------------------------
    def check_model(self, model: Any, what: str = "model") -> list[str]:
        """Raise FamilyMismatchError if `model` is of another family/shape; return lineage warnings."""
        import warnings

        fp = self.fingerprint
        if fp is None:
            return []
        other = fingerprint_model(model, digest=False)  # the check compares shapes and samples, never hashes
        msgs = fp.check_compatible(other, what=what)
        params = dict(model.named_parameters())
        bad = []
        for m, (a, b) in self.factors.items():
            w = params.get(f"{m}.weight")
            if w is None:
                w = params.get(f"{PEFT_PREFIX}{m}.weight")
            if w is None:
                bad.append(f"{m} missing")
            elif tuple(w.shape) != (b.shape[0], a.shape[1]):
                bad.append(f"{m} {tuple(w.shape)} vs adapter {(b.shape[0], a.shape[1])}")
        if bad:
            raise FamilyMismatchError(f"{what} does not fit the adapter: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
        for msg in msgs:
            warnings.warn(msg, stacklevel=3)
        return msgs

    # --- runtime ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, model: Any, check: bool = True) -> Iterator["Any"]:
        """Apply the adapter to `model` for the duration of the block (forward hooks), then remove it exactly."""
        from .runtime import AttachedAdapter

        if check:
            self.check_model(model)
        handle = AttachedAdapter(model, self)
        try:
            yield handle
        finally:
            handle.remove()

    # --- persistence ---------------------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, Any]:
        sd = {}
        for m in self.modules():
            a, b = self.factors[m]
            sd[peft_key(m, "A")] = a.contiguous()
            sd[peft_key(m, "B")] = (b * self.coefficient(m)).contiguous()
        return sd

    def peft_config(self) -> dict[str, Any]:
        ranks = {m: int(self.factors[m][0].shape[0]) for m in self.modules()}
        r = max(ranks.values()) if ranks else self.rank
        pattern = {m: v for m, v in ranks.items() if v != r}
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.card.get("base_model"),
            "r": r,
            "lora_alpha": r,  # scaling alpha/r = 1: the factors carry the whole update
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),  # keep scaling 1 where the rank differs
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": module_regex(self.modules()),
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "use_dora": False,
            "use_rslora": False,
        }

    def save(self, path: str | Path, overwrite: bool = False, plot: Any = None) -> Path:
        """Write the adapter folder atomically; `plot(folder)` may add figures inside the same atomic write."""
        from safetensors.torch import save_file

        path = Path(path)
        card = copy.deepcopy(self.card)
        card.update({
            "format_version": FORMAT_VERSION,
            "coefficients": {str(l): float(c) for l, c in sorted(self.coefficients.items())},
            "selected_layers": self.selected,
            "rank": self.rank,
            "layer_norms": {str(l): round(v, 6) for l, v in self.layer_norms().items()},
        })
        raw = {}
        for m, (a, b) in self.factors.items():
            raw[f"{m}.A"] = a.contiguous()
            raw[f"{m}.B"] = b.contiguous()
        with atomic_dir(path, overwrite=overwrite) as tmp:
            save_file(self.peft_state_dict(), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(self.peft_config(), indent=2))
            save_file(raw, str(tmp / FACTORS), metadata={"format": "pt"})
            write_json(tmp / CARD, card)
            if plot is not None:
                plot(tmp)
        self.card = card
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SafetyAdapter":
        """Load a safegene adapter folder, or a plain PEFT LoRA folder (its B·A·alpha/r become the factors)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise SafegeneError(f"{path}: adapter folder not found")
        if (path / FACTORS).is_file() and (path / CARD).is_file():
            recreate = "re-create the adapter with safegene extract"
            card = read_json_object(path / CARD, recreate)
            try:
                raw = load_file(str(path / FACTORS))
            except Exception as e:
                raise ModelError(f"{path / FACTORS}: corrupt adapter ({type(e).__name__}: {e}); {recreate}") from e
            try:
                coeffs = {int(k): float(v) for k, v in (card.get("coefficients") or {}).items()}
                selected = card.get("selected_layers")
                selected = None if selected is None else [int(l) for l in selected]
            except (AttributeError, TypeError, ValueError) as e:
                raise ModelError(f"{path / CARD}: coefficients or selected_layers are malformed ({e}); {recreate}") from e
            factors = {}
            for m in sorted({k.rpartition(".")[0] for k in raw}):
                missing = [f"{m}.{w}" for w in "AB" if f"{m}.{w}" not in raw]
                if missing:
                    raise ModelError(f"{path / FACTORS}: factor {missing[0]} is missing; {recreate}")
                factors[m] = (raw[f"{m}.A"].float(), raw[f"{m}.B"].float())
            return cls(factors=factors, coefficients=coeffs, selected=selected, card=card)
        if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
            return cls._from_peft(path)
        raise SafegeneError(f"{path} is not an adapter folder (no {CARD}/{FACTORS}, nor adapter_config.json + "
                            "adapter_model.safetensors)")

    @classmethod
    def _from_peft(cls, path: Path) -> "SafetyAdapter":
        """Read a plain PEFT LoRA folder exactly as PEFT would apply it, refusing what a per-module low-rank update
        cannot carry rather than dropping it."""
        from safetensors.torch import load_file

        cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        use_peft = "use PEFT itself for this adapter (PeftModel.from_pretrained, merge_and_unload)"
        cfg = read_json_object(cfg_path, "re-save the adapter with PEFT (save_pretrained)")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ModelError(f"{cfg_path}: only LoRA adapters can be read (peft_type {cfg.get('peft_type')}); {use_peft}")
        for key, why in _UNSUPPORTED_PEFT.items():
            if cfg.get(key) and cfg.get(key) != "none":
                raise ModelError(f"{cfg_path}: {key}={cfg[key]!r} is not supported ({why}); {use_peft}")
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)  # LoraConfig's defaults, which PEFT fills in too
        patterns = {k: cfg.get(k) or {} for k in ("rank_pattern", "alpha_pattern")}
        numbers = [r, alpha] + [v for p in patterns.values() if isinstance(p, dict) for v in p.values()]
        if not all(isinstance(p, dict) for p in patterns.values()) or not all(
                isinstance(v, (int, float)) and v > 0 for v in numbers):
            raise ModelError(f"{cfg_path}: r, lora_alpha, rank_pattern or alpha_pattern is not a positive number / "
                             "a {module: number} object; fix the file or re-save the adapter with PEFT")
        try:
            sd = load_file(str(weights))
        except Exception as e:
            raise ModelError(f"{weights}: cannot read it ({type(e).__name__}: {e}); re-save the adapter with PEFT") from e
        pairs: dict[str, dict[str, Any]] = {}
        other = []
        for k, v in sd.items():
            parsed = parse_peft_key(k)
            if parsed:
                pairs.setdefault(parsed[0], {})[parsed[1]] = v
            else:
                other.append(k)
        embedding = sorted({k.split(".lora_embedding_")[0].removeprefix(PEFT_PREFIX) for k in other
                            if ".lora_embedding_" in k})
        if embedding:
            raise ModelError(f"{weights}: LoRA on an embedding (lora_embedding_A/B of {', '.join(embedding)}) is not "
                             f"supported: safety adapters update linear projections only; {use_peft}")
        outside = sorted(m for m in pairs if layer_of(m) is None)
        if outside:
            raise ModelError(f"{weights}: the LoRA on {', '.join(outside)} lies outside the numbered decoder layers "
                             f"(model.layers.N) that safety adapters scale; {use_peft}")
        if other:
            raise ModelError(f"{weights}: tensors other than LoRA factors ({', '.join(sorted(other)[:3])}"
                             f"{' ...' if len(other) > 3 else ''}) are not supported; {use_peft}")
        factors = {}
        for mod, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise ModelError(f"{weights}: lora_{'B' if 'A' in ab else 'A'} of {mod} is missing; re-save the adapter "
                                 "with PEFT")
            try:
                rr = pattern_value(patterns["rank_pattern"], mod, r)
                aa = pattern_value(patterns["alpha_pattern"], mod, alpha)
            except re.error as e:
                raise ModelError(f"{cfg_path}: a rank_pattern/alpha_pattern key is not a valid regular expression "
                                 f"({e} in {e.pattern!r}); fix that key") from e
            a, b = ab["A"], ab["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rr or b.shape[1] != rr:
                raise ModelError(f"{cfg_path}: r / rank_pattern give {mod} rank {rr}, but its lora_A, lora_B in "
                                 f"{weights.name} have shapes {tuple(a.shape)}, {tuple(b.shape)}; the folder is "
                                 "inconsistent: re-save it with PEFT")
            scale = aa / (math.sqrt(rr) if cfg.get("use_rslora") else rr)
            factors[mod] = (a.float(), b.float() * scale)
        if not factors:
            raise ModelError(f"{weights}: no LoRA factors found; re-save the adapter with PEFT")
        return cls(factors=factors, card={"name": path.name, "source": "peft", "base_model": cfg.get("base_model_name_or_path")})
