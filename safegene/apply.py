"""Apply a SafetyAdapter to a task model: merge into the weights (zero inference overhead) or attach at runtime.

`merge_to_folder` streams the task model's safetensors tensor by tensor into new shards, so merging needs about
one output shard of memory, not the model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter.checkpoint import LazyCheckpoint
from .adapter.core import SafetyAdapter
from .adapter.runtime import AttachedAdapter, merge_into_model
from .config import opt
from .errors import SafegeneError
from .io import atomic_dir, check_output_path, write_json
from .models import resolve_model_path
from .models.fingerprint import fingerprint_folder
from .models.placement import PlacementConfig

log = logging.getLogger(__name__)
SHARD_BYTES = 1 << 30
SOURCE_ONLY_FILES = ("model.safetensors.index.json", "safegene_run.json", "README.md")


@dataclass
class ApplyConfig:
    """Merge a (calibrated) adapter into a task model and write the result as a new HF folder."""

    adapter: str | None = opt(None, "adapter folder (usually a calibrated one)", positional=True)
    model: str | None = opt(None, "task model T: HF folder, PEFT adapter folder on its base, or embedded name")
    output: str | None = opt(None, "output folder of the merged model", aliases=("-o",))
    shard_mb: int = opt(1024, "largest output shard, in MB (merging holds about one shard in memory)")
    placement: PlacementConfig = opt(PlacementConfig(), "where a PEFT task model is merged in memory (--device, "
                                     "--dtype); a merged folder is streamed tensor by tensor and keeps its dtype",
                                     added_later=True)


def apply_adapter(adapter: SafetyAdapter, model: Any, mode: str = "merge") -> Any:
    """mode='merge': add α_l·ΔW_l into `model`'s weights in place and return the model.
    mode='attach': return an AttachedAdapter handle (enable/disable/set_coefficients/remove)."""
    for msg in adapter.check_model(model):
        log.warning(msg)
    if mode == "merge":
        return merge_into_model(adapter, model)
    if mode == "attach":
        return AttachedAdapter(model, adapter)
    raise SafegeneError(f"mode must be 'merge' or 'attach', got '{mode}'")


def merge_to_folder(adapter: SafetyAdapter, model_ref: str, output: str | Path, overwrite: bool = False,
                    shard_bytes: int = SHARD_BYTES, progress: bool = True,
                    placement: PlacementConfig | None = None) -> Path:
    """Write task model + adapter as a new HF folder (safetensors shards), reading one tensor at a time."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    src = Path(resolve_model_path(model_ref))
    out = check_output_path(output, inputs=[src], overwrite=overwrite)
    if (src / "adapter_config.json").is_file() and not (src / "config.json").is_file():
        # base + PEFT task adapter: merge the task adapter in memory first
        from .models import load_model, load_tokenizer

        if placement is not None and placement.device_map is not None:
            raise SafegeneError("a PEFT task model is merged in memory, which a device_map cannot spread: leave out "
                                "--device-map (merge it on one device) or merge its adapter into its base first")
        model = load_model(src, placement)
        apply_adapter(adapter, model, "merge")
        with atomic_dir(out, overwrite=overwrite) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            load_tokenizer(src).save_pretrained(str(tmp))
            write_json(tmp / "safegene_merge.json", _merge_card(adapter, model_ref, t0))
        return out
    fp = fingerprint_folder(src)
    if adapter.fingerprint is not None:
        for msg in adapter.fingerprint.check_compatible(fp, what=f"model {model_ref}"):
            log.warning(msg)
    modules = set(adapter.modules())
    with LazyCheckpoint(src) as ck, atomic_dir(out, overwrite=overwrite) as tmp:
        missing = [m for m in modules if f"{m}.weight" not in ck]
        if missing:
            raise SafegeneError(f"{src} lacks the adapter's modules {sorted(missing)[:5]}")
        writer = ShardWriter(tmp, shard_bytes)
        for name in tqdm(ck.keys(), desc="merging", unit="tensor", disable=not progress):
            t = ck.get(name)
            mod = name[: -len(".weight")] if name.endswith(".weight") else None
            if mod in modules:
                t = (t.float() + adapter.delta(mod)).to(t.dtype)
            writer.add(name, t)
        writer.close()
        for f in src.iterdir():
            # weights are rewritten above; the source's own cards (its run card, its model card) describe the
            # source, not the merged model
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in SOURCE_ONLY_FILES:
                shutil.copy2(f, tmp / f.name)
        write_json(tmp / "safegene_merge.json", _merge_card(adapter, model_ref, t0))
    return out


class ShardWriter:
    """Collect tensors into safetensors shards of at most `max_bytes`, writing each as soon as it is full."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, Any] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: Any) -> None:
        n = tensor.numel() * tensor.element_size()
        if self.current and self.size + n > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.size += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        fname = f".shard-{len(self.files):05d}.safetensors"
        save_file(self.current, str(self.folder / fname), metadata={"format": "pt"})
        self.files.append((fname, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> None:
        """Write the last shard and give the shards their HF names (plus an index when there are several)."""
        if self.current:
            self._flush()
        if len(self.files) == 1:
            (self.folder / self.files[0][0]).rename(self.folder / "model.safetensors")
            return
        total, weight_map = len(self.files), {}
        for i, (fname, names) in enumerate(self.files):
            new = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            (self.folder / fname).rename(self.folder / new)
            weight_map.update({n: new for n in names})
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def _merge_card(adapter: SafetyAdapter, model_ref: str, t0: float) -> dict[str, Any]:
    return {
        "kind": "safegene-merged-model",
        "task_model": model_ref,
        "adapter": adapter.card.get("name"),
        "selected_layers": adapter.layers,
        "coefficients": {str(l): adapter.coefficients.get(l, 1.0) for l in adapter.layers},
        "adapter_card": adapter.card,
        "seconds": round(time.perf_counter() - t0, 2),
    }
