import json
import shutil

import pytest
import torch

from safegene.adapter import SafetyAdapter, extract_adapter, merge_into_model
from safegene.adapter.extract import ExtractConfig
from safegene.errors import FamilyMismatchError, SafegeneError
from safegene.models import load_model

IDS = torch.tensor([[3, 17, 42, 5, 99, 7]])


def make_degraded(aligned, out, rank=2, layers=(0, 1), seed=1, modules=("q_proj", "down_proj"), full_rank_noise=0.0):
    """D = A minus a known low-rank update on some modules (so A - D is known exactly)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(aligned, out)
    sd = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    truth = {}
    for l in layers:
        for m in modules:
            sub = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{l}.{sub}.{m}.weight"
            w = sd[name]
            delta = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g) * 0.05
            if full_rank_noise:
                delta = delta + full_rank_noise * torch.randn(w.shape, generator=g)
            sd[name] = w - delta
            truth[name[: -len(".weight")]] = delta
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return truth


@pytest.fixture
def pair(tiny_qwen, tmp_path):
    d = tmp_path / "D"
    truth = make_degraded(tiny_qwen, d)
    return tiny_qwen, d, truth


def cfg(a, d, out, **kw):
    return ExtractConfig(aligned=str(a), degraded=str(d), output=str(out), hash_inputs=True, **kw)


def test_extract_recovers_a_minus_d(pair, tmp_path):
    a, d, truth = pair
    adapter = extract_adapter(cfg(a, d, tmp_path / "ad", rank=4), progress=False)
    for m, delta in truth.items():
        assert torch.allclose(adapter.delta(m), delta, atol=1e-5)
    # modules that did not change get (near-)zero factors
    untouched = "model.layers.0.self_attn.v_proj"
    assert adapter.delta(untouched).abs().max() < 1e-6
    card = json.loads((tmp_path / "ad" / "safegene.json").read_text())
    assert card["fingerprint"]["structure"]["num_hidden_layers"] == 2
    assert set(card["input_sha256"]) == {"aligned", "degraded"} and card["untracked_drift"] == {}
    assert card["modules"]["model.layers.1.mlp.down_proj"]["energy_kept"] > 0.999
    assert card["layer_norms"]["0"] > 0


def test_d_plus_adapter_is_a_and_plain_peft_loads_it(pair, tmp_path):
    from peft import PeftModel

    a, d, _ = pair
    extract_adapter(cfg(a, d, tmp_path / "ad", rank=2), progress=False)
    cfg_json = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg_json["peft_type"] == "LORA" and cfg_json["r"] == 2 and cfg_json["lora_alpha"] == 2
    with torch.no_grad():
        want = load_model(a)(IDS).logits
        peft_model = PeftModel.from_pretrained(load_model(d), str(tmp_path / "ad"))
        assert torch.allclose(peft_model(IDS).logits, want, atol=1e-4)
        assert not torch.allclose(load_model(d)(IDS).logits, want, atol=1e-3)


def test_attach_and_merge_agree_and_attach_cleans_up(pair, tmp_path):
    a, d, _ = pair
    adapter = extract_adapter(cfg(a, d, tmp_path / "ad", rank=2), progress=False, save=False)
    model = load_model(d)
    with torch.no_grad():
        base = model(IDS).logits.clone()
        want = load_model(a)(IDS).logits
        with adapter.attach(model) as h:
            assert torch.allclose(model(IDS).logits, want, atol=1e-4)
            h.disable()
            assert torch.equal(model(IDS).logits, base)
            h.enable()
            h.set_coefficients(0.0)
            assert torch.allclose(model(IDS).logits, base, atol=1e-6)
        assert torch.equal(model(IDS).logits, base)  # hooks removed: bit-identical to before
        merged = merge_into_model(adapter, load_model(d))
        assert torch.allclose(merged(IDS).logits, want, atol=1e-4)


def test_save_load_round_trip_and_arithmetic(pair, tmp_path):
    a, d, truth = pair
    adapter = extract_adapter(cfg(a, d, tmp_path / "ad", rank=2), progress=False)
    loaded = SafetyAdapter.load(tmp_path / "ad")
    assert loaded.all_layers == [0, 1] and loaded.rank == 2 and loaded.model_type == "qwen2"
    m = "model.layers.1.self_attn.q_proj"
    assert torch.allclose(loaded.delta(m), adapter.delta(m))
    assert torch.allclose((0.5 * loaded).delta(m), 0.5 * truth[m], atol=1e-5)
    assert torch.allclose((-loaded).delta(m), -truth[m], atol=1e-5)
    assert torch.allclose((loaded + loaded).delta(m), 2 * truth[m], atol=1e-5)
    assert (loaded + loaded).factors[m][0].shape[0] == 4  # ranks concatenate
    sel = loaded.select([1]).with_coefficients({1: 0.25})
    assert sel.modules() == sorted(x for x in loaded.factors if ".layers.1." in x)
    sel.save(tmp_path / "sel")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "sel" / "adapter_model.safetensors"))
    assert all(".layers.1." in k for k in sd)  # unselected layers are not exported
    again = SafetyAdapter.load(tmp_path / "sel")
    assert again.layers == [1] and again.coefficients[1] == 0.25
    assert torch.allclose(again.delta(m), 0.25 * truth[m], atol=1e-5)


def test_plain_peft_lora_folder_loads_as_adapter(tiny_qwen, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_qwen), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "lora"))
    ad = SafetyAdapter.load(tmp_path / "lora")
    with torch.no_grad():
        want = model(IDS).logits
        base = load_model(tiny_qwen)
        with ad.attach(base, check=False):
            assert torch.allclose(base(IDS).logits, want, atol=1e-4)


def test_energy_mode_picks_the_rank(tiny_qwen, tmp_path):
    d = tmp_path / "D"
    make_degraded(tiny_qwen, d, rank=3, layers=(0,), modules=("down_proj",))
    ad = extract_adapter(cfg(tiny_qwen, d, tmp_path / "ad", rank=8, energy=0.999999, layers="0",
                             target_modules=["down_proj"]), progress=False, save=False)
    assert ad.factors["model.layers.0.mlp.down_proj"][0].shape[0] == 3
    assert ad.all_layers == [0]


def test_mismatched_checkpoints_are_listed(tiny_qwen, tiny_llama, tmp_path):
    with pytest.raises(FamilyMismatchError, match="architecture Qwen2ForCausalLM != LlamaForCausalLM"):
        extract_adapter(cfg(tiny_qwen, tiny_llama, tmp_path / "x"), progress=False)
    # same config but a renamed tensor: the names are listed
    from safetensors.torch import load_file, save_file

    d = tmp_path / "D"
    shutil.copytree(tiny_qwen, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.renamed_proj.weight"] = sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FamilyMismatchError, match=r"only in aligned: model\.layers\.0\.mlp\.up_proj\.weight"):
        extract_adapter(cfg(tiny_qwen, d, tmp_path / "x"), progress=False)
    assert not (tmp_path / "x").exists()


def test_corrupt_safetensors_is_a_clear_error(tiny_qwen, tmp_path):
    d = tmp_path / "D"
    shutil.copytree(tiny_qwen, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SafegeneError, match="corrupt or truncated"):
        extract_adapter(cfg(tiny_qwen, d, tmp_path / "x"), progress=False)


def test_family_guard_on_attach(pair, tiny_llama, tmp_path):
    a, d, _ = pair
    adapter = extract_adapter(cfg(a, d, tmp_path / "ad"), progress=False, save=False)
    with pytest.raises(FamilyMismatchError, match="architecture"):
        with adapter.attach(load_model(tiny_llama)):
            pass
    from tiny import save_model

    other = save_model(tmp_path / "other", "qwen2", seed=77)  # same shapes, another lineage
    with pytest.warns(UserWarning, match="different lineage"):
        with adapter.attach(load_model(other)):
            pass


def test_untracked_drift_is_reported(tiny_qwen, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "D"
    shutil.copytree(tiny_qwen, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 1.1
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    ad = extract_adapter(cfg(tiny_qwen, d, tmp_path / "ad"), progress=False, save=False)
    assert ad.card["untracked_drift"] == {"model.norm.weight": pytest.approx(0.1, rel=1e-3)}


def test_distillation_refines_a_rank_starved_adapter(tiny_qwen, tmp_path):
    from safegene.adapter.distill import DistillConfig

    d = tmp_path / "D"
    make_degraded(tiny_qwen, d, rank=6, layers=(0, 1), modules=("q_proj", "v_proj", "down_proj"))
    distill = DistillConfig(enabled=True, harmful="many-shot-harmful", benign="arithmetic", n_harmful=4, n_benign=4,
                            response_tokens=6, steps=25, batch_size=8, learning_rate=5e-3, top_k=16)
    ad = extract_adapter(cfg(tiny_qwen, d, tmp_path / "ad", rank=1, distill=distill), progress=False)
    kl = ad.card["distill"]["kl_to_A"]
    assert kl["D"] > kl["D+svd"] > 0  # rank 1 of a rank-6 update: SVD helps but cannot be exact
    assert kl["D+distilled"] < kl["D+svd"]  # training the factors on A's distribution closes more of the gap
    assert ad.card["timings"]["distill_s"] > 0
    saved = SafetyAdapter.load(tmp_path / "ad")
    m = "model.layers.0.mlp.down_proj"
    assert torch.allclose(saved.factors[m][0], ad.factors[m][0]) and saved.rank == 1
