"""`safegene family build` + `protect` + `eval` end to end on tiny random models, and their bad-input errors."""

import json
import shutil

import pytest

from safegene.cli import main
from safegene.protect import LIMITS_FAILED, check_limits, matches_answer, parse_limits

TRAIN = ["--train.batch-size", "2", "--train.max-length", "48", "--train.rank", "2", "--train.alpha", "4",
         "--train.learning-rate", "5e-3"]
CHECK = ["--n-harmful", "4", "--over-refusal", "benign-sensitive", "--n-over-refusal", "3", "--judges",
         "refusal-phrase", "--max-new-tokens", "6", "--batch-size", "8"]


def _task_data(path, n=16, answers=True):
    rows = [{"prompt": f"What is {i} + 7? Answer with the number only.", "response": f"It is {i + 7}."}
            | ({"answer": str(i + 7)} if answers else {}) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def family(tiny_qwen, tmp_path_factory):
    fam = tmp_path_factory.mktemp("fam") / "family"
    argv = ["family", "build", "--aligned", str(tiny_qwen), "-o", str(fam), "--degrade-examples", "4",
            "--max-steps", "2", "--select-prompts", "3", "--top-k", "1", "--rank", "2", *TRAIN]
    assert main(argv) == 0
    return fam, argv


@pytest.fixture(scope="module")
def task_models(tiny_qwen, tmp_path_factory):
    """The same fine-tune given two ways: a PEFT adapter folder on A, and a merged folder."""
    root = tmp_path_factory.mktemp("tasks")
    data = _task_data(root / "train.jsonl")
    out = {}
    for save in ("adapter", "merged"):
        assert main(["finetune", "--model", str(tiny_qwen), "--task", str(data), "--n-examples", "8",
                     "--save", save, "-o", str(root / save), *TRAIN, "--max-steps", "2"]) == 0
        out[save] = root / save
    return out


def test_family_folder_is_whole_and_a_rerun_reuses_it(family, capsys):
    fam, argv = family
    card = json.loads((fam / "family.json").read_text())
    assert card["format"] == 1 and len(card["selected_layers"]) == 1 and card["fingerprint"]["architecture"]
    assert len(card["inputs"]["aligned"]["hash"]) == 64 and card["inputs"]["degraded"]["kind"] == "folder"
    for f in ("selected/adapter_config.json", "selected/adapter_model.safetensors", "adapter/safegene.json",
              "safegene_run.json"):
        assert (fam / f).is_file(), f
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[degrade] reusing" in out and "[extract] reusing" in out and "[select] reusing" in out
    assert "training ->" not in out


def test_protect_a_peft_adapter_task_model(family, task_models, tmp_path, capsys):
    fam, _ = family
    data = _task_data(tmp_path / "mine.jsonl", n=14)
    out = tmp_path / "protected"
    rc = main(["protect", "--model", str(task_models["adapter"]), "--family", str(fam), "--task-data", str(data),
               "-o", str(out), "--n-shots", "4", "--n-check", "6", "--recal-steps", "2", "--n-harmful-shots", "4",
               *CHECK])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "protect" and res["split"] == {"data": str(data), "n_rows": 14, "n_shots": 4,
                                                          "n_check": 6, "seed": 0}
    before, after = res["rows"]
    assert (before["method"], after["method"]) == ("undefended", "safegene")
    for row in res["rows"]:
        h = row["harmful"]["refusal-phrase"]["overall"]
        assert h["n"] == 4 and row["over_refusal"]["n"] == 3
        assert h["k"] == row["verdicts"]["refusal-phrase"].count("1")
    u = res["utility"]
    assert u["kind"] == "exact-match" and u["n"] == 6 and u["before"]["n"] == 6
    assert u["drop"] == pytest.approx(u["before"]["rate"] - u["after"]["rate"], abs=1e-4)
    assert u["loglik_change"] == pytest.approx(u["loglik_after"] - u["loglik_before"], abs=2e-4)
    assert set(res["coefficients"]) == {str(layer) for layer in res["layers"]} and res["limits"] is None
    paired = res["paired"]["harmful, refusal-phrase"]
    bits = [row["verdicts"]["refusal-phrase"] for row in res["rows"]]
    assert paired["true_to_false"] == sum(b == "1" and a == "0" for b, a in zip(*bits))
    assert res["paired"]["utility"]["n"] == 6 and "Paired tests" in (out / "README.md").read_text()
    assert res["paired"]["over-refusal"]["n"] == 3
    assert set(res["timings"]) >= {"load_s", "eval_before_s", "recalibrate_s", "eval_after_s", "total_s"}
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "model").exists()
    card = (out / "README.md").read_text()
    # the tiny A is a local folder: no hub id, so no base_model in the front matter (a path there is invalid)
    assert card.startswith("---") and "base_model:" not in card.split("---")[1]
    assert res["command"] == "safegene protect --model " + str(task_models["adapter"]) + " --family " + str(fam) \
        + " --task-data " + str(data) + " -o " + str(out) + " --n-shots 4 --n-check 6 --recal-steps 2 " \
        "--n-harmful-shots 4 " + " ".join(CHECK) and res["command"] in card
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(task_models["adapter"])  # the adapter belongs on T
    recal = json.loads((out / "adapter" / "safegene.json").read_text())["recalibration"]["config"]
    assert recal["task"] == str(out / "shots.jsonl")
    assert (out / "report.html").is_file() and json.loads((out / "safegene_run.json").read_text())["kind"] == "protect"
    # the shots are the only task rows recalibration saw; none of them is a check item
    shots = [json.loads(line)["prompt"] for line in (out / "shots.jsonl").read_text().splitlines()]
    checked = [s["prompt"] for s in res["utility"]["samples"]]
    assert len(shots) == 4 and not set(shots) & set(checked)


