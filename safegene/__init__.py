"""safegene: reusable safety adapters for fine-tuned open-weight LLMs (SafeGene, arXiv 2606.06519).

The API is a few verbs:

    adapter = extract_adapter(ExtractConfig(aligned=A, degraded=D))          # once per model family
    adapter = select_layers(adapter, SelectConfig(model=D))                  # data-aware layer choice
    calibrated = recalibrate(adapter, RecalibrateConfig(task_model=T))       # per task model, few shots
    apply_adapter(calibrated, model, mode="merge")                           # or mode="attach", or:
    with calibrated.attach(model): ...                                       # runtime, removed on exit

Heavy dependencies (torch, transformers) are imported lazily, so `import safegene` is cheap.
"""

__version__ = "0.1.0"

from .errors import SafegeneError  # noqa: E402

_LAZY = {
    "SafetyAdapter": ("safegene.adapter", "SafetyAdapter"),
    "extract_adapter": ("safegene.adapter", "extract_adapter"),
    "select_layers": ("safegene.selection", "select_layers"),
    "recalibrate": ("safegene.recalibration", "recalibrate"),
    "apply_adapter": ("safegene.apply", "apply_adapter"),
    "merge_to_folder": ("safegene.apply", "merge_to_folder"),
    "degrade": ("safegene.training", "degrade"),
    "finetune": ("safegene.training", "finetune"),
    "load_model": ("safegene.models", "load_model"),
    "load_tokenizer": ("safegene.models", "load_tokenizer"),
    "ExtractConfig": ("safegene.adapter.extract", "ExtractConfig"),
    "SelectConfig": ("safegene.selection", "SelectConfig"),
    "RecalibrateConfig": ("safegene.recalibration", "RecalibrateConfig"),
    "DegradeConfig": ("safegene.training", "DegradeConfig"),
    "FinetuneConfig": ("safegene.training", "FinetuneConfig"),
}

__all__ = ["SafegeneError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'safegene' has no attribute {name!r}")
