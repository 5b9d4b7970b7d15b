"""Recalibration's cost: the partial forward runs only what changes, and the line search is a handful of passes."""

import dataclasses

import pytest
import torch

from safegene.data.records import PromptResponse
from safegene.forward import capture, capture_from, decoder_parts, run_from
from safegene.models import load_model, load_tokenizer
from safegene.objectives import encode_batch
from safegene.recalibration import RecalibrateConfig, recalibrate


def _counting(model):
    """Forward calls of every decoder layer and of the LM head, counted by hooks on the modules themselves."""
    layers, _, head = decoder_parts(model)
    calls = {"head": 0, **{l: 0 for l in range(len(layers))}}

    def count(key):
        def f(*_):
            calls[key] += 1
        return f

    hooks = [layers[l].register_forward_hook(count(l)) for l in range(len(layers))]
    hooks.append(head.register_forward_hook(count("head")))
    return calls, hooks


def _batch(d):
    tok = load_tokenizer(d, padding_side="right")
    return encode_batch(tok, [PromptResponse("a short one", "ok"), PromptResponse("a much longer prompt here " * 3, "fine")], 64)


def test_capture_from_runs_only_the_layers_below_start_and_equals_the_full_model(adapter):
    ad, d = adapter
    model = load_model(d)
    batch = _batch(d)
    layers = list(decoder_parts(model)[0])
    calls, hooks = _counting(model)
    try:
        rec = capture_from(model, batch.input_ids, batch.attention_mask, 1)
    finally:
        for h in hooks:
            h.remove()
    # layer 0 ran once; layer 1 and the LM head (over every position) never did
    assert calls == {"head": 0, 0: 1, 1: 0}
    assert list(decoder_parts(model)[0]) == layers  # the real layers are back, the same objects
    assert set(rec.hidden) == {1} and set(rec.calls) == {1}
    with torch.no_grad(), ad.select([1]).attach(model):
        want = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.target_mask]
        assert torch.allclose(run_from(model, 1, rec, batch.target_mask), want, atol=1e-5)


def test_capture_from_puts_the_layers_back_when_the_pass_fails(adapter):
    ad, d = adapter
    model = load_model(d)
    batch = _batch(d)
    layers = list(decoder_parts(model)[0])

    def boom(*_):
        raise RuntimeError("lower layer failed")

    h = layers[0].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="lower layer failed"):
            capture_from(model, batch.input_ids, batch.attention_mask, 1)
    finally:
        h.remove()
    assert list(decoder_parts(model)[0]) == layers
    with pytest.raises(Exception, match="outside the model's 2 layers"):
        capture_from(model, batch.input_ids, batch.attention_mask, 2)


def test_capture_stops_at_the_highest_wanted_layer(adapter):
    _, d = adapter
    model = load_model(d)
    batch = _batch(d)
    calls, hooks = _counting(model)
    try:
        only_0 = capture(model, batch.input_ids, batch.attention_mask, [0])
        assert calls == {"head": 0, 0: 0, 1: 0}  # layer 0's input is the embedding: nothing ran
        both = capture(model, batch.input_ids, batch.attention_mask)
        assert calls == {"head": 0, 0: 1, 1: 0}
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(only_0.hidden[0], both.hidden[0])
    with torch.no_grad():
        assert torch.allclose(run_from(model, 0, both, batch.target_mask),
                              model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.target_mask],
                              atol=1e-5)


def _cfg(d, **kw):
    return RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=5, n_task=5,
                             **kw)