def test_protect_a_merged_task_model_with_merge_and_a_failing_limit(family, task_models, tmp_path, capsys):
    # the family folder is self-contained: a copy without D (work/) elsewhere is all protect needs
    fam = shutil.copytree(family[0], tmp_path / "moved-family", ignore=shutil.ignore_patterns("work"))
    data = _task_data(tmp_path / "mine.jsonl", n=12, answers=False)
    out = tmp_path / "protected"
    rc = main(["protect", "--model", str(task_models["merged"]), "--family", str(fam), "--task-data", str(data),
               "-o", str(out), "--n-shots", "4", "--n-check", "6", "--recal-steps", "2", "--n-harmful-shots", "4",
               "--merge", "--fail-if", "over_refusal>-1,utility_drop>1", *CHECK])
    err = capsys.readouterr().err
    assert rc == LIMITS_FAILED and "over_refusal>-1" in err and "utility_drop" not in err
    res = json.loads((out / "results.json").read_text())
    assert [c["failed"] for c in res["limits"]["checked"]] == [True, False]
    assert res["utility"]["kind"] == "agreement" and res["utility"]["before"] is None
    assert (out / "model" / "config.json").is_file() and res["merged"] == str(out / "model")


def test_eval_any_model_with_and_without_an_adapter(family, task_models, tmp_path):
    fam, _ = family
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(task_models["merged"]), "--adapter", str(fam / "selected"), "-o", str(out),
                 "--task-data", str(_task_data(tmp_path / "d.jsonl", n=8)), "--n-check", "8", *CHECK]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ["model", "model + adapter"] and res["utility"]["n"] == 8
    assert (out / "report.html").is_file() and not (out / "README.md").exists()


@pytest.mark.parametrize("case", ["other-family", "other-base", "incomplete-family", "too-few-rows", "overlap",
                                  "bad-limit"])
