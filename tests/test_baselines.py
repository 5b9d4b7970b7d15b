"""Baselines: Safe LoRA and SafeMERGE against dense computations, RESTA's tied coefficient, re-align factors."""

import pytest
import torch

from safegene.adapter import SafetyAdapter
from safegene.baselines import realign, resta, safe_lora, safemerge, subspace_cosines, task_update
from safegene.baselines.projection import ProjectionBaselineConfig, treated_modules
from safegene.baselines.realign import lora_factors
from safegene.recalibration import RecalibrateConfig
from safegene.training import LoraTrainConfig
from safegene.errors import ConfigError
from safegene.models import load_model, load_tokenizer

MODS = [f"model.layers.{l}.{m}" for l in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")]


def _adapter(seed: int, rank: int, out: int = 12, inp: int = 10) -> SafetyAdapter:
    g = torch.Generator().manual_seed(seed)
    return SafetyAdapter({m: (torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)) for m in MODS})


def _dense(ad: SafetyAdapter, m: str) -> torch.Tensor:
    return ad.delta(m) if m in ad.factors else torch.zeros(12, 10)


def test_subspace_cosine_matches_dense_projection():
    safety, update = _adapter(0, 2), _adapter(1, 3)
    cos = subspace_cosines(update, safety)
    for m in MODS:
        q, _ = torch.linalg.qr(safety.factors[m][1])
        dw = update.delta(m)
        assert cos[m] == pytest.approx(float((q @ q.T @ dw).norm() / dw.norm()), rel=1e-5)
    # an update inside the safety subspace has cos 1
    inside = SafetyAdapter({m: (torch.randn(2, 10), safety.factors[m][1] @ torch.randn(2, 2)) for m in MODS})
    assert min(subspace_cosines(inside, safety).values()) == pytest.approx(1.0, abs=1e-5)


def test_safe_lora_keeps_only_the_projection_in_treated_modules():
    safety, update = _adapter(0, 2), _adapter(1, 3)
    cfg = ProjectionBaselineConfig(fraction=0.5)
    change = safe_lora(update, safety, cfg)
    cos = subspace_cosines(update, safety)
    treated = treated_modules(cos, cfg)
    assert len(treated) == 3 and set(change.factors) == set(treated)
    assert max(cos[m] for m in treated) <= min(cos[m] for m in MODS if m not in treated)
    for m in MODS:
        q, _ = torch.linalg.qr(safety.factors[m][1])
        after = update.delta(m) + _dense(change, m)  # T's update once the change is added
        want = q @ q.T @ update.delta(m) if m in treated else update.delta(m)
        assert torch.allclose(after, want, atol=1e-4)
    assert change.card["n_treated"] == 3 and change.card["baseline"] == "safe-lora"
    every = safe_lora(update, safety, ProjectionBaselineConfig(threshold=1.0))
    assert len(every.factors) == len(MODS)


def test_safemerge_merges_task_and_safety_updates():
    safety, update = _adapter(0, 2), _adapter(1, 3)
    change = safemerge(update, safety, ProjectionBaselineConfig(fraction=1.0, merge_weight=0.25))
    for m in MODS:
        after = update.delta(m) + change.delta(m)
        assert torch.allclose(after, 0.75 * update.delta(m) + 0.25 * safety.delta(m), atol=1e-4)


def test_projection_config_validates():
    with pytest.raises(ConfigError, match="fraction"):
        ProjectionBaselineConfig(fraction=0)
    with pytest.raises(ConfigError, match="merge_weight"):
        ProjectionBaselineConfig(merge_weight=1.5)


def _lora_task_model(tiny_qwen, tmp_path):
    from safegene.training import FinetuneConfig
    from safegene.training import finetune

    out = tmp_path / "T"
    finetune(FinetuneConfig(model=str(tiny_qwen), task="arithmetic", n_examples=8, poison_ratio=0.0, save="adapter",
                            output=str(out), train=LoraTrainConfig(max_steps=2, batch_size=4, rank=2, alpha=4)),
             progress=False)
    return out


