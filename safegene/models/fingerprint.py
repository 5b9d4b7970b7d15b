"""Model family fingerprints.

Two checkpoints belong to the same family when their architecture and shapes agree. Reference tensors that
task fine-tuning (LoRA on attention/MLP projections) normally leaves alone — embeddings and norms — are
recorded by hash *and* by a few statistics, so a same-shape model of another lineage can be detected by how far
those statistics moved, not only by an exact hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FamilyMismatchError, ModelError
from .loading import read_model_json

_STRUCT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
)
REFERENCE_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight")
#: relative L2 change of a reference tensor above which a same-shape model is treated as another lineage
LINEAGE_TOLERANCE = 0.05


@dataclass
class FamilyFingerprint:
    architecture: str
    structure: dict[str, Any]
    reference: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FamilyFingerprint":
        try:
            return cls(architecture=d["architecture"], structure=dict(d["structure"]),
                       reference=dict(d.get("reference", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"a stored family fingerprint is damaged ({type(e).__name__}: {e}); rebuild the artifact "
                             "that holds it (safegene extract)") from None

    def structural_differences(self, other: "FamilyFingerprint") -> list[str]:
        diffs = []
        if self.architecture != other.architecture:
            diffs.append(f"architecture {self.architecture} != {other.architecture}")
        for k in _STRUCT_KEYS:
            a, b = self.structure.get(k), other.structure.get(k)
            if a != b:
                diffs.append(f"{k} {a} != {b}")
        return diffs

    def lineage_drift(self, other: "FamilyFingerprint") -> dict[str, float]:
        """Relative L2 distance of each shared reference tensor, from its sampled values."""
        out = {}
        for name, ref in self.reference.items():
            o = other.reference.get(name)
            if o is None or len(o["sample"]) != len(ref["sample"]):
                continue
            a, b = np.asarray(ref["sample"]), np.asarray(o["sample"])
            out[name] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
        return out

    def check_compatible(self, other: "FamilyFingerprint", what: str = "model",
                         reference: str = "the family this artifact was built for") -> list[str]:
        """Raise on a structural mismatch; return warnings for a same-shape model of a different lineage.

        Differences read 'reference value != other value'."""
        diffs = self.structural_differences(other)
        if diffs:
            raise FamilyMismatchError(
                f"{what} is not of {reference}: " + "; ".join(diffs)
                + ". Build a safety adapter for that family (safegene family build) instead."
            )
        return [
            f"{what}: reference tensor {n} differs by {d:.1%} from {reference} (>{LINEAGE_TOLERANCE:.0%}); "
            "it may be a different lineage of the same architecture, and the adapter may not transfer"
            for n, d in self.lineage_drift(other).items()
            if d > LINEAGE_TOLERANCE
        ]


def _tensor_ref(t: np.ndarray, n_sample: int = 256) -> dict[str, Any]:
    flat = np.ascontiguousarray(t, dtype=np.float32).reshape(-1)
    idx = np.linspace(0, flat.size - 1, num=min(n_sample, flat.size)).astype(np.int64)
    return {
        "sha256": hashlib.sha256(flat.tobytes()).hexdigest(),
        "shape": list(t.shape),
        "norm": float(np.linalg.norm(flat)),
        "sample": [float(x) for x in flat[idx]],
    }


def _structure(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    return arch, {k: config.get(k) for k in _STRUCT_KEYS}


def fingerprint_model(model) -> FamilyFingerprint:
    """Fingerprint an in-memory transformers model."""
    arch, struct = _structure(model.config.to_dict())
    params = dict(model.named_parameters())
    ref = {}
    for name in REFERENCE_TENSORS:
        for cand in (name, f"base_model.model.{name}"):
            if cand in params:
                ref[name] = _tensor_ref(params[cand].detach().float().cpu().numpy())
                break
    return FamilyFingerprint(arch, struct, ref)


def fingerprint_folder(folder: str | Path) -> FamilyFingerprint:
    """Fingerprint a safetensors folder, reading only the reference tensors (lazily, memory-mapped)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = read_model_json(folder / "config.json")
    arch, struct = _structure(config)
    ref = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name.startswith(("adapter_", "safegene_")):
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in REFERENCE_TENSORS:
                    if name in sf.keys() and name not in ref:
                        ref[name] = _tensor_ref(sf.get_tensor(name).float().numpy())
        except Exception as e:
            raise ModelError(f"{f}: cannot read safetensors ({type(e).__name__}: {e}); the file is corrupt or "
                             "truncated") from e
    return FamilyFingerprint(arch, struct, ref)