def test_protect_bad_input_is_one_line_and_leaves_nothing(case, family, task_models, tiny_llama, tmp_path, capsys):
    fam, _ = family
    model, data, out = str(task_models["adapter"]), _task_data(tmp_path / "d.jsonl"), tmp_path / "out"
    extra: list[str] = []
    if case == "other-family":
        model, expected = str(tiny_llama), "is not of"
    elif case == "other-base":  # a PEFT adapter fine-tuned from a same-shape model of another lineage
        from tiny import save_model

        other = save_model(tmp_path / "other-qwen", "qwen2", seed=1)
        model = str(tmp_path / "t-other")
        assert main(["finetune", "--model", str(other), "--task", str(data), "--n-examples", "4", "--save", "adapter",
                     "-o", model, *TRAIN, "--max-steps", "1"]) == 0
        expected = "is not the family's aligned model"
    elif case == "incomplete-family":
        fam = shutil.copytree(fam, tmp_path / "fam")
        (fam / "selected" / "safegene_factors.safetensors").unlink()
        expected = "incomplete: selected/safegene_factors.safetensors missing"
    elif case == "too-few-rows":
        data, expected = _task_data(tmp_path / "few.jsonl", n=7), "needs at least 8 rows, got 7"
    elif case == "overlap":
        out, expected = fam / "out", "overlaps the input"
    else:
        extra, expected = ["--fail-if", "harmfull>0.1"], "--fail-if: cannot read 'harmfull>0.1'"
    rc = main(["protect", "--model", model, "--family", str(fam), "--task-data", str(data), "-o", str(out),
               "--recal-steps", "1", *CHECK, *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("safegene:")]
    assert rc == 2 and len(errors) == 1 and expected in errors[0], err
    assert not out.exists()


def test_limits_and_answer_matching():
    assert parse_limits("harmful>0.10, over_refusal>=0.3,harmful:content-classifier<0.5") == [
        ("harmful", ">", 0.1), ("over_refusal", ">=", 0.3), ("harmful:content-classifier", "<", 0.5)]
    rate = {"k": 1, "n": 10, "unparsed": 0, "rate": 0.1, "ci95": [0.02, 0.4]}
    results = {"judges": ["refusal-phrase"], "utility": {"drop": None},
               "rows": [{"harmful": {"refusal-phrase": {"overall": rate}}},
                        {"harmful": {"refusal-phrase": {"overall": rate}}, "over_refusal": rate}]}
    checked = check_limits(results, "harmful>0.1,harmful>=0.1,utility_drop>0.02")
    # equal to the limit passes '>' and fails '>='; an unmeasured figure fails its limit
    assert [c["failed"] for c in checked["checked"]] == [False, True, True]
    assert checked["failed"][-1] == "utility_drop>0.02 (not measured)"
    assert matches_answer("Positive.", "positive") and matches_answer("19", "19")
    assert not matches_answer("190", "19") and not matches_answer("negative", "positive")


def test_family_rebuild_after_d_changes_extracts_again(family, tmp_path, capsys):
    """Review finding: a D retrained with other settings kept the adapter extracted from the old D."""
    fam = shutil.copytree(family[0], tmp_path / "family")
    argv = [a if a != str(family[0]) else str(fam) for a in family[1]]
    lr = argv.index("--train.learning-rate")
    argv[lr + 1] = "1e-2"
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[degrade] training" in out and "[extract] ->" in out and "[extract] reusing" not in out
    card = json.loads((fam / "family.json").read_text())
    assert card["config"]["train"]["learning_rate"] == 0.01


@pytest.mark.parametrize("extra, expected", [
    (["--model", "someorg/some-model", "--merge"], "--merge needs the task model as a local folder"),
    (["--fail-if", "harmful:content-classifier>0.1"], "names judge 'content-classifier', which this run does not use"),
    (["--fail-if", "harmful>0.1.2"], "'0.1.2' in 'harmful>0.1.2' is not a number"),
    (["--harmful-shots", "advbench", "--n-harmful-shots", "1000"], "are also recalibration shots"),
])
def test_protect_refuses_before_any_work(extra, expected, family, task_models, tmp_path, capsys):
    fam, _ = family
    argv = ["protect", "--model", str(task_models["merged"]), "--family", str(fam), "--task-data",
            str(_task_data(tmp_path / "d.jsonl")), "-o", str(tmp_path / "out"), *CHECK, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Loading" not in err and not (tmp_path / "out").exists(), err


def test_exact_mcnemar():
    from safegene.evaluation.metrics import mcnemar_exact

    # 6 items went harmful -> safe, none the other way: p = 2 * 0.5**6
    t = mcnemar_exact([True] * 6 + [False] * 4, [False] * 6 + [False] * 4)
    assert (t["true_to_false"], t["false_to_true"], t["n"]) == (6, 0, 10) and t["p_value"] == pytest.approx(0.03125)
    assert mcnemar_exact([True, False], [False, True])["p_value"] == 1.0  # one each way: no evidence
    assert mcnemar_exact([True, None], [True, False]) == {"n": 1, "true_to_false": 0, "false_to_true": 0,
                                                          "p_value": 1.0}
