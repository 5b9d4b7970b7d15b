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
from typing import Any, Iterable

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


def _sample_index(size: int, n_sample: int) -> np.ndarray:
    """The flat positions a reference tensor's sample is read at: evenly spaced, first and last included."""
    return np.linspace(0, size - 1, num=min(n_sample, size)).astype(np.int64)


def _tensor_ref(t: np.ndarray, n_sample: int = 256) -> dict[str, Any]:
    return _blocks_ref([np.asarray(t)], tuple(t.shape), n_sample)


def _blocks_ref(blocks: Iterable[np.ndarray], shape: tuple[int, ...], n_sample: int = 256) -> dict[str, Any]:
    """Hash, norm and evenly spaced sample of a tensor given as consecutive row blocks, so a 7B model's embedding is
    fingerprinted without a whole float32 copy of it (the hash is of the float32 bytes either way)."""
    idx = _sample_index(int(np.prod(shape)), n_sample)
    h, sq, sample, seen = hashlib.sha256(), 0.0, [], 0
    for block in blocks:
        flat = np.ascontiguousarray(block, dtype=np.float32).reshape(-1)
        h.update(memoryview(flat))
        wide = flat.astype(np.float64)
        sq += float(np.dot(wide, wide))
        mine = idx[(idx >= seen) & (idx < seen + flat.size)] - seen
        sample += [float(x) for x in flat[mine]]
        seen += flat.size
    return {"sha256": h.hexdigest(), "shape": list(shape), "norm": float(np.sqrt(sq)), "sample": sample}


def _structure(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    return arch, {k: config.get(k) for k in _STRUCT_KEYS}


def _sample_ref(t: Any, n_sample: int = 256) -> dict[str, Any]:
    """Shape and the evenly spaced sample of `_blocks_ref`, read from the tensor where it lies (no float32 copy, no
    hash): all that `lineage_drift` compares."""
    import torch

    idx = _sample_index(t.numel(), n_sample)
    sample = t.detach().reshape(-1)[torch.from_numpy(idx).to(t.device)].float().cpu().tolist()
    return {"shape": list(t.shape), "sample": sample}


def fingerprint_model(model, digest: bool = True) -> FamilyFingerprint:
    """Fingerprint an in-memory transformers model. `digest=False` leaves out each reference tensor's hash and norm
    and keeps its shape and sample, which is what a compatibility check compares: hashing a float32 copy of the
    embedding took 10 s on the 0.5B model (a quarter of a recalibration) and needs gigabytes on a 7B one."""
    arch, struct = _structure(model.config.to_dict())
    params = dict(model.named_parameters())
    ref = {}
    for name in REFERENCE_TENSORS:
        for cand in (name, f"base_model.model.{name}"):
            if cand in params:
                t = params[cand]
                ref[name] = _tensor_ref(t.detach().float().cpu().numpy()) if digest else _sample_ref(t)
                break
    return FamilyFingerprint(arch, struct, ref)


def fingerprint_folder(folder: str | Path) -> FamilyFingerprint:
    """Fingerprint a safetensors folder, reading only the reference tensors, in row blocks (the files the model
    loader reads: see `LazyCheckpoint`)."""
    from ..adapter.checkpoint import LazyCheckpoint

    folder = Path(folder)
    config = read_model_json(folder / "config.json")
    arch, struct = _structure(config)
    ref = {}
    if not any(not f.name.startswith(("adapter_", "safegene_", ".")) for f in folder.glob("*.safetensors")):
        return FamilyFingerprint(arch, struct, ref)  # no safetensors weights (another format): structure only
    ck = LazyCheckpoint(folder)
    with ck:
        for name in REFERENCE_TENSORS:
            if name in ck:
                blocks = (b.float().numpy() for _, b in ck.row_blocks(name, 8 * 2**20))
                ref[name] = _blocks_ref(blocks, ck.shape(name))
    return FamilyFingerprint(arch, struct, ref)