def test_task_update_of_peft_folder_equals_weight_difference(tiny_qwen, tmp_path):
    t_ref = _lora_task_model(tiny_qwen, tmp_path)
    upd = task_update(str(t_ref), str(tiny_qwen))
    base, t = load_model(str(tiny_qwen)), load_model(str(t_ref))
    wb, wt = dict(base.named_parameters()), dict(t.named_parameters())
    for m in upd.modules():
        assert torch.allclose(upd.delta(m), wt[f"{m}.weight"] - wb[f"{m}.weight"], atol=1e-5), m


def test_resta_learns_one_shared_coefficient(tiny_qwen, tmp_path):
    from test_adapter import make_degraded

    from safegene.adapter import extract_adapter
    from safegene.adapter.extract import ExtractConfig

    d = tmp_path / "D"
    make_degraded(tiny_qwen, d, layers=(0, 1), modules=("q_proj", "down_proj"))
    ad = extract_adapter(ExtractConfig(aligned=str(tiny_qwen), degraded=str(d), output=str(tmp_path / "ad"), rank=2),
                         progress=False, save=False).select([1])
    cfg = RecalibrateConfig(task_model=str(d), task="arithmetic", n_harmful=4, n_task=4, steps=3, batch_size=4)
    out = resta(ad, cfg, progress=False)
    assert out.layers == [0, 1]  # the whole vector, whatever the selection was
    vals = [out.coefficients[l] for l in out.layers]
    assert vals[0] == pytest.approx(vals[1]) and vals[0] != pytest.approx(1.0)
    assert out.card["recalibration"]["config"]["tied"] is True


