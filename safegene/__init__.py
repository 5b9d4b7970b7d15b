"""safegene: reusable safety adapters for fine-tuned open-weight LLMs (SafeGene, arXiv 2606.06519)."""

__version__ = "0.1.0"

from .errors import SafegeneError  # noqa: E402

__all__ = ["SafegeneError", "__version__"]
