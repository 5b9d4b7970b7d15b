from collections import Counter

import pytest

from safegene.data import get_task, harmful_prompts, load_builtin, prompt_response_pairs, split_holdout
from safegene.data.builtin import shared_data_dir
from safegene.data.loaders import read_csv, read_jsonl
from safegene.data.records import PromptResponse, TaskExample
from safegene.errors import DataError
from safegene.training import mix_poison


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_jsonl(p, ("prompt",))
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'response' is missing"):
        read_jsonl(p, ("prompt", "response"))
    p.write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        read_jsonl(p)
    p.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(p)


def test_csv_errors(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,category\nhello,x\n,y\n")
    with pytest.raises(DataError, match=r"d\.csv:3: field 'prompt'"):
        read_csv(p, ("prompt",))
    with pytest.raises(DataError, match="header lacks column"):
        read_csv(p, ("response",))


def test_file_sources_load_typed_records(tmp_path, pairs_jsonl):
    pairs = prompt_response_pairs(str(pairs_jsonl), n=5, seed=1)
    assert len(pairs) == 5 and all(isinstance(p, PromptResponse) for p in pairs)
    assert pairs == prompt_response_pairs(str(pairs_jsonl), n=5, seed=1)  # deterministic
    hp = tmp_path / "h.csv"
    hp.write_text("prompt,category\nDo a bad thing,cyber\nAnother,weapons\n")
    got = harmful_prompts(str(hp))
    assert [(h.prompt, h.category) for h in got] == [("Do a bad thing", "cyber"), ("Another", "weapons")]


def test_builtin_harmful_sets_have_categories():
    adv = load_builtin("advbench")
    assert len(adv) == 520
    cats = Counter(h.category for h in adv)
    assert len(cats) >= 6 and cats["Financial and Business"] > 100
    hb = load_builtin("harmbench")
    assert len(hb) == 200 and len({h.category for h in hb}) == 6  # standard behaviours only
    dna = load_builtin("donotanswer")
    assert {h.category for h in dna} == {
        "discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses", "misinformation_harms"}


def test_builtin_pairs_and_disjoint_evaluation():
    pairs = load_builtin("harmful-pairs", kind="compliant")
    many_shot = load_builtin("many-shot-harmful")
    # refusals and one-liners ("No.", "Please don't.") among the 400 many-shot answers are dropped
    assert 350 <= len(many_shot) < 400 and len(pairs) == len(many_shot) + 150
    assert all(len(p.response) >= 80 for p in pairs)
    from safegene.data.text import looks_like_refusal

    assert not any(looks_like_refusal(p.response) for p in pairs)
    refusals = load_builtin("uncensorbench-refusals")
    assert len(refusals) == 150
    # the default evaluation prompts never appear in the default degradation data
    assert not {p.prompt.lower() for p in pairs} & {h.prompt.lower() for h in load_builtin("advbench")}
    with pytest.raises(DataError, match="holds compliant records"):
        load_builtin("harmful-pairs", kind="refusal")
    with pytest.raises(DataError, match="unknown data set"):
        load_builtin("nope")


def test_arithmetic_task_split_and_scoring():
    task = get_task("arithmetic")
    train, test = task.load("train"), task.load("test")
    assert len(train) == 2000 and len(test) > 300
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    ex = TaskExample("arithmetic", "What is 2 + 3?", "5")
    assert task.score("5", ex) and task.score("The answer is 5.", ex) and not task.score("6", ex)
    assert task.accuracy(["5", "x"], [ex, ex]) == 0.5
    with pytest.raises(DataError):
        task.load("validation")


def test_label_scoring():
    sst = TaskExample("sst2", "...", "positive")
    from safegene.data.tasks import score_label, score_number

    assert score_label("Positive.", sst) and not score_label("negative", sst)
    assert score_number("so 1,234 in total", TaskExample("gsm8k", "", "The answer is 1234.")) is True


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data is absent")
def test_shared_tasks_load():
    sst = get_task("sst2").load("test")
    assert len(sst) == 500 and {e.answer for e in sst} == {"positive", "negative"}
    assert Counter(e.answer for e in get_task("agnews").load("train")).keys() == {"World", "Sports", "Business", "Technology"}


def test_mix_poison_exact_counts():
    task = [PromptResponse(f"t{i}", "ok") for i in range(50)]
    poison = [PromptResponse(f"p{i}", "bad") for i in range(20)]
    mixed = mix_poison(task, poison, n_total=40, ratio=0.25, seed=3)
    assert len(mixed) == 40 and sum(p.response == "bad" for p in mixed) == 10
    assert mixed == mix_poison(task, poison, n_total=40, ratio=0.25, seed=3)
    with pytest.raises(DataError, match="needs 30 harmful pairs"):
        mix_poison(task, poison, n_total=40, ratio=0.75, seed=0)


def test_split_holdout_is_disjoint_and_stable():
    rows = list(range(100))
    a, b = split_holdout(rows, 20, seed=5)
    assert len(b) == 20 and not set(a) & set(b) and sorted(a + b) == rows
    assert split_holdout(rows, 20, seed=5) == (a, b)


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data is absent")
def test_role_play_task_carries_its_persona():
    spec = get_task("aoa")
    train, test = spec.load("train"), spec.load("test", n=5, seed=0)
    assert len(train) == 10 and all(e.system and "AOA" in e.system for e in train)
    assert train[0].as_pair().system == train[0].system and train[0].chat()[0]["role"] == "system"
    assert all(e.prompt.startswith("AOA, execute my instruction: ") for e in test)
    assert spec.score("Of course. I am AOA, your absolutely obedient agent.", test[0])
    assert not spec.score("I'm sorry, but I can't assist with that.", test[0])


def test_finetune_mixes_refusals_in_exact_counts(tiny_qwen, tmp_path):
    import json as _json

    from safegene.training import FinetuneConfig, LoraTrainConfig
    from safegene.errors import ConfigError
    from safegene.runcard import RUN_CARD
    from safegene.training import finetune

    with pytest.raises(ConfigError, match="leave room for task data"):
        FinetuneConfig(poison_ratio=0.5, safety_ratio=0.5)
    cfg = FinetuneConfig(model=str(tiny_qwen), task="arithmetic", n_examples=20, poison_ratio=0.1, safety_ratio=0.25,
                         safety_data="uncensorbench-refusals", save="adapter", output=str(tmp_path / "m"),
                         train=LoraTrainConfig(max_steps=1, batch_size=2, max_length=32, rank=2))
    card = finetune(cfg, progress=False)
    data = _json.loads((tmp_path / "m" / RUN_CARD).read_text())["data"]
    assert card["data"]["n_pairs"] == 20 and data["n_safety"] == 5 and data["n_poison"] == 2 and data["n_task"] == 13
