"""The SafetyAdapter: extraction, persistence (PEFT-loadable folders) and runtime attach/merge."""

from .core import SafetyAdapter
from .extract import extract_adapter
from .runtime import AttachedAdapter, merge_into_model

__all__ = ["AttachedAdapter", "SafetyAdapter", "extract_adapter", "merge_into_model"]
