import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny import save_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture
def pairs_jsonl(tmp_path) -> Path:
    import json

    p = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} + 7? Answer with the number only.", "response": str(i + 7)} for i in range(12)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


@pytest.fixture
def adapter(tiny_qwen, tmp_path):
    """(A − D adapter on layers 0-1 of four projections, D's folder): the known adapter of the recalibration tests."""
    from safegene.adapter import extract_adapter
    from safegene.adapter.extract import ExtractConfig
    from test_adapter import make_degraded

    d = tmp_path / "D"
    make_degraded(tiny_qwen, d, layers=(0, 1), modules=("q_proj", "o_proj", "down_proj", "up_proj"))
    ad = extract_adapter(ExtractConfig(aligned=str(tiny_qwen), degraded=str(d), output=str(tmp_path / "ad"), rank=2),
                         progress=False)
    return ad, d


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A 3-layer tiny A, a D with a known low-rank difference on every layer, and the adapter A − D."""
    from safegene.adapter import extract_adapter
    from safegene.adapter.extract import ExtractConfig
    from test_adapter import make_degraded
    from tiny import save_model

    root = tmp_path_factory.mktemp("placement")
    a = save_model(root / "A", "qwen2", layers=3)
    d = root / "D"
    make_degraded(a, d, layers=(0, 1, 2), modules=("q_proj", "o_proj", "down_proj", "up_proj"))
    ad = extract_adapter(ExtractConfig(aligned=str(a), degraded=str(d), output=str(root / "ad"), rank=2),
                         progress=False)
    return root, d, ad
