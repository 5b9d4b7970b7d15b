"""The task update ΔW_task = T − base, as low-rank factors: what Safe LoRA and SafeMERGE operate on."""

from __future__ import annotations

from pathlib import Path

from ..adapter import SafetyAdapter, extract_adapter
from ..adapter.extract import ExtractConfig


def task_update(task_model: str, base_model: str, rank: int = 16) -> SafetyAdapter:
    """Factors of T − base. A PEFT LoRA folder is read exactly (its B·A·scaling); a full model is extracted
    tensor by tensor (T as 'aligned', base as 'degraded': the difference is T − base) and truncated to `rank`."""
    path = Path(task_model)
    if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
        update = SafetyAdapter.load(path)
    else:
        update = extract_adapter(ExtractConfig(aligned=task_model, degraded=base_model, rank=rank), save=False)
    update.card["name"] = f"task update of {task_model}"
    return update