def test_line_search_is_one_gradient_and_a_few_forward_passes(adapter):
    ad, d = adapter
    ad = ad.select([1])  # layer 0 never changes: it runs only at capture
    model, tok = load_model(d), load_tokenizer(d)
    # whole padded shots: the prefix shared by the shots would add one top-layer call per pass (tested below)
    cfg = _cfg(d, search_points=3, reuse_prefix=False)
    calls, hooks = _counting(model)
    try:
        rc = recalibrate(ad, cfg, model=model, tokenizer=tok, progress=False).card["recalibration"]
    finally:
        for h in hooks:
            h.remove()
    points = rc["history"][1:]
    assert 1 <= len(points) <= 3
    # the top layer runs once per chunk (5 shots: one chunk per set) in: T's reference on the task shots, T alone on
    # the harmful shots, the gradient (harmful + task), and each point (harmful + task); nothing else
    assert calls[1] == 1 + 1 + 2 + 2 * len(points)
    assert calls[0] == 2  # the lower layer: once per shot set, at capture
    assert set(rc["phases"]) == {"cache_lower_layers_s", "gradient_s", "search_s"}
    obj = rc["objective"]
    # the gradient point is α = alpha_init = 1: the card's alpha_1 comes free with it
    assert rc["history"][0]["t"] == 0.0 and rc["history"][0]["loss"] == pytest.approx(
        obj["alpha_1"]["refusal_nll"] + obj["alpha_1"]["task_kl"], abs=2e-4)
    # the winner is the best point seen, and it is no worse than α = 1
    best = min(rc["history"], key=lambda h: h["loss"])
    assert obj["after"]["refusal_nll"] == pytest.approx(best["refusal_nll"], abs=1e-4)
    assert best["loss"] <= rc["history"][0]["loss"]
    alphas = [float(a) for a in rc["coefficients"].values()]
    assert all(0.0 <= a <= cfg.alpha_max for a in alphas)
    if best is not rc["history"][0]:
        assert alphas == pytest.approx(best["alpha"], abs=1e-6)


def test_line_search_moves_along_the_gradient(adapter):
    ad, d = adapter
    rc = recalibrate(ad, _cfg(d), progress=False).card["recalibration"]
    g = rc["history"][0]["gradient"]
    assert any(abs(x) > 0 for x in g)
    first = rc["history"][1]
    # each coefficient moved against its gradient's sign (or stayed on a bound), the steepest one to its bound
    for a, gi in zip(first["alpha"], g):
        assert (a - 1.0) * gi <= 1e-9
    lead = max(range(len(g)), key=lambda i: abs(g[i]))
    assert first["alpha"][lead] == pytest.approx(2.0 if g[lead] < 0 else 0.0)


def test_chunked_objective_equals_one_pass(adapter, tmp_path):
    """Chunks are weighted by their tokens, positions and shots: the value and the gradient do not depend on the
    chunk size (a plain mean over chunks would weight a short shot like a long one). The refusals differ in length,
    so a chunk's share of the shots is not its share of the target tokens."""
    import json

    ad, d = adapter
    refusals = tmp_path / "refusals.jsonl"
    refusals.write_text("".join(json.dumps({"prompt": f"How do I do harmful thing {i}?", "response": text}) + "\n"
                                for i, text in enumerate(["No.", "I'm sorry, but I cannot help with that. " * 4, "No.",
                                                          "No.", "I'm sorry, but I cannot help with that."])))
    for base in (_cfg(d, refusals=str(refusals)), _cfg(d, preference_weight=0.5)):
        one = recalibrate(ad, dataclasses.replace(base, chunk_size=64), progress=False).card["recalibration"]
        small = recalibrate(ad, dataclasses.replace(base, chunk_size=2), progress=False).card["recalibration"]
        for k in ("refusal_nll", "task_kl", "preference", "loss"):
            if k in one["history"][0]:
                assert small["history"][0][k] == pytest.approx(one["history"][0][k], abs=2e-5)
        assert small["history"][0]["gradient"] == pytest.approx(one["history"][0]["gradient"], rel=1e-4, abs=1e-7)
        assert small["coefficients"] == pytest.approx(one["coefficients"], abs=1e-5)


def test_tied_line_search_and_adam_share_t_alone(adapter):
    ad, d = adapter
    tied = recalibrate(ad, _cfg(d, tied=True), progress=False)
    assert len(set(tied.coefficients[l] for l in ad.layers)) == 1
    assert len(tied.card["recalibration"]["history"][0]["gradient"]) == 1
    adam = recalibrate(ad, _cfg(d, optimizer="adam", steps=2, batch_size=4), progress=False).card["recalibration"]
    assert adam["objective"]["task_model_alone"] == tied.card["recalibration"]["objective"]["task_model_alone"]
    assert set(adam["phases"]) == {"cache_lower_layers_s", "steps_s", "objective_checks_s"}


