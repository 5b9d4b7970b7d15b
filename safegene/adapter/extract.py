"""`extract_adapter`: aligned A + degraded D -> SafetyAdapter, reading both checkpoints tensor by tensor.

For every target module, ΔW = W_A − W_D is compressed to rank r by SVD: ΔW ≈ U_r S_r V_rᵀ, stored as
B = U_r S_r^½ and A = S_r^½ V_rᵀ (balanced factors, so both train well if distillation refines them).
Only one pair of tensors is in memory at a time; tensors are matched by name, never by order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import check, opt, to_dict
from ..errors import FamilyMismatchError, SafegeneError
from ..io import check_output_path, sha256_file
from ..models import PlacementConfig, resolve_model_path
from ..models.fingerprint import fingerprint_folder
from ..models.placement import float32_math
from ..models.registry import EMBEDDED_MODELS
from .checkpoint import LazyCheckpoint
from .core import SafetyAdapter
from .distill import DistillConfig
from .modules import parse_layers, target_weight_names

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Aligned A + degraded D (same family) -> safety adapter (low-rank factors of A - D per target module)."""

    aligned: str = opt("qwen2.5-coder-0.5b-instruct", "aligned model A")
    degraded: str = opt("runs/degraded", "degraded model D (same family as A)")
    output: str = opt("runs/adapter", "output adapter folder", aliases=("-o",))
    rank: int = opt(8, "rank r of every module's factors (the cap when `energy` is set)")
    energy: float | None = opt(None, "if set, per-module rank = smallest r keeping this fraction of ||ΔW||² (<= rank)")
    svd: str = opt("auto", "exact (full SVD), randomized (svd_lowrank), or auto (randomized unless `energy` is set)")
    oversample: int = opt(8, "randomized SVD oversampling")
    niter: int = opt(4, "randomized SVD power iterations")
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "module names to extract")
    layers: str | None = opt(None, "layers to extract, e.g. '0-11,20' (default: all)")
    check_untracked: bool = opt(True, "also compare non-target tensors (embeddings, norms, biases) and report drift")
    hash_inputs: bool = opt(True, "record the SHA-256 of every input weight file in the card")
    seed: int = opt(0, "seed for randomized SVD")
    distill: DistillConfig = opt(DistillConfig(), "distillation refinement")
    placement: PlacementConfig = opt(PlacementConfig(), "where distillation's A and D run, in what dtype (--device, "
                                     "--dtype, --device-map); the SVD itself always runs on the CPU in float32, "
                                     "reading the checkpoints tensor by tensor (no whole model in memory)",
                                     added_later=True)

    def __post_init__(self) -> None:
        check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        check(self.energy is None or 0 < self.energy <= 1, f"energy must be in (0, 1], got {self.energy}")
        check(self.svd in ("auto", "exact", "randomized"), f"svd must be auto, exact or randomized, got {self.svd}")
        check(bool(self.target_modules), "target_modules must name at least one module")


def _folder(ref: str, role: str) -> Path:
    path = Path(resolve_model_path(ref))
    if not path.is_dir():
        raise SafegeneError(f"{role} model '{ref}' must be a local safetensors folder or an embedded model name")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise SafegeneError(f"{role} model {path} is a PEFT adapter; merge it first (safegene degrade --save merged)")
    return path


def compare_checkpoints(a: LazyCheckpoint, d: LazyCheckpoint) -> None:
    """Refuse checkpoints whose tensor names or shapes differ, listing what differs."""
    ka, kd = set(a.keys()), set(d.keys())
    problems = [f"only in aligned: {n}" for n in sorted(ka - kd)] + [f"only in degraded: {n}" for n in sorted(kd - ka)]
    problems += [f"shape of {n}: {a.shape(n)} vs {d.shape(n)}" for n in sorted(ka & kd) if a.shape(n) != d.shape(n)]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise FamilyMismatchError(
            f"aligned ({a.folder}) and degraded ({d.folder}) checkpoints do not match:\n  {shown}{more}\n"
            "Both must be the same architecture and size (D is A fine-tuned)."
        )


def relative_drift(a: LazyCheckpoint, d: LazyCheckpoint, name: str, block_bytes: int = 16 * 2**20) -> float:
    """||W_A - W_D|| / ||W_A|| of one tensor, in float32, read in row blocks: the embedding and lm_head of a 7B model
    are 1-2 GB each, and whole float32 copies of both plus their difference would set the extraction's peak memory.
    (Per-block norms are summed as squares in Python floats; a float64 `sum(dtype=...)` would copy the block.)"""
    from torch.linalg import vector_norm

    diff_sq = ref_sq = 0.0
    for start, wa in a.row_blocks(name, block_bytes):
        wa = wa.float()
        wd = d.get_rows(name, start, start + wa.shape[0]).float() if wa.ndim else d.get(name).float()
        ref_sq += float(vector_norm(wa)) ** 2
        wd.sub_(wa)  # in place: no third block-sized tensor
        diff_sq += float(vector_norm(wd)) ** 2
    return (diff_sq ** 0.5) / max(ref_sq ** 0.5, 1e-12) if diff_sq > 0 else 0.0


