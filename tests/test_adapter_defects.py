"""Regression tests for the adapter defects of review issue 12: PEFT pattern matching and unsupported PEFT features
in `SafetyAdapter.load`, short positioned reads in the lazy checkpoint reader, and KeyError / JSONDecodeError
escapes."""

import json
import os
import shutil
import struct

import pytest
import torch

from safegene.adapter import SafetyAdapter
from safegene.adapter.checkpoint import LazyCheckpoint
from safegene.errors import ModelError, SafegeneError
from safegene.models import load_model

IDS = torch.tensor([[3, 17, 42, 5, 99, 7]])


def peft_folder(base, out, seed=0, **lora_kw):
    """Save a plain PEFT LoRA (random A and B, so every factor matters) of `base` to `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), LoraConfig(init_lora_weights=False, **lora_kw))
    model.save_pretrained(str(out))
    return out


def attached_logits(adapter, base):
    model = load_model(base)
    with torch.no_grad(), adapter.attach(model, check=False):
        return model(IDS).logits


def peft_logits(base, folder):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(load_model(base), str(folder))(IDS).logits


# --- 1. PEFT rank_pattern / alpha_pattern are matched as PEFT matches them ----------------------------------------

def test_pattern_lookup_matches_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key

    from safegene.adapter.modules import pattern_value

    patterns = {"model.layers.0.self_attn.q_proj": 1, "self_attn.v_proj": 2, r"layers\.1\..*_proj": 3, "down_proj": 4,
                "layers.0.mlp.up": 5}
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
               "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj", "model.layers.10.self_attn.q_proj",
               "model.layers.0.self_attn.k_proj"]
    for m in modules:
        assert pattern_value(patterns, m, -1) == patterns.get(get_pattern_key(patterns.keys(), m), -1), m


def test_full_path_and_regex_patterns_load_like_peft(tiny_qwen, tmp_path):
    folder = peft_folder(
        tiny_qwen, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, r"layers\.1\..*v_proj": 6},
        alpha_pattern={"model.layers.0.self_attn.q_proj": 32, r"layers\.1\.mlp\.down_proj": 3, "v_proj": 5},
    )
    ad = SafetyAdapter.load(folder)
    assert ad.factors["model.layers.0.self_attn.q_proj"][0].shape[0] == 2
    assert torch.allclose(attached_logits(ad, tiny_qwen), peft_logits(tiny_qwen, folder), atol=1e-5)


def test_safegene_save_with_per_module_ranks_round_trips(tiny_qwen, tmp_path):
    g = torch.Generator().manual_seed(3)
    shapes = {"model.layers.0.self_attn.q_proj": (2, 32, 32), "model.layers.0.mlp.down_proj": (3, 64, 32),
              "model.layers.1.self_attn.q_proj": (4, 32, 32), "model.layers.1.self_attn.v_proj": (1, 32, 16)}
    factors = {m: (torch.randn(r, i, generator=g) * 0.3, torch.randn(o, r, generator=g) * 0.3)
               for m, (r, i, o) in shapes.items()}
    ad = SafetyAdapter(factors=factors, coefficients={0: 0.5, 1: -1.5})
    want = attached_logits(ad, tiny_qwen)
    ad.save(tmp_path / "ad")
    assert torch.allclose(attached_logits(SafetyAdapter.load(tmp_path / "ad"), tiny_qwen), want, atol=1e-5)
    assert torch.allclose(peft_logits(tiny_qwen, tmp_path / "ad"), want, atol=1e-5)
    # the PEFT half alone (rank_pattern/alpha_pattern with full-path keys) must be read back the same way
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "ad" / f, plain / f)
    assert json.loads((plain / "adapter_config.json").read_text())["rank_pattern"]
    assert torch.allclose(attached_logits(SafetyAdapter.load(plain), tiny_qwen), want, atol=1e-5)


def test_embedding_lora_is_refused(tiny_qwen, tmp_path):
    folder = peft_folder(tiny_qwen, tmp_path / "lora", r=4, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ModelError, match=r"lora_embedding.*embed_tokens"):
        SafetyAdapter.load(folder)


def test_modules_to_save_is_refused(tiny_qwen, tmp_path):
    folder = peft_folder(tiny_qwen, tmp_path / "lora", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ModelError, match=r"modules_to_save.*lm_head"):
        SafetyAdapter.load(folder)


def test_lora_bias_weights_are_refused(tiny_qwen, tmp_path):
    folder = peft_folder(tiny_qwen, tmp_path / "lora", r=4, target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(ModelError, match="lora_bias"):
        SafetyAdapter.load(folder)


def test_fan_in_fan_out_lora_is_refused(tmp_path):
    """PEFT sets fan_in_fan_out for Conv1D (GPT-2 style) layers, whose weights are stored transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(
        str(tmp_path / "gpt2"))
    folder = peft_folder(tmp_path / "gpt2", tmp_path / "lora", r=2, target_modules=["c_attn"])
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with pytest.raises(ModelError, match="fan_in_fan_out"):
        SafetyAdapter.load(folder)


def test_lora_outside_the_numbered_layers_is_refused(tiny_qwen, tmp_path):
    folder = peft_folder(tiny_qwen, tmp_path / "lora", r=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ModelError, match=r"lm_head.*numbered"):
        SafetyAdapter.load(folder)