def test_optimizer_and_search_settings_are_validated():
    from safegene.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer must be one of line-search, adam"):
        RecalibrateConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="search_points must be >= 1"):
        RecalibrateConfig(search_points=0)


def _prefixed_batch(tok, same_length=False):
    """Right-padded shots that share a chat-template opening; their own parts differ in length unless
    `same_length`, where no row is padded and the model records no attention mask."""
    prompts = (["What is 1 + 7?", "What is 2 + 7?", "What is 3 + 7?"] if same_length else
               ["What is 1 + 7?", "Classify the sentiment: positive negative " * 2, "What is 12 + 7? Answer.",
                "The quick brown fox"])
    return encode_batch(tok, [PromptResponse(p, "19") for p in prompts], 64)


def _allowed_model(arch, attention, window=None):
    """A tiny model of each allow-listed layout; `window` gives Mistral/Qwen3 sliding-window attention shorter than
    the shots (Qwen3: on its upper layers), whose masks the cut must slice, not rebuild."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from tiny import make_model, make_tokenizer

    if arch in ("qwen2", "llama"):
        model, tok = make_model(arch, layers=3)
    else:
        tok = make_tokenizer()
        kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                  initializer_range=0.2)
        torch.manual_seed(0)
        model = (MistralForCausalLM(MistralConfig(sliding_window=window, **kw)) if arch == "mistral" else
                 Qwen3ForCausalLM(Qwen3Config(use_sliding_window=window is not None, sliding_window=window,
                                              max_window_layers=1, head_dim=8, **kw)))
        model.eval()
    model.config._attn_implementation = attention
    return model, tok


@pytest.mark.parametrize("arch,attention,window", [("qwen2", "sdpa", None), ("llama", "eager", None),
                                                   ("qwen2", "eager", None), ("mistral", "sdpa", 6),
                                                   ("mistral", "eager", 6), ("qwen3", "sdpa", 6)])
@pytest.mark.parametrize("same_length", [False, True])
def test_cut_passes_equal_whole_padded_rows(arch, attention, window, same_length):
    """The shared prefix as cached keys and values, and groups cut to their longest row, give the logits and the
    coefficient gradient of whole padded rows, in padded and unpadded batches (where a mask must be built), with
    sliding windows shorter than the shots."""
    from safegene.forward import ShotPasses

    model, tok = _allowed_model(arch, attention, window)
    batch = _prefixed_batch(tok, same_length)
    rec = capture_from(model, batch.input_ids, batch.attention_mask, 1)
    whole = ShotPasses(model, 1, rec, batch, cut=False)
    cut = ShotPasses(model, 1, rec, batch)
    assert cut.cut and not whole.cut
    assert cut.prefix_length >= 5  # "<|im_start|>user\n" and at least "What is"/the shared opening
    widths = [cut.lengths[i] for i in range(len(cut))]
    assert (len(set(widths)) == 1) == same_length
    groups = cut.groups(2)
    assert sorted(i for g in groups for i in g) == list(range(len(cut)))
    assert all(widths[a] <= widths[b] for a, b in zip([g[0] for g in groups], [g[-1] for g in groups]))
    scale = torch.tensor(1.0, requires_grad=True)
    # a delta on layer 2's MLP, scaled by `scale`: what the prefix's keys and values carry to the gradient
    mlp = decoder_parts(model)[0][2].mlp.down_proj
    delta = torch.randn_like(mlp.weight) * 0.3
    hook = mlp.register_forward_hook(lambda m, i, o: o + scale * torch.nn.functional.linear(i[0], delta))
    try:
        for idx in groups + [list(range(len(cut)))]:
            want = whole.logits(idx)
            (gw,) = torch.autograd.grad(want.square().mean(), scale)
            prefix = cut.prefix()
            got = cut.logits(idx, prefix)
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-5)
            (gc,) = torch.autograd.grad(got.square().mean(), scale)
            assert gc == pytest.approx(float(gw), rel=1e-4, abs=1e-7)
    finally:
        hook.remove()


def test_cut_is_off_where_the_model_is_not_known():
    from safegene.forward import ShotPasses
    from tiny import make_model

    model, tok = make_model("qwen2", layers=2)
    batch = _prefixed_batch(tok)
    rec = capture_from(model, batch.input_ids, batch.attention_mask, 1)
    model.config._attn_implementation = "flash_attention_2"  # unpads from the 2-D mask: a cut mask would be wrong
    passes = ShotPasses(model, 1, rec, batch)
    assert not passes.cut and passes.prefix_length == 0 and passes.prefix() is None
    assert passes.groups(3) == [[0, 1, 2], [3]]


def test_shared_prefix_stops_before_any_scored_position():
    from safegene.forward import shared_prefix_length

    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]])
    att = torch.ones_like(ids)
    tmask = torch.zeros_like(ids, dtype=torch.bool)
    assert shared_prefix_length(ids, att, tmask) == 4
    tmask[1, 2] = True  # position 2 predicts a target token: it must run with the rows, not in the prefix
    assert shared_prefix_length(ids, att, tmask) == 2
    assert shared_prefix_length(ids[:1], att[:1], tmask[:1]) == 0  # one row shares nothing with anyone
    att[0, 2:] = 0  # a row of 2 tokens keeps its last one
    assert shared_prefix_length(ids, att, torch.zeros_like(tmask)) == 1


def test_recalibration_with_the_prefix_cut_matches_whole_shots_on_fewer_positions(adapter):
    """The same objective, gradient and coefficients as whole padded shots, while the top layer runs fewer
    positions (counted on the layer's input)."""
    ad, d = adapter  # layers 0 and 1: the prefix's keys and values in layer 1 depend on layer 0's coefficient
    cards, positions = {}, {}
    for reuse in (False, True):
        model, tok = load_model(d), load_tokenizer(d)
        seen = [0]
        hook = decoder_parts(model)[0][1].register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__(0, seen[0] + (a[0] if a else kw["hidden_states"]).shape[:2].numel()),
            with_kwargs=True)
        try:
            cards[reuse] = recalibrate(ad, _cfg(d, reuse_prefix=reuse, chunk_size=2), model=model, tokenizer=tok,
                                       progress=False).card["recalibration"]
        finally:
            hook.remove()
        positions[reuse] = seen[0]
    whole, cut = cards[False], cards[True]
    for a, b in zip(whole["history"], cut["history"]):
        for k in ("refusal_nll", "task_kl", "loss"):
            assert b[k] == pytest.approx(a[k], abs=2e-5)
    assert cut["history"][0]["gradient"] == pytest.approx(whole["history"][0]["gradient"], rel=1e-4, abs=1e-7)
    assert cut["coefficients"] == pytest.approx(whole["coefficients"], abs=1e-5)
    assert cut["objective"]["task_model_alone"] == pytest.approx(whole["objective"]["task_model_alone"], abs=2e-5)
    # what the top layer ran: per pass, whole rows at the set's width, or the prefix once and each group of 2
    # (sorted by length) from the prefix to its longest row
    from safegene.forward import shared_prefix_length
    from safegene.recalibration import harmful_shots, task_shots

    cfg, tok = _cfg(d), load_tokenizer(d)
    passes = {"h": 2 + len(whole["history"]) - 1, "t": 2 + len(whole["history"]) - 1}  # T alone / reference,
    want = {False: 0, True: 0}                                                        # gradient, each point
    for name, pairs in (("h", harmful_shots(cfg).refusal), ("t", task_shots(cfg))):
        b = encode_batch(tok, pairs, cfg.max_length)
        lengths = sorted(int(n) for n in b.attention_mask.sum(1))
        # the task shots share "<|im_start|>user\nWhat is"; one harmful shot, cut from the left to max_length,
        # shares nothing, so the harmful set is only cut to each group's longest row
        p = shared_prefix_length(b.input_ids, b.attention_mask, b.target_mask)
        assert (p > 0) == (name == "t")
        want[False] += passes[name] * b.input_ids.numel()
        want[True] += passes[name] * (p + sum(len(lengths[i:i + 2]) * (max(lengths[i:i + 2]) - p)
                                              for i in range(0, len(lengths), 2)))
    assert positions == want
    assert positions[True] < positions[False]


