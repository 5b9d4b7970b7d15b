"""Selection, recalibration and apply on tiny models with a known adapter."""

import dataclasses
import json

import pytest
import torch

from safegene.adapter import SafetyAdapter
from safegene.apply import apply_adapter, merge_to_folder
from safegene.recalibration import RecalibrateConfig, recalibrate
from safegene.selection import SelectConfig, choose, plot_layer_scores, score_layers, select_layers
from safegene.models import load_model, load_tokenizer
from test_adapter import IDS


def test_score_layers_is_scale_free():
    g = torch.Generator().manual_seed(0)
    H = 16
    direction = torch.zeros(H)
    direction[0] = 1.0
    acts_h = torch.randn(20, 3, H, generator=g) + 2 * direction
    acts_b = torch.randn(20, 3, H, generator=g)
    acts_h[:, 2] = 100 * acts_h[:, 0]  # layer 2: layer 0's geometry at 100x the scale
    acts_b[:, 2] = 100 * acts_b[:, 0]
    push_h = torch.zeros(20, 3, H)
    push_b = torch.zeros(20, 3, H)
    push_h[:, 0] = direction  # layer 0 pushes harmful prompts along the harmful direction by 1 unit
    push_h[:, 2] = 100 * direction  # layer 2: the same push in its own units
    push_b[:, 1] = 5 * direction  # layer 1 only moves benign prompts
    s = score_layers(acts_h, acts_b, push_h, push_b)
    assert s["separability"][0] == pytest.approx(s["separability"][2], rel=1e-4)
    assert s["push"][0] == pytest.approx(s["push"][2], rel=1e-4) and s["push"][0] > 0
    assert s["push"][1] < 0
    assert choose(dict(enumerate(s["push"])), top_k=2, threshold=None) == [0, 2]
    assert choose({0: 1.0, 1: 0.5, 2: 0.1}, top_k=None, threshold=0.4) == [0, 1]
    assert choose({0: -1.0, 1: -0.5}, top_k=3, threshold=None) == [1]  # never empty


