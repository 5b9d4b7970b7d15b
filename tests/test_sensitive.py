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


def test_refusal_margin_prices_refusing_sensitive_prompts_more_than_t(adapter):
    """sensitive_term 'refusal-margin': the sensitive prompts are not KL shots; the term is log 2 at T alone, and at
    α = 1 it equals softplus(NLL_T − NLL_adapter) of the refusal, per-token means, computed with whole forward passes
    of T and of T with the adapter; chunking does not change its value or the gradient."""
    import dataclasses
    import math

    import pytest
    import torch

    from safegene.models import load_model, load_tokenizer
    from safegene.objectives import encode_batch, sequence_mean_nll, target_logits
    from safegene.recalibration import RecalibrateConfig, recalibrate, sensitive_refusal_shots

    ad, d = adapter
    cfg = RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=5, n_task=5,
                            sensitive="sensitive-shots", n_sensitive=6, sensitive_term="refusal-margin",
                            sensitive_weight=2.0, chunk_size=4)
    card = recalibrate(ad, cfg, progress=False).card["recalibration"]
    assert card["shots"]["task"] == 5 and card["shots"]["sensitive_refusal"] == 6
    assert card["objective"]["task_model_alone"]["sensitive_refusal"] == pytest.approx(math.log(2), abs=1e-4)
    first = card["history"][0]  # α = 1
    assert first["loss"] == pytest.approx(first["refusal_nll"] + first["task_kl"] + 2.0 * first["sensitive_refusal"],
                                          abs=3e-4)
    model, tok = load_model(d), load_tokenizer(d)
    batch = encode_batch(tok, sensitive_refusal_shots(cfg), cfg.max_length)
    with torch.no_grad():
        nll_t = sequence_mean_nll(target_logits(model, batch), batch)
        with ad.attach(model):
            nll_a = sequence_mean_nll(target_logits(model, batch), batch)
    want = float(torch.nn.functional.softplus(nll_t - nll_a).mean())
    assert abs(want - math.log(2)) > 1e-3  # the adapter moves the refusal's likelihood on these prompts
    assert first["sensitive_refusal"] == pytest.approx(want, abs=1e-4)
    one = recalibrate(ad, dataclasses.replace(cfg, chunk_size=64), progress=False).card["recalibration"]["history"][0]
    assert one["sensitive_refusal"] == pytest.approx(first["sensitive_refusal"], abs=2e-5)
    assert one["gradient"] == pytest.approx(first["gradient"], rel=1e-4, abs=1e-7)
    # without the term (weight 0) the gradient is different: the term reaches the coefficients
    off = recalibrate(ad, dataclasses.replace(cfg, sensitive_weight=0.0), progress=False).card["recalibration"]
    assert off["history"][0]["gradient"] != pytest.approx(first["gradient"], rel=1e-3, abs=1e-6)