@pytest.mark.parametrize("arch,attention", [("qwen2", "sdpa"), ("llama", "eager")])
def test_capture_with_the_prefix_once_records_what_the_whole_capture_does(arch, attention):
    """The layers below the start run the shared prefix on one row and the rest of every row on its keys and values:
    the same hidden states and calls as running every row whole, on fewer positions of the lower layers."""
    from safegene.forward import shared_prefix_length
    from tiny import make_model

    model, tok = make_model(arch, layers=3)
    model.config._attn_implementation = attention
    batch = _prefixed_batch(tok)
    p = shared_prefix_length(batch.input_ids, batch.attention_mask, batch.target_mask)
    assert p >= 5
    ran = []
    hook = decoder_parts(model)[0][0].register_forward_pre_hook(
        lambda m, a, kw: ran.append((a[0] if a else kw["hidden_states"]).shape[:2].numel()), with_kwargs=True)
    try:
        whole = capture_from(model, batch.input_ids, batch.attention_mask, 2)
        n_whole = sum(ran)
        ran.clear()
        once = capture_from(model, batch.input_ids, batch.attention_mask, 2, prefix_length=p)
    finally:
        hook.remove()
    rows, width = batch.input_ids.shape
    assert n_whole == rows * width and ran == [p, rows * (width - p)]
    assert set(once.hidden) == {2} and set(once.calls) == {2}
    assert torch.allclose(once.hidden[2], whole.hidden[2], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(run_from(model, 2, once, batch.target_mask), run_from(model, 2, whole, batch.target_mask),
                              atol=1e-5)


def test_cut_is_off_in_training_mode_and_a_layer_that_drops_the_cache_is_caught():
    """A checkpointing layer in training mode drops the cache (transformers 5): no cut then; and a layer that does
    not read the prefix fails loudly instead of attending to its own positions only."""
    from safegene.forward import ShotPasses, can_cut_positions
    from safegene.errors import SafegeneError
    from tiny import make_model

    model, tok = make_model("qwen2", layers=3)
    batch = _prefixed_batch(tok)
    rec = capture_from(model, batch.input_ids, batch.attention_mask, 1)
    model.train()
    assert not can_cut_positions(model) and not ShotPasses(model, 1, rec, batch).cut
    model.eval()
    passes = ShotPasses(model, 1, rec, batch)
    layer = decoder_parts(model)[0][2]
    hook = layer.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "past_key_values": None, "attention_mask": None}),
                                          with_kwargs=True)
    try:
        with pytest.raises(SafegeneError, match="1 of 2 layers read the shared prefix"):
            passes.logits([0, 1])
    finally:
        hook.remove()