def low_rank(delta, rank: int, energy: float | None, method: str, oversample: int, niter: int, generator_seed: int):
    """Factor `delta` (out x in) -> (A r x in, B out x r, kept energy fraction)."""
    import torch

    total = float((delta * delta).sum())
    if total == 0.0:
        r = 1
        return torch.zeros(r, delta.shape[1]), torch.zeros(delta.shape[0], r), 1.0
    use_exact = method == "exact" or (method == "auto" and energy is not None) or min(delta.shape) <= rank + oversample
    if use_exact:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        torch.manual_seed(generator_seed)
        u, s, v = torch.svd_lowrank(delta, q=min(rank + oversample, min(delta.shape)), niter=niter)
        vh = v.T
    cum = torch.cumsum(s * s, 0) / total
    r = min(rank, s.numel())
    if energy is not None:
        r = min(r, int(torch.searchsorted(cum, torch.tensor(energy * (1 - 1e-9)))) + 1)
    root = s[:r].sqrt()
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    return a.contiguous(), b.contiguous(), float(cum[r - 1])


def extract_adapter(cfg: ExtractConfig, progress: bool = True, overwrite: bool = False, save: bool = True) -> SafetyAdapter:
    """Build the safety adapter from A and D and (by default) save it to `cfg.output`."""
    from tqdm.auto import tqdm

    from ..runcard import peak_rss_mb

    t0 = time.perf_counter()
    a_dir, d_dir = _folder(cfg.aligned, "aligned"), _folder(cfg.degraded, "degraded")
    if save:
        check_output_path(cfg.output, inputs=[a_dir, d_dir], overwrite=overwrite)
    fingerprint = fingerprint_folder(a_dir)
    for msg in fingerprint.check_compatible(fingerprint_folder(d_dir), what="degraded model", reference="the aligned model's family"):
        log.warning(msg)
    n_layers = fingerprint.structure.get("num_hidden_layers")
    layers = parse_layers(cfg.layers, n_layers)
    stats: dict[str, Any] = {"modules": {}, "untracked_drift": {}}
    factors: dict[str, tuple[Any, Any]] = {}
    read_s = svd_s = 0.0
    with LazyCheckpoint(a_dir) as A, LazyCheckpoint(d_dir) as D:
        compare_checkpoints(A, D)
        names = target_weight_names(A.keys(), cfg.target_modules, layers)
        if not names:
            raise SafegeneError(f"no tensor of {A.folder} matches target_modules {cfg.target_modules}"
                                + (f" in layers {layers}" if layers else ""))
        largest = max(A.nbytes(n) for n in A.keys())
        for i, name in enumerate(tqdm(names, desc="extracting ΔW", unit="tensor", disable=not progress)):
            t = time.perf_counter()
            # in float32 whatever the checkpoints hold: the SVD of a bfloat16 difference loses the small singular
            # values the low-rank factors are made of
            delta = float32_math(A.get(name))  # a fresh tensor from the file, so the in-place update is safe
            delta -= D.get(name)  # D up-cast on the fly: no second float32 copy (272 MB per MLP matrix at 7B)
            read_s += time.perf_counter() - t
            t = time.perf_counter()
            a, b, kept = low_rank(delta, cfg.rank, cfg.energy, cfg.svd, cfg.oversample, cfg.niter, cfg.seed + i)
            svd_s += time.perf_counter() - t
            module = name[: -len(".weight")]
            factors[module] = (a, b)
            stats["modules"][module] = {"norm": round(float(delta.norm()), 6), "rank": int(a.shape[0]),
                                        "energy_kept": round(kept, 6)}
            del delta
        if cfg.check_untracked:
            targets = set(names)
            for name in tqdm([n for n in A.keys() if n not in targets], desc="checking other tensors", unit="tensor",
                             disable=not progress):
                drift = relative_drift(A, D, name)
                if drift > 0:
                    stats["untracked_drift"][name] = round(drift, 8)
        weight_files = {"aligned": A.files(), "degraded": D.files()}
    if stats["untracked_drift"]:
        log.warning("%d non-target tensors differ between A and D (largest relative drift %.2e); the adapter does "
                    "not carry those differences", len(stats["untracked_drift"]), max(stats["untracked_drift"].values()))
    inputs = {}
    if cfg.hash_inputs:
        for role, files in weight_files.items():  # the files the weights were read from (not a stale shard)
            inputs[role] = {f.name: sha256_file(f) for f in files}
    card = {
        "name": Path(cfg.output).name,
        "kind": "safety-adapter",
        "method": "SafeGene (arXiv 2606.06519): low-rank A - D",
        "base_model": cfg.aligned if cfg.aligned in EMBEDDED_MODELS else str(a_dir),
        "aligned": {"ref": cfg.aligned, "path": str(a_dir)},
        "degraded": {"ref": cfg.degraded, "path": str(d_dir)},
        "fingerprint": fingerprint.to_dict(),
        "input_sha256": inputs,
        "config": to_dict(cfg),
        "modules": stats["modules"],
        "untracked_drift": stats["untracked_drift"],
        "timings": {},
    }
    adapter = SafetyAdapter(factors=factors, card=card)
    card["timings"].update({"read_s": round(read_s, 2), "svd_s": round(svd_s, 2)})
    if cfg.distill.enabled:
        from .distill import distill_factors

        t = time.perf_counter()
        adapter, dstats = distill_factors(adapter, a_dir, d_dir, cfg.distill, progress=progress,
                                          placement=cfg.placement)
        card = adapter.card
        card["distill"] = dstats
        card["timings"]["distill_s"] = round(time.perf_counter() - t, 2)
    card["timings"]["total_s"] = round(time.perf_counter() - t0, 2)
    # the whole process's peak: includes anything the caller loaded before (bench/extract_bench.py isolates it)
    card["process_peak_rss_mb"] = round(peak_rss_mb(), 1)
    card["largest_tensor_mb"] = round(largest / 2**20, 1)
    if save:
        adapter.save(cfg.output, overwrite=overwrite)
    return adapter