def test_realign_returns_the_trained_lora_as_an_update(tiny_qwen, tmp_path):
    cfg = RecalibrateConfig(task_model=str(tiny_qwen), task="arithmetic", harmful="many-shot-harmful",
                            n_harmful=4, n_task=4)
    upd = realign(str(tiny_qwen), cfg, LoraTrainConfig(max_steps=3, batch_size=4, rank=2, learning_rate=5e-3),
                  progress=False)
    assert len(upd.factors) == 2 * 7 and upd.card["shots"] == 8 and upd.card["seconds"] > 0
    assert upd.layer_norms()[0] > 0  # B starts at zero: a non-zero update means training happened
    # the factors are what PEFT would merge: attaching them reproduces a merged PEFT model
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_qwen))
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    f = lora_factors(pm)
    assert set(f) == {f"model.layers.{l}.self_attn.q_proj" for l in range(2)}
    tok = load_tokenizer(str(tiny_qwen))
    ids = tok("What is 12 + 7?", return_tensors="pt")
    with torch.no_grad():
        want = pm(**ids).logits
        merged = pm.merge_and_unload()
        fresh = load_model(str(tiny_qwen))
        with SafetyAdapter(f).attach(fresh, check=False):
            got = fresh(**ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(merged(**ids).logits, want, atol=1e-4)


# --- inference-time competitors -------------------------------------------------------------------------------

class _KeywordGuard:
    """Flags prompts and responses that contain 'bomb' (graded score: 1 or 0)."""

    name = "keyword"

    def __init__(self):
        self.calls = []

    def screen_prompts(self, prompts, threshold=None):
        from safegene.evaluation.judges import Verdict

        self.calls.append(("prompts", list(prompts)))
        t = 0.5 if threshold is None else threshold
        return [Verdict(("bomb" in p) > t, "kw", float("bomb" in p)) for p in prompts]

    def judge_batch(self, prompts, responses):
        from safegene.evaluation.judges import Verdict

        self.calls.append(("responses", list(responses)))
        return [Verdict("bomb" in r, "kw", float("bomb" in r)) for r in responses]


def test_classifier_guard_refuses_flagged_prompts_without_generating(tiny_qwen):
    from safegene.baselines import ClassifierGuard
    from safegene.baselines.classifier_guard import ClassifierGuardConfig
    from safegene.generation import GenerationConfig
    from safegene.generation import generate_detailed

    model, tok = load_model(str(tiny_qwen)), load_tokenizer(str(tiny_qwen))
    guard = _KeywordGuard()
    responder = ClassifierGuard(guard, ClassifierGuardConfig(refusal_text="NO."))
    prompts = ["how to build a bomb", "what is 2 + 2", [{"role": "user", "content": "a bomb, please"}]]
    gen = GenerationConfig(max_new_tokens=4, batch_size=4)
    out = responder(model, tok, prompts, gen, progress=False)
    assert out[0].text == "NO." and out[0].tokens == 0 and out[0].meta["flag"] == "prompt"
    assert out[2].meta["flag"] == "prompt"  # the user turn of a conversation is what gets screened
    plain = generate_detailed(model, tok, prompts[1:2], gen, progress=False)[0]
    assert out[1].text == plain.text and out[1].tokens == plain.tokens and out[1].meta["flag"] is None
    assert out[1].seconds > out[1].meta["guard_seconds"] >= 0 and out[0].seconds == pytest.approx(out[0].meta["guard_seconds"], abs=1e-5)
    assert guard.calls[0] == ("prompts", ["how to build a bomb", "what is 2 + 2", "a bomb, please"])
    assert guard.calls[1] == ("responses", [plain.text])  # only the one generated response is screened

    # a response threshold above every score lets all responses through; responses only: no prompt screening
    lenient = ClassifierGuard(guard, ClassifierGuardConfig(screen_prompts=False, response_threshold=2.0))
    assert [o.meta["flag"] for o in lenient(model, tok, prompts, gen, progress=False)] == [None, None, None]

    with pytest.raises(ConfigError, match="cannot screen prompts"):
        ClassifierGuard(object(), ClassifierGuardConfig())


def test_guard_threshold_is_fitted_between_harmful_and_benign_scores():
    from safegene.baselines import ClassifierGuard
    from safegene.baselines.classifier_guard import best_threshold

    t, acc = best_threshold([2.0, 3.0, 1.5], [-1.0, 0.0, 1.0])
    assert acc == 1.0 and t == pytest.approx(1.25)
    t, acc = best_threshold([2.0, 3.0, -0.5], [-1.0, 0.0, 1.0])  # overlap: the best cut misses one harmful
    assert acc == pytest.approx(5 / 6) and t == pytest.approx(1.5)
    assert best_threshold([1.0, 2.0], [-2.0, -1.0]) == (0.0, 1.0)
    g = ClassifierGuard(_KeywordGuard())
    fit = g.fit_prompt_threshold(["a bomb", "bomb it"], ["hi", "hello"])
    assert fit["balanced_accuracy"] == 1.0 and 0.0 <= g.prompt_threshold < 1.0


def test_self_critique_revises_only_flagged_drafts(tiny_qwen, monkeypatch):
    import safegene.baselines.self_critique as sc
    from safegene.baselines.self_critique import SelfCritiqueConfig
    from safegene.generation import GenerationConfig
    from safegene.generation import Generated

    calls = []

    def fake_generate(model, tok, prompts, cfg, progress=True, desc=""):
        calls.append((desc, [p if isinstance(p, str) else [m["role"] for m in p] for p in prompts], cfg.max_new_tokens))
        if desc.endswith("(draft)"):
            return [Generated(f"draft {i}", 5, 0.5) for i in range(len(prompts))]
        if desc.endswith("(critique)"):  # the first draft breaks a principle, the second does not
            return [Generated(t, 2, 0.1) for t in ["Yes, it does.", "No."][: len(prompts)]]
        return [Generated("I can't help with that.", 7, 0.7) for _ in prompts]

    monkeypatch.setattr(sc, "generate_detailed", fake_generate)
    out = sc.SelfCritique(SelfCritiqueConfig(critique_tokens=3))(None, None, ["bad", "good"],
                                                                 GenerationConfig(max_new_tokens=9), progress=False)
    assert [o.text for o in out] == ["I can't help with that.", "draft 1"]
    assert [o.tokens for o in out] == [5 + 2 + 7, 5 + 2] and out[0].seconds == pytest.approx(1.3)
    assert out[0].meta == {"draft": "draft 0", "critique": "Yes, it does.", "revised": True}
    (d, _, d_tok), (c, c_roles, c_tok), (r, r_roles, r_tok) = calls
    assert d_tok == 9 and c_tok == 3 and r_tok == 9
    assert c_roles == [["user", "assistant", "user"]] * 2  # the critique continues the conversation
    assert r_roles == [["system", "user"]]  # the revision answers afresh under the principles, flagged draft only
    assert sc.critique_flags("**Yes** - it breaks rule 1") and not sc.critique_flags("Not really; yes-men aside")
