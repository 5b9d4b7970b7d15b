"""The recalibration's benign-but-sensitive shots stay apart from every over-refusal evaluation set."""

from safegene.data.sensitive import SENSITIVE_SHOTS, sensitive_shots
from safegene.data.taxonomy import normalise as _norm


def test_sensitive_shots_are_disjoint_from_over_refusal_evaluation_sets():
    from safegene.data import harmful_prompts, shared_data_dir

    shots = {_norm(p.prompt) for p in sensitive_shots()}
    assert len(shots) == 48 and {p.category for p in sensitive_shots()} == set(SENSITIVE_SHOTS)
    evaluation = {_norm(p.prompt) for p in harmful_prompts("benign-sensitive")}
    if shared_data_dir():
        evaluation |= {_norm(p.prompt) for p in harmful_prompts("shared:xstest-safe")}
        assert len(evaluation) > 250  # XSTest's 250 safe prompts were read
    assert not shots & evaluation


def test_recalibration_keeps_t_answers_on_sensitive_shots(tiny_qwen):
    """With `sensitive`, the KL-to-T term also covers T's own answers to the sensitive prompts."""
    from safegene.models import load_model, load_tokenizer
    from safegene.recalibration import RecalibrateConfig, sensitive_shots as shots_for

    model, tok = load_model(tiny_qwen), load_tokenizer(tiny_qwen)
    cfg = RecalibrateConfig(task_model=str(tiny_qwen), sensitive="sensitive-shots", n_sensitive=5, sensitive_tokens=4)
    pairs = shots_for(cfg, model, tok)
    assert len(pairs) == 5 and all(p.response for p in pairs)
    assert {p.prompt for p in pairs} <= {p.prompt for p in sensitive_shots()}
    assert shots_for(RecalibrateConfig(task_model=str(tiny_qwen)), model, tok) == []


def test_refusal_margin_needs_sensitive_prompts():
    import pytest

    from safegene.errors import ConfigError
    from safegene.recalibration import RecalibrateConfig

    with pytest.raises(ConfigError, match="refusal-margin' reads the benign-but-sensitive prompts: set sensitive"):
        RecalibrateConfig(sensitive_term="refusal-margin")
    with pytest.raises(ConfigError, match="sensitive_term must be one of kl, refusal-margin"):
        RecalibrateConfig(sensitive="sensitive-shots", sensitive_term="hinge")


def test_opening_only_scores_the_first_tokens_and_ends_each_row_there(tiny_qwen):
    import torch

    from safegene.data.records import PromptResponse
    from safegene.models import load_model, load_tokenizer
    from safegene.objectives import encode_batch, opening_only, target_logits

    model, tok = load_model(tiny_qwen), load_tokenizer(tiny_qwen, padding_side="right")
    full = encode_batch(tok, [PromptResponse("What is 1 + 7?", "Sure, here is how to do it: first, second."),
                              PromptResponse("Classify the sentiment: positive", "19")], 64)
    cut = opening_only(full, 3)
    assert cut.target_mask.sum(1).tolist() == [3, min(3, int(full.target_mask[1].sum()))]
    for row in range(2):
        scored = cut.target_mask[row].nonzero().flatten()
        assert int(cut.attention_mask[row].sum()) == int(scored[-1]) + 1  # the row ends at its last scored position
        assert torch.equal(scored, full.target_mask[row].nonzero().flatten()[:len(scored)])
    with torch.no_grad():
        whole = target_logits(model, full)
        opening = target_logits(model, cut)
    # the scored positions' logits are those of the whole rows
    keep = cut.target_mask[full.target_mask]
    assert torch.allclose(opening, whole[keep], atol=1e-5)


def test_refusal_margin_prices_the_refusal_overtaking_t_answers(adapter):
    """sensitive_term 'refusal-margin': the sensitive prompts are not KL shots; the term is softplus(NLL(T's answer)
    − NLL(refusal)) on their openings, equal to whole forward passes of T and of T with the adapter; chunking does
    not change its value or gradient, its weight enters the gradient linearly, and the Adam fit reads it too."""
    import dataclasses

    import pytest
    import torch

    from safegene.models import load_model, load_tokenizer
    from safegene.objectives import preference_loss, target_logits
    from safegene.recalibration import RecalibrateConfig, margin_batches, recalibrate, sensitive_shots as shots_for

    ad, d = adapter
    cfg = RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=5, n_task=5,
                            sensitive="sensitive-shots", n_sensitive=6, sensitive_tokens=6,
                            sensitive_term="refusal-margin", sensitive_weight=2.0, sensitive_opening=4, chunk_size=4)
    card = recalibrate(ad, cfg, progress=False).card["recalibration"]
    model, tok = load_model(d), load_tokenizer(d)
    sensitive = shots_for(cfg, model, tok)
    assert card["shots"]["task"] == 5 and card["shots"]["sensitive_refusal"] == len(sensitive) > 3
    answers, refusals = margin_batches(tok, sensitive, cfg)
    assert int(answers.target_mask.sum(1).max()) == 4 and int(refusals.target_mask.sum(1).max()) == 4

    def margin():
        with torch.no_grad():
            return float(preference_loss(target_logits(model, answers), answers, target_logits(model, refusals),
                                         refusals))

    at_t = margin()
    with ad.attach(model):
        at_1 = margin()
    assert abs(at_1 - at_t) > 1e-3  # the adapter moves the refusal against T's answers
    assert card["objective"]["task_model_alone"]["sensitive_refusal"] == pytest.approx(at_t, abs=1e-4)
    first = card["history"][0]  # α = 1
    assert first["sensitive_refusal"] == pytest.approx(at_1, abs=1e-4)
    assert first["loss"] == pytest.approx(first["refusal_nll"] + first["task_kl"] + 2.0 * first["sensitive_refusal"],
                                          abs=3e-4)
    grads = {}
    for w in (0.0, 1.0, 2.0):
        h = recalibrate(ad, dataclasses.replace(cfg, sensitive_weight=w, chunk_size=64), progress=False)
        grads[w] = torch.tensor(h.card["recalibration"]["history"][0]["gradient"])
        if w == 2.0:
            one = h.card["recalibration"]["history"][0]
    assert one["sensitive_refusal"] == pytest.approx(first["sensitive_refusal"], abs=2e-5)
    assert one["gradient"] == pytest.approx(first["gradient"], rel=1e-4, abs=1e-7)
    assert not torch.allclose(grads[1.0], grads[0.0], atol=1e-6)
    assert torch.allclose(grads[2.0] - grads[0.0], 2 * (grads[1.0] - grads[0.0]), atol=2e-5)
    adam = recalibrate(ad, dataclasses.replace(cfg, optimizer="adam", steps=2, batch_size=4), progress=False)
    assert all("sensitive_refusal" in h for h in adam.card["recalibration"]["history"])


def test_sensitive_weight_is_read_only_with_the_margin():
    import pytest

    from safegene.errors import ConfigError
    from safegene.recalibration import RecalibrateConfig

    with pytest.raises(ConfigError, match="sensitive_weight is read only with sensitive_term refusal-margin"):
        RecalibrateConfig(sensitive="sensitive-shots", sensitive_weight=2.0)