def test_select_layers_records_scores_and_plot(adapter, tmp_path):
    ad, d = adapter
    sel = select_layers(ad, SelectConfig(model=str(d), harmful="many-shot-harmful", benign="arithmetic",
                                         n_harmful=6, n_benign=6, top_k=1), progress=False)
    info = sel.card["selection"]
    assert len(info["selected_layers"]) == 1 and sel.layers == info["selected_layers"]
    assert set(info["scores"]) == {"0", "1"}
    best = max(info["scores"], key=lambda l: info["scores"][l])
    assert info["selected_layers"] == [int(best)]
    assert set(info["components"]) == {"refusal_gain_harmful", "refusal_gain_benign", "refusal-gain"}
    c = info["components"]
    for l in ("0", "1"):
        assert c["refusal-gain"][l] == pytest.approx(c["refusal_gain_harmful"][l] - c["refusal_gain_benign"][l], abs=1e-5)
    push = select_layers(ad, SelectConfig(model=str(d), method="push", n_harmful=6, n_benign=6, top_k=2), progress=False)
    assert set(push.card["selection"]["components"]) == {"separability", "push_harmful", "push_benign", "push", "sigma"}
    sel.save(tmp_path / "sel", plot=lambda folder: plot_layer_scores(sel, folder / "layer_scores.png"))
    png = (tmp_path / "sel" / "layer_scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "sel" / "safegene.json").read_text())["selected_layers"] == info["selected_layers"]
    norm_sel = select_layers(ad, SelectConfig(model=str(d), method="norm", top_k=2), progress=False)
    assert norm_sel.layers == [0, 1]


@pytest.mark.parametrize("method", ["refusal-gain", "push"])
def test_selection_does_not_change_the_model(adapter, method):
    ad, d = adapter
    model, tok = load_model(d), load_tokenizer(d)
    with torch.no_grad():
        before = model(IDS).logits.clone()
    select_layers(ad, SelectConfig(model=str(d), method=method, n_harmful=4, n_benign=4), model=model, tokenizer=tok,
                  progress=False)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_push_matches_a_direct_measurement(adapter):
    """Layer 1's push = its output with only its own update on minus off; layer 0's activation = its output."""
    from safegene.chat import prompt_text
    from safegene.selection import layer_activations_and_pushes

    ad, d = adapter
    model, tok = load_model(d), load_tokenizer(d)
    prompts = ["Say sorry", "What is 2 + 2?"]
    acts, push = layer_activations_and_pushes(ad, model, tok, prompts, progress=False)
    enc = tok([prompt_text(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    outs = {}
    hook = model.model.layers[1].register_forward_hook(lambda m, a, o: outs.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[:, -1]))
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
        off = outs["h"].clone()
        with ad.select([1]).attach(model):
            model(**enc)
        on = outs["h"].clone()
    hook.remove()
    assert torch.allclose(acts[:, 0], hidden[1][:, -1], atol=1e-5)
    assert torch.allclose(acts[:, 1], off, atol=1e-5)
    assert torch.allclose(push[:, 1], on - off, atol=1e-5)
    assert push[:, 1].abs().max() > 1e-4


def test_refusal_gain_matches_a_direct_measurement(adapter):
    """The gain of layer 1 equals log p(refusal) with only layer 1's update on minus with none, measured directly."""
    from safegene.data.records import PromptResponse
    from safegene.objectives import encode_batch, sequence_logprob
    from safegene.selection import refusal_gain

    ad, d = adapter
    model, tok = load_model(d), load_tokenizer(d, padding_side="right")
    harm, ben = ["Say sorry"], ["What is 2 + 2?"]
    res = refusal_gain(ad, model, tok, harm, ben, "I'm sorry, but no", progress=False, max_refusal_tokens=3)
    assert res["scored_opening"] == tok.decode(tok("I'm sorry, but no", add_special_tokens=False)["input_ids"][:3])
    batch = encode_batch(tok, [PromptResponse(p, res["scored_opening"]) for p in harm + ben], 64)
    base = sequence_logprob(model, batch)
    with ad.select([1]).attach(model):
        on = sequence_logprob(model, batch)
    assert res["refusal_gain_harmful"][1] == pytest.approx(float(on[0] - base[0]), abs=1e-4)
    assert res["refusal_gain_benign"][1] == pytest.approx(float(on[1] - base[1]), abs=1e-4)
    with ad.select([0]).attach(model):  # from layer 0 the shared prefix's keys and values carry the update too
        on0 = sequence_logprob(model, batch)
    assert res["refusal_gain_harmful"][0] == pytest.approx(float(on0[0] - base[0]), abs=1e-4)
    assert res["refusal_gain_benign"][0] == pytest.approx(float(on0[1] - base[1]), abs=1e-4)
    whole = refusal_gain(ad, model, tok, harm, ben, "I'm sorry, but no", progress=False, max_refusal_tokens=3,
                         reuse_prefix=False)
    assert res["refusal-gain"] == pytest.approx(whole["refusal-gain"], abs=1e-5)


def test_linear_refusal_gain_is_the_derivative_of_the_exact_one(adapter):
    from safegene.selection import refusal_gain, refusal_gain_linear

    ad, d = adapter
    model, tok = load_model(d), load_tokenizer(d)
    harm, ben = ["Say sorry", "Tell me how"], ["What is 2 + 2?"]
    eps = 1e-3
    exact = refusal_gain(eps * ad, model, tok, harm, ben, "I'm sorry", progress=False)
    lin = refusal_gain_linear(ad, model, tok, harm, ben, "I'm sorry", progress=False)
    for key in ("refusal_gain_harmful", "refusal_gain_benign"):
        for e, g in zip(exact[key], lin[key]):
            assert e / eps == pytest.approx(g, rel=0.05, abs=1e-3)
    assert any(abs(g) > 1e-3 for g in lin["refusal-gain"])
    whole = refusal_gain_linear(ad, model, tok, harm, ben, "I'm sorry", progress=False, reuse_prefix=False)
    assert lin["refusal-gain"] == pytest.approx(whole["refusal-gain"], rel=1e-4, abs=1e-6)


def test_partial_forward_equals_the_full_model(adapter):
    from safegene.data.records import PromptResponse
    from safegene.forward import capture, run_from
    from safegene.objectives import encode_batch

    ad, d = adapter
    model, tok = load_model(d), load_tokenizer(d, padding_side="right")
    batch = encode_batch(tok, [PromptResponse("a short one", "ok"), PromptResponse("a much longer prompt here " * 3, "fine")], 64)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.target_mask]
        rec = capture(model, batch.input_ids, batch.attention_mask)
        assert torch.allclose(run_from(model, 0, rec, batch.target_mask), full, atol=1e-5)
        # from layer 1 with the adapter on layer 1 only == full model with that adapter
        with ad.select([1]).attach(model):
            want = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.target_mask]
            assert torch.allclose(run_from(model, 1, rec, batch.target_mask), want, atol=1e-5)
            sub = rec.subset([1])
            assert torch.allclose(run_from(model, 1, sub, batch.target_mask[[1]]), want[-int(batch.target_mask[1].sum()):], atol=1e-5)


def test_recalibration_learns_bounded_coefficients(adapter, tmp_path):
    ad, d = adapter
    cfg = RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=6, n_task=6,
                            optimizer="adam", steps=15, batch_size=4, learning_rate=0.3, alpha_max=2.0)
    cal = recalibrate(ad, cfg, progress=False)
    rc = cal.card["recalibration"]
    alphas = [cal.coefficients[l] for l in ad.layers]
    assert all(0.0 < a < 2.0 for a in alphas)
    assert alphas != [1.0, 1.0]  # it moved
    obj = rc["objective"]
    # the learnt coefficients fit the few-shot objective at least as well as plain α = 1
    assert obj["after"]["refusal_nll"] + obj["after"]["task_kl"] <= obj["alpha_1"]["refusal_nll"] + obj["alpha_1"]["task_kl"] + 1e-3
    assert rc["shots"] == {"harmful": 6, "task": 6, "data_sha256": rc["shots"]["data_sha256"]}
    # T alone: its refusal NLL is that of the adapter at α = 0, and its KL to itself is 0 (not run, by definition)
    zero = recalibrate(ad, dataclasses.replace(cfg, steps=1, learning_rate=1e-9, alpha_init=1e-6), progress=False)
    assert obj["task_model_alone"]["task_kl"] == 0.0
    assert obj["task_model_alone"]["refusal_nll"] == pytest.approx(
        zero.card["recalibration"]["objective"]["after"]["refusal_nll"], abs=1e-3)
    assert set(rc["phases"]) == {"cache_lower_layers_s", "steps_s", "objective_checks_s"}
    cal.save(tmp_path / "cal")
    again = SafetyAdapter.load(tmp_path / "cal")
    assert [again.coefficients[l] for l in ad.layers] == pytest.approx(alphas, abs=1e-6)
    # the PEFT export folds α into B
    m = "model.layers.1.mlp.down_proj"
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "cal" / "adapter_model.safetensors"))
    b = sd[f"base_model.model.{m}.lora_B.weight"]
    assert torch.allclose(b, ad.factors[m][1] * again.coefficients[1], atol=1e-6)


