"""Recalibration's opt-in shot knobs (issue 15): A's own refusals as targets, the preference term against compliance,
jailbreak-wrapped shots; their defaults leave stage keys alone, their bad values are one-line config errors, and the
benchmark variants that turn them on."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from safegene.config import from_dict, settings
from safegene.data import harmful_prompt_texts, prompt_response_pairs
from safegene.data.attacks import PLACEHOLDER, jailbreak_templates, template_family, wrap
from safegene.data.records import PromptResponse
from safegene.errors import ConfigError
from safegene.io import sha256_text
from safegene.recalibration import (RecalibrateConfig, harmful_shots, recalibrate, refusal_shots, task_shots,
                                    whole_sentences)

# the recalibration settings as stages recorded them before the knobs existed: a default config must still say this
KEYS_BEFORE_ISSUE_15 = {"task_model", "harmful", "refusals", "refusal_text", "task", "n_harmful", "n_task",
                        "utility_weight", "alpha_max", "alpha_init", "steps", "batch_size", "learning_rate",
                        "max_length", "tied", "seed"}


def _data_sha(pairs):
    return sha256_text("\n".join(f"{p.prompt}\x1f{p.response}" for p in pairs))


def test_defaults_leave_stage_keys_and_shots_unchanged():
    cfg = RecalibrateConfig()
    # `optimizer` is the one new key a default config carries: the default fit changed from Adam steps to the line
    # search, so a stage recorded before (no optimizer: Adam) must not be taken for today's default, but is still
    # the same stage as an explicit Adam fit
    assert set(settings(cfg)) == KEYS_BEFORE_ISSUE_15 | {"optimizer"}
    assert settings(cfg)["optimizer"] == "line-search"
    assert set(settings(dataclasses.replace(cfg, optimizer="adam"))) == KEYS_BEFORE_ISSUE_15
    KEYS = KEYS_BEFORE_ISSUE_15 | {"optimizer"}
    # each knob, once set, enters the key (so a variant never reuses plain SafeGene's stage)
    for change in ({"preference_weight": 1.0}, {"jailbreak_shots": 0.5}, {"refusal_target": "aligned", "aligned": "A"},
                   {"aligned_tokens": 12}, {"jailbreak_max_length": 200}):
        assert set(settings(dataclasses.replace(cfg, **change))) == KEYS | set(change)
    small = RecalibrateConfig(n_harmful=5)
    assert refusal_shots(small) == [PromptResponse(p, small.refusal_text) for p in harmful_prompt_texts("harmful-pairs", 5, 0)]
    shots = harmful_shots(small)
    assert shots.compliant == [] and shots.wrapped == [False] * 5 and shots.info == {"refusal_target": "fixed"}


@pytest.mark.parametrize("change, says", [
    ({"refusal_target": "mine"}, "refusal_target must be one of fixed, aligned"),
    ({"refusal_target": "aligned"}, "set aligned"),
    ({"aligned": "runs/aligned"}, "set refusal_target: aligned or refusal_floor: aligned, or unset aligned"),
    ({"refusal_floor": "aligned"}, "refusal_floor 'aligned' needs the aligned model: set aligned"),
    ({"refusal_floor": "A"}, "refusal_floor must be one of none, aligned"),
    ({"refusal_target": "aligned", "aligned": "A", "refusals": "r.jsonl"}, "unset refusals"),
    ({"aligned_tokens": 0}, "aligned_tokens must be >= 1"),
    ({"preference_weight": -1.0}, "preference_weight must be a number >= 0"),
    ({"preference_weight": math.nan}, "preference_weight must be a number >= 0"),
    ({"preference_weight": 1.0, "refusals": "r.jsonl"}, "unset refusals, or set preference_weight: 0"),
    ({"jailbreak_shots": 1.5}, "give a number in [0, 1]"),
    ({"jailbreak_shots": -0.1}, "give a number in [0, 1]"),
    ({"jailbreak_templates": "inthewild"}, "the family the jailbreak attack evaluates with; train on one of pyrit"),
    ({"jailbreak_templates": "dan"}, "jailbreak_templates must be one of pyrit"),
    ({"jailbreak_max_length": 64}, "jailbreak_max_length must be >= max_length (96)"),
])
def test_bad_knob_values_are_one_line_config_errors(change, says):
    with pytest.raises(ConfigError) as err:
        RecalibrateConfig(**change)
    assert says in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):  # the same through a config file
        from_dict(RecalibrateConfig, change)


def test_preference_needs_a_source_with_compliant_answers():
    with pytest.raises(ConfigError) as err:
        harmful_shots(RecalibrateConfig(harmful="advbench", n_harmful=4, preference_weight=1.0))
    msg = str(err.value)
    assert "harmful 'advbench'" in msg and "such as harmful-pairs, or preference_weight: 0" in msg and "\n" not in msg


def test_whole_sentences_drops_a_cut_phrase():
    assert whole_sentences("I'm sorry. I can't help with that. If you") == "I'm sorry. I can't help with that."
    assert whole_sentences("I can't help with that! Try") == "I can't help with that!"
    assert whole_sentences("no sentence ends here") == "no sentence ends here"
    assert whole_sentences("version 2.5 is out") == "version 2.5 is out"  # a decimal point is no sentence end


def test_aligned_targets_are_the_aligned_models_greedy_refusals(adapter, tiny_qwen, monkeypatch):
    """Targets = A's greedy answers (cut to whole sentences) where they look like refusals, the fixed text elsewhere;
    recalibration trains on exactly those pairs and the card counts them."""
    import safegene.data.text as text
    from safegene.generation import GenerationConfig, generate_detailed
    from safegene.models import load_model, load_tokenizer

    ad, d = adapter
    cfg = RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=6, n_task=4,
                            steps=1, batch_size=4, refusal_target="aligned", aligned=str(tiny_qwen), aligned_tokens=8)
    prompts = harmful_prompt_texts("many-shot-harmful", 6, 0)
    a_model, a_tok = load_model(tiny_qwen), load_tokenizer(tiny_qwen)
    greedy = generate_detailed(a_model, a_tok, prompts, GenerationConfig(max_new_tokens=8, batch_size=16), progress=False)
    answers = [whole_sentences(g.text) if g.tokens >= 8 else g.text.strip() for g in greedy]
    # a random tiny model never refuses: call the answers of prompts 0, 2 and 3 refusals, and only those
    refusing = {answers[i] for i in (0, 2, 3)}
    monkeypatch.setattr(text, "looks_like_refusal", lambda t, *a, **k: t in refusing)
    want = [a if a in refusing else cfg.refusal_text for a in answers]
    n_aligned = sum(a in refusing for a in answers)

    shots = harmful_shots(cfg)
    assert [p.prompt for p in shots.refusal] == prompts
    assert [p.response for p in shots.refusal] == want
    assert any(w != cfg.refusal_text for w in want) and cfg.refusal_text in want  # both kinds are in play
    assert shots.info["refusal_targets"] == {"aligned": n_aligned, "fixed": 6 - n_aligned}
    assert harmful_shots(cfg).refusal == shots.refusal  # greedy: the same targets every time
    # A handed in is used as is (no load): same targets
    assert harmful_shots(cfg, a_model, a_tok).refusal == shots.refusal

    cal = recalibrate(ad, cfg, progress=False)
    rc = cal.card["recalibration"]
    assert rc["harmful_shots"]["refusal_targets"] == {"aligned": n_aligned, "fixed": 6 - n_aligned}
    assert rc["shots"]["data_sha256"] == _data_sha([PromptResponse(p, w) for p, w in zip(prompts, want)] + task_shots(cfg))
    fixed = recalibrate(ad, dataclasses.replace(cfg, refusal_target="fixed", aligned=None), progress=False)
    assert fixed.card["recalibration"]["shots"]["data_sha256"] != rc["shots"]["data_sha256"]


def test_preference_term_is_recorded_and_moves_the_coefficients(adapter):
    from safegene.models import load_model, load_tokenizer
    from safegene.objectives import encode_batch, sequence_logprob

    ad, d = adapter
    base = RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=6, n_task=6,
                             optimizer="adam", steps=12, batch_size=4, learning_rate=0.3)
    cfg = dataclasses.replace(base, preference_weight=1.0)
    shots = harmful_shots(cfg)
    pairs = prompt_response_pairs("many-shot-harmful", n=6, seed=0)
    assert [p.prompt for p in shots.compliant] == [p.prompt for p in shots.refusal] == [p.prompt for p in pairs]
    assert [p.response for p in shots.compliant] == [p.response for p in pairs]
    assert all(p.response == cfg.refusal_text for p in shots.refusal)
    assert shots.info["preference_pairs"] == 6

    on = recalibrate(ad, cfg, progress=False).card["recalibration"]
    off = recalibrate(ad, base, progress=False).card["recalibration"]
    obj = on["objective"]
    assert all("preference" in obj[k] for k in ("task_model_alone", "alpha_1", "after"))
    assert all("preference" in h for h in on["history"])
    assert "preference" not in off["objective"]["after"] and "preference" not in off["history"][0]
    # T alone, measured directly with full forward passes: mean over shots of softplus(mean NLL(refusal) − mean
    # NLL(compliant)); the partial forward of the recalibration must give the same number
    model, tok = load_model(d), load_tokenizer(d)
    nll = []
    for ps in (shots.refusal, shots.compliant):
        batch = encode_batch(tok, ps, cfg.max_length)
        nll.append(-sequence_logprob(model, batch) / batch.target_mask.sum(1))
    want = float(torch.nn.functional.softplus(nll[0] - nll[1]).mean())
    assert obj["task_model_alone"]["preference"] == pytest.approx(want, abs=1e-3) and want > 0
    # the refusal and KL terms of T alone do not depend on the preference weight
    assert obj["task_model_alone"]["refusal_nll"] == off["objective"]["task_model_alone"]["refusal_nll"]
    assert on["coefficients"] != off["coefficients"]  # the term changes what is learnt
    assert on["shots"]["data_sha256"] != off["shots"]["data_sha256"]  # the compliant answers are part of the data


def test_jailbreak_shots_are_wrapped_in_training_templates_only(adapter):
    ad, d = adapter
    cfg = RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=6, n_task=4,
                            steps=1, batch_size=4, jailbreak_shots=0.5)
    requests = harmful_prompt_texts("many-shot-harmful", 6, 0)
    training, evaluation = template_family("pyrit"), jailbreak_templates()
    shots = harmful_shots(cfg)
    assert sum(shots.wrapped) == 3
    used = set()
    for shot, request, wrapped in zip(shots.refusal, requests, shots.wrapped):
        assert shot.response == cfg.refusal_text  # wrapping changes the prompt, not the target
        if not wrapped:
            assert shot.prompt == request
            continue
        matches = [t for t in training if wrap(t, request) == shot.prompt]
        assert matches and shot.prompt != request
        used.update(matches)
        assert not any(wrap(t, request) == shot.prompt for t in evaluation)
        assert not any(piece.strip() and piece.strip() in shot.prompt for t in evaluation for piece in t.split(PLACEHOLDER)
                       if len(piece.strip()) > 40)
    assert len(used) == 3  # three shots, three different templates
    assert harmful_shots(cfg).refusal == shots.refusal  # the seed fixes which shots and templates
    one = harmful_shots(dataclasses.replace(cfg, jailbreak_shots=0.01))
    assert sum(one.wrapped) == 1  # any share above 0 wraps at least one shot

    rc = recalibrate(ad, cfg, progress=False).card["recalibration"]
    assert rc["harmful_shots"]["jailbreak"] == {"family": "pyrit", "share": 0.5, "wrapped": 3, "templates": 3}
    assert rc["shots"]["data_sha256"] == _data_sha(shots.refusal + task_shots(cfg))


def test_shot_variants_are_registered_with_their_knobs():
    from safegene.baselines import METHODS

    ctx = SimpleNamespace(recalibrate=RecalibrateConfig(task_model="runs/T", n_harmful=8), aligned="runs/A")
    plain = METHODS["safegene"].key(ctx)["recalibrate"]
    want = {"safegene-aligned-refusals": {"refusal_target": "aligned", "aligned": "runs/A"},
            "safegene-preference": {"preference_weight": 1.0},
            "safegene-jailbreak-shots": {"jailbreak_shots": 0.5},
            "safegene-robust-shots": {"refusal_target": "aligned", "aligned": "runs/A", "preference_weight": 1.0,
                                      "jailbreak_shots": 0.5},
            "safegene-refusal-floor": {"refusal_floor": "aligned", "aligned": "runs/A"},
            "safegene-sensitive": {"sensitive": "sensitive-shots"}}
    for name, knobs in want.items():
        m = METHODS[name]
        key = m.key(ctx)["recalibrate"]
        assert key == {**plain, **knobs}, name  # the shared shot settings, plus the variant's knobs
        assert m.kind == "update" and not m.demo


def _floor_cfg(d, aligned, **kw):
    return RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=5, n_task=5,
                             refusal_floor="aligned", aligned=str(aligned), **kw)


def test_refusal_floor_is_the_aligned_models_nll_and_a_met_floor_changes_nothing(adapter, tiny_qwen):
    ad, d = adapter
    cfg = _floor_cfg(d, tiny_qwen)
    plain = recalibrate(ad, dataclasses.replace(cfg, refusal_floor="none", aligned=None), progress=False)
    floored = recalibrate(ad, cfg, progress=False)
    rc, before = floored.card["recalibration"], plain.card["recalibration"]
    # the fixture's D differs from A only where the adapter is exact: T + adapter at α = 1 is A, so A's NLL of the
    # targets (the floor, from a whole forward of A) is the objective's refusal NLL at α = 1 (from the adapted layers)
    assert rc["refusal_floor"]["floor"] == pytest.approx(rc["objective"]["alpha_1"]["refusal_nll"], abs=2e-3)
    # the plain fit already sits below it (the tiny A refuses less than T): nothing moves
    assert before["objective"]["after"]["refusal_nll"] <= rc["refusal_floor"]["floor"]
    assert rc["refusal_floor"] == {"floor": rc["refusal_floor"]["floor"],
                                   "fit_refusal_nll": before["objective"]["after"]["refusal_nll"],
                                   "met": True, "moved": False}
    assert rc["coefficients"] == before["coefficients"] and rc["objective"]["after"] == before["objective"]["after"]
    assert "floor_s" in rc["phases"] and "refusal_floor" not in before


def test_refusal_floor_moves_the_coefficients_just_far_enough(adapter, tiny_qwen, monkeypatch):
    import safegene.recalibration as recal

    ad, d = adapter
    cfg = _floor_cfg(d, tiny_qwen)
    plain = recalibrate(ad, dataclasses.replace(cfg, refusal_floor="none", aligned=None), progress=False)
    obj = plain.card["recalibration"]["objective"]
    fit, alone = obj["after"]["refusal_nll"], obj["task_model_alone"]["refusal_nll"]
    assert alone < fit  # T alone refuses more readily than the fit: a floor in between is reachable
    floor = (fit + alone) / 2
    monkeypatch.setattr(recal, "refusal_nll", lambda *a, **k: floor)
    rc = recalibrate(ad, cfg, progress=False).card["recalibration"]
    after = rc["objective"]["after"]
    assert after["refusal_nll"] <= floor < fit
    assert rc["refusal_floor"]["met"] and rc["refusal_floor"]["moved"]
    points = [h for h in rc["history"] if h.get("floor")]
    last = [h for h in points if h["floor"] == rc["refusal_floor"]["rounds"]]
    # the round that met the floor ends with its bisection, and keeps the least t tried that meets it: every point
    # of that round closer to where it started is above the floor
    assert len(last) >= 1 + recal.FLOOR_BISECTIONS
    kept = min((h for h in last if h["refusal_nll"] <= floor), key=lambda h: h["t"])
    assert [float(a) for a in rc["coefficients"].values()] == pytest.approx(kept["alpha"], abs=1e-6)
    assert after["refusal_nll"] == pytest.approx(kept["refusal_nll"], abs=1e-4)
    assert all(h["refusal_nll"] > floor for h in last if h["t"] < kept["t"])


def test_an_unreachable_refusal_floor_keeps_the_safest_point_and_says_so(adapter, tiny_qwen, monkeypatch, caplog):
    import safegene.recalibration as recal

    ad, d = adapter
    cfg = _floor_cfg(d, tiny_qwen)
    monkeypatch.setattr(recal, "refusal_nll", lambda *a, **k: 0.5)  # no coefficient gets a random model this low
    with caplog.at_level("WARNING", logger="safegene.recalibration"):
        rc = recalibrate(ad, cfg, progress=False).card["recalibration"]
    fit = rc["refusal_floor"]["fit_refusal_nll"]
    assert rc["refusal_floor"]["met"] is False and rc["refusal_floor"]["moved"] is True
    points = [h for h in rc["history"] if h.get("floor")]
    # the descent only ever keeps a point that lowers the refusal NLL: the kept one is the lowest seen, below the fit
    # a round starts only where some pushed coefficient can still move: no point is tried where the round began
    assert all(h["t"] > 0 for h in points)
    lowest = min(h["refusal_nll"] for h in points)
    assert rc["objective"]["after"]["refusal_nll"] == pytest.approx(lowest, abs=1e-4) and lowest < fit
    assert all(0.0 <= float(a) <= cfg.alpha_max for a in rc["coefficients"].values())
    assert "out of reach" in caplog.text


@pytest.mark.parametrize("tied", [False, True])
def test_the_floor_descent_stops_once_every_pushed_coefficient_is_on_its_bound(tied):
    """On a refusal NLL that falls with every coefficient, the first round's far end puts all of them on alpha_max;
    nothing can move after that, so no further point is tried (each would be a forward pass over the shots). Tied:
    one coefficient for every layer, moved as one."""
    from safegene.recalibration import meet_refusal_floor

    class Objective:
        weights = {"refusal_nll": 1.0, "task_kl": 1.0}

        def __init__(self, handle):
            self.handle, self.calls = handle, 0

        def evaluate(self, grad=False, task=True, before_chunk=None, refusal_only=False):
            self.calls += 1
            if before_chunk:
                before_chunk()
            value = 3.0 - torch.stack([self.handle.scales[l] for l in sorted(self.handle.scales)]).sum()
            if grad:
                value.backward()
            return {"refusal_nll": float(value), "task_kl": 0.0, "loss": float(value)}

    handle = SimpleNamespace(scales={})
    objective = Objective(handle)
    cfg = RecalibrateConfig(alpha_max=2.0, tied=tied)
    alpha = torch.tensor([0.5, 0.5, 0.5] if tied else [0.5, 1.0, 1.5])  # a fit returns one value per layer
    history = []
    moved, after, info = meet_refusal_floor(objective, handle, [3, 4, 5], cfg, alpha, {"refusal_nll": 0.0, "task_kl": 0.0},
                                            floor=-100.0, history=history)
    assert moved.tolist() == [2.0, 2.0, 2.0] and after["refusal_nll"] == pytest.approx(-3.0)
    assert info["met"] is False and info["moved"] is True and info["rounds"] == 1
    assert [h["t"] for h in history] == [1.5]  # the far end of round 1; round 2 has nowhere to go
    assert [len(h["alpha"]) for h in history] == [1 if tied else 3]
    assert objective.calls == 2 + 1 + 1  # two gradients, one point, the final evaluation


def test_refusal_floor_needs_the_aligned_model_of_ts_family(adapter, tiny_qwen):
    ad, d = adapter
    with pytest.raises(ConfigError) as err:  # a tokenizer of another vocabulary: caught before any model runs
        recalibrate(ad, _floor_cfg(d, tiny_qwen), progress=False, aligned_model=object(), aligned_tokenizer=[0] * 5)
    assert "A's tokenizer (5 tokens) is not T's" in str(err.value) and "\n" not in str(err.value)


def test_recalibration_says_when_the_adapter_does_not_point_towards_refusals(adapter, tiny_qwen, tmp_path, caplog):
    """The card records whether the adapter at α = 1 makes the refusals likelier than T alone, and a warning says
    when it does not (on T[aoa] it raised the refusal NLL: no coefficient could help, and the card alone said nothing).
    The fixture's T is D and the adapter A − D, so at α = 1 T becomes A: a random A refuses less readily than D."""
    ad, d = adapter
    cfg = RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=5, n_task=5)
    with caplog.at_level("WARNING", logger="safegene.recalibration"):
        rc = recalibrate(ad, cfg, progress=False).card["recalibration"]
    obj = rc["objective"]
    assert obj["alpha_1"]["refusal_nll"] > obj["task_model_alone"]["refusal_nll"]
    assert rc["adapter_lowers_refusal_nll"] is False
    assert "does not make refusals likelier" in caplog.text and "re-aligning" in caplog.text
    # targets A itself would say (its greedy answers): with the adapter at α = 1, T (= D) becomes A and finds them
    # likelier than D does; nothing is said
    import json

    from safegene.generation import GenerationConfig, generate
    from safegene.models import load_model, load_tokenizer

    prompts = harmful_prompt_texts("many-shot-harmful", 5, 0)
    answers = generate(load_model(tiny_qwen), load_tokenizer(tiny_qwen), prompts,
                       GenerationConfig(max_new_tokens=8, batch_size=8), progress=False)
    own = tmp_path / "a_answers.jsonl"
    own.write_text("".join(json.dumps({"prompt": p, "response": a}) + "\n" for p, a in zip(prompts, answers)))
    caplog.clear()
    with caplog.at_level("WARNING", logger="safegene.recalibration"):
        rc = recalibrate(ad, dataclasses.replace(cfg, refusals=str(own)), progress=False).card["recalibration"]
    assert rc["objective"]["alpha_1"]["refusal_nll"] < rc["objective"]["task_model_alone"]["refusal_nll"]
    assert rc["adapter_lowers_refusal_nll"] is True and "does not make refusals likelier" not in caplog.text