def test_rank_that_contradicts_the_config_is_refused(tiny_qwen, tmp_path):
    folder = peft_folder(tiny_qwen, tmp_path / "lora", r=4, target_modules=["q_proj"])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"model.layers.1.self_attn.q_proj": 2}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"model\.layers\.1\.self_attn\.q_proj.*rank 2.*4"):
        SafetyAdapter.load(folder)


# --- 2. positioned reads are capped by the OS: read in a loop ------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {"big": torch.randn(70, 80, generator=g), "small": torch.arange(7, dtype=torch.int64),
          "half": torch.randn(33, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 4)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    return tmp_path, sd


def test_short_positioned_reads_are_continued(ckpt, monkeypatch):
    folder, sd = ckpt
    real, calls = os.preadv, []

    def capped(fd, buffers, offset):
        # like Linux past 0x7ffff000 bytes: a valid read that returns fewer bytes than asked for
        calls.append(offset)
        return real(fd, [memoryview(b)[:1000] for b in buffers][:1], offset)

    monkeypatch.setattr(os, "preadv", capped)
    with LazyCheckpoint(folder) as ck:
        for name, t in sd.items():
            got = ck.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    assert len(calls) > 20  # the 22 400-byte tensor alone needs 23 reads


def test_file_truncated_after_opening_is_a_clear_error(ckpt):
    folder, _ = ckpt
    path = folder / "model.safetensors"
    with LazyCheckpoint(folder) as ck:
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        os.truncate(path, 8 + n + 16)
        with pytest.raises(ModelError, match=r"model\.safetensors.*big.*truncated"):
            ck.get("big")


# --- 3. no KeyError / JSONDecodeError escapes ---------------------------------------------------------------------

def test_missing_tensor_in_checkpoint_names_tensor_file_and_fix(ckpt):
    folder, _ = ckpt
    with LazyCheckpoint(folder) as ck:
        for lookup in (ck.shape, ck.nbytes, ck.get):
            with pytest.raises(ModelError, match=r"no tensor named 'nope'.*model\.safetensors.*(re-download|same architecture)"):
                lookup("nope")


def write_raw_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry, where", [
    ({"dtype": "F32", "shape": [2]}, "init"),                                 # no data_offsets
    ({"dtype": "F32", "data_offsets": [0, 8]}, "init"),                       # no shape
    ({"shape": [2], "data_offsets": [0, 8]}, "init"),                         # no dtype
    ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "read"),         # dtype torch cannot hold
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "read"),         # shape does not fit the bytes
])
def test_malformed_header_entries_are_clear_errors(tmp_path, entry, where):
    write_raw_safetensors(tmp_path / "model.safetensors", {"w": entry}, bytes(8))
    with pytest.raises(ModelError, match=r"model\.safetensors.*\bw\b"):
        with LazyCheckpoint(tmp_path) as ck:
            assert where == "read"
            ck.get("w")


def test_invalid_checkpoint_config_json_is_a_clear_error(ckpt):
    folder, _ = ckpt
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json"):
        LazyCheckpoint(folder)


def small_adapter():
    g = torch.Generator().manual_seed(0)
    return SafetyAdapter(factors={"model.layers.0.self_attn.q_proj": (torch.randn(2, 32, generator=g),
                                                                       torch.randn(32, 2, generator=g))})


@pytest.mark.parametrize("name, text", [("safegene.json", "{oops"), ("safegene.json", "[1, 2]"),
                                        ("adapter_config.json", "{oops"), ("adapter_config.json", "[]")])
def test_invalid_json_in_adapter_folder_names_the_file(tmp_path, name, text):
    small_adapter().save(tmp_path / "ad")
    if name == "adapter_config.json":  # a plain PEFT folder: only the PEFT files
        (tmp_path / "ad" / "safegene.json").unlink()
    (tmp_path / "ad" / name).write_text(text)
    with pytest.raises(SafegeneError, match=rf"{name.replace('.', '[.]')}") as e:
        SafetyAdapter.load(tmp_path / "ad")
    assert "\n" not in str(e.value)


def test_corrupt_card_coefficients_and_peft_weights_are_clear_errors(tmp_path):
    small_adapter().save(tmp_path / "ad")
    card = json.loads((tmp_path / "ad" / "safegene.json").read_text())
    card["coefficients"] = {"zero": 1.0}
    (tmp_path / "ad" / "safegene.json").write_text(json.dumps(card))
    with pytest.raises(SafegeneError, match=r"safegene\.json"):
        SafetyAdapter.load(tmp_path / "ad")
    (tmp_path / "ad" / "safegene.json").unlink()
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SafegeneError, match=r"adapter_model\.safetensors"):
        SafetyAdapter.load(tmp_path / "ad")


def test_peft_config_without_r_uses_peft_defaults(tiny_qwen, tmp_path):
    folder = peft_folder(tiny_qwen, tmp_path / "lora", r=8, lora_alpha=8, target_modules=["q_proj"])
    want = peft_logits(tiny_qwen, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["r"], cfg["lora_alpha"]  # PEFT's defaults (8, 8) apply
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert torch.allclose(attached_logits(SafetyAdapter.load(folder), tiny_qwen), want, atol=1e-5)


def test_delta_of_an_unknown_module_is_a_clear_error():
    with pytest.raises(SafegeneError, match=r"model\.layers\.5\.mlp\.up_proj"):
        small_adapter().delta("model.layers.5.mlp.up_proj")