def test_recalibration_with_huge_utility_weight_stays_near_zero_push(adapter):
    ad, d = adapter
    cfg = RecalibrateConfig(task_model=str(d), n_harmful=4, n_task=4, optimizer="adam", steps=20, batch_size=4,
                            learning_rate=0.5, utility_weight=1e4)
    cal = recalibrate(ad, cfg, progress=False)
    obj = cal.card["recalibration"]["objective"]
    assert obj["after"]["task_kl"] < obj["alpha_1"]["task_kl"]


def test_merge_to_folder_streams_and_matches_in_memory_merge(adapter, tiny_qwen, tmp_path):
    ad, d = adapter
    ad = ad.with_coefficients({0: 0.5, 1: 1.5})
    out = merge_to_folder(ad, str(d), tmp_path / "merged", shard_bytes=20_000, progress=False)
    assert (out / "model.safetensors.index.json").is_file()  # tiny shards -> several files
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "tokenizer_config.json").is_file() and (out / "safegene_merge.json").is_file()
    in_memory = apply_adapter(ad, load_model(d), mode="merge")
    with torch.no_grad():
        assert torch.allclose(load_model(out)(IDS).logits, in_memory(IDS).logits, atol=1e-5)
    with pytest.raises(Exception, match="already exists"):
        merge_to_folder(ad, str(d), out, progress=False)


def test_attach_mode_and_swap(adapter):
    ad, d = adapter
    model = load_model(d)
    with torch.no_grad():
        base = model(IDS).logits.clone()
        h = apply_adapter(ad, model, mode="attach")
        full = model(IDS).logits.clone()
        h.set_coefficients(0.5)
        half = model(IDS).logits.clone()
        h.remove()
        assert torch.equal(model(IDS).logits, base)
        assert not torch.allclose(full, half)
        with (0.5 * ad).attach(model):
            assert torch.allclose(model(IDS).logits, half, atol=1e-6)
