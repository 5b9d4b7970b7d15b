"""Model registry, loading (GGUF -> cached safetensors) and family fingerprints."""

from .fingerprint import FamilyFingerprint, fingerprint_model, fingerprint_folder
from .loading import load_model, load_tokenizer, prepare_model, resolve_model_path, cache_dir
from .placement import PlacementConfig, model_device
from .registry import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModelSpec, get_spec

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModelSpec",
    "FamilyFingerprint",
    "PlacementConfig",
    "cache_dir",
    "fingerprint_folder",
    "fingerprint_model",
    "get_spec",
    "load_model",
    "load_tokenizer",
    "model_device",
    "prepare_model",
    "resolve_model_path",
]