def test_recalibration_cut_matches_whole_shots_with_preference_above_layer_0(adapter):
    """End to end from layer 1 (so the lower layer's prefix runs once too), harmful shots that share an opening (room
    for the longest, so none is cut from the left) and the preference term on (the compliant rows have their own
    prefix): the same value, gradient and coefficients."""
    from safegene.forward import shared_prefix_length
    from safegene.recalibration import harmful_shots

    ad, d = adapter
    ad = ad.select([1])
    cards = {}
    for reuse in (False, True):
        cfg = _cfg(d, preference_weight=0.5, max_length=256, chunk_size=2, reuse_prefix=reuse)
        cards[reuse] = recalibrate(ad, cfg, progress=False).card["recalibration"]
    shots, tok = harmful_shots(cfg), load_tokenizer(d)
    for pairs in (shots.refusal, shots.compliant):
        b = encode_batch(tok, pairs, 256)
        assert shared_prefix_length(b.input_ids, b.attention_mask, b.target_mask) > 0
    whole, cut = cards[False], cards[True]
    assert "preference" in whole["history"][0]
    for a, b in zip(whole["history"], cut["history"]):
        for k in ("refusal_nll", "task_kl", "preference", "loss"):
            assert b[k] == pytest.approx(a[k], abs=2e-5)
    assert cut["history"][0]["gradient"] == pytest.approx(whole["history"][0]["gradient"], rel=1e-4, abs=1e-7)
    assert cut["coefficients"] == pytest.approx(whole["coefficients"], abs=1e-5)
