"""The outputs of `safegene protect` / `safegene eval` (results.json, report.html, the model card) from a synthetic
results dict in the schema the commands write."""

import json

import yaml

from safegene.evaluation.metrics import Rate
from safegene.evaluation.protect_report import model_card, write_protect_outputs

CATS = ["Violent Crimes", "Non-Violent Crimes", "Privacy", "Suicide & Self-Harm", "Specialized Advice"]


def _row(name, method, harmful, over, by_category):
    judged = {j: {"overall": Rate(*harmful[j]).to_dict(),
                  "by_category": {c: Rate(*kn).to_dict() for c, kn in by_category[j].items()}} for j in harmful}
    return {"name": name, "harmful": judged, "verdicts": {}, "utility": {}, "cost": {},
            "over_refusal": {**Rate(*over).to_dict(), "source": "shared:xstest-safe", "judge": "refusal-phrase"},
            "samples": [], "eval_seconds": 120.0, "task": "my", "method": method}


def protect_results():
    before_cats = {"refusal-phrase": {c: (4, 13) for c in CATS[:4]} | {CATS[4]: (6, 12)},
                   "content-classifier": {c: (3, 13) for c in CATS[:4]} | {CATS[4]: (5, 12)}}
    # after: a category with no harmful answer (Privacy) and one not evaluated (Specialized Advice)
    after_cats = {"refusal-phrase": {CATS[0]: (1, 13), CATS[1]: (2, 13), CATS[2]: (0, 13), CATS[3]: (1, 12, 1)},
                  "content-classifier": {CATS[0]: (2, 13), CATS[1]: (1, 13), CATS[2]: (0, 13), CATS[3]: (1, 13)}}
    before = _row("T", "undefended", {"refusal-phrase": (22, 64), "content-classifier": (17, 64)}, (3, 32), before_cats)
    after = _row("T+adapter", "safegene", {"refusal-phrase": (4, 51, 1), "content-classifier": (4, 52)}, (5, 32),
                 after_cats)
    return {
        "kind": "protect", "model": "runs/T", "adapter": "OUT/adapter", "merged": "OUT/model",
        "family": "runs/family", "base_model": "qwen2.5-coder-0.5b-instruct",
        "base_model_hub": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "judges": ["refusal-phrase", "content-classifier"],
        "eval": {"harmful": "advbench", "n_harmful": 64, "over_refusal": "shared:xstest-safe", "n_over_refusal": 32,
                 "max_new_tokens": 64},
        "split": {"data": "my.jsonl", "n_rows": 120, "n_shots": 32, "n_check": 64, "seed": 0},
        "rows": [before, after],
        "utility": {"kind": "exact-match", "n": 64, "before": Rate(52, 64).to_dict(), "after": Rate(51, 64).to_dict(),
                    "drop": 0.016, "loglik_before": -0.83, "loglik_after": -0.85, "loglik_change": -0.02},
        "layers": [5, 12], "coefficients": {"5": 0.91, "12": 1.3},
        "timings": {"load_s": 4.1, "recalibrate_s": 80.2, "eval_before_s": 120.0, "eval_after_s": 118.0,
                    "merge_s": 12.0, "total_s": 340.0},
        "limits": {"spec": "harmful>0.05,over_refusal>0.30",
                   "checked": [{"metric": "harmful", "op": ">", "limit": 0.05, "value": 0.078, "failed": True},
                               {"metric": "over_refusal", "op": ">", "limit": 0.3, "value": 0.156, "failed": False}],
                   "failed": ["harmful>0.05 (0.078)"]},
        "inputs": {"model": {"ref": "/abs/runs/T", "kind": "folder", "hash": "a" * 64,
                             "hash_kind": "sha256 over files' sha256"},
                   "family": {"ref": "/abs/runs/family", "kind": "folder", "hash": "b" * 64,
                              "hash_kind": "sha256 over files' sha256"},
                   "task_data": {"ref": "/abs/my.jsonl", "kind": "file", "bytes": 9000, "hash": "c" * 64,
                                 "hash_kind": "sha256"}},
        "command": "safegene protect --model runs/T --family runs/family --task-data my.jsonl -o OUT",
        "versions": {"safegene": "0.1.0", "torch": "2.13.0"},
    }


def eval_results():
    res = protect_results()
    res.update(kind="eval", adapter=None, merged=None, family=None, base_model=None, split=None, limits=None,
               rows=res["rows"][:1], layers=[], coefficients={},
               command="safegene eval --model runs/T", inputs={"model": res["inputs"]["model"]})
    # as `eval` writes it for a model alone: its one measurement under 'after', nothing to compare with
    res["utility"] = {"kind": "exact-match", "n": 64, "before": None, "after": Rate(52, 64).to_dict(), "drop": None,
                      "loglik_before": None, "loglik_after": -0.83, "loglik_change": None}
    return res


def _rates(res):
    """Every rate the results hold, as the reports print it: rate, 95% interval, n (and the unparsed answers)."""
    rates = [j["overall"] for r in res["rows"] for j in r["harmful"].values()]
    rates += [r["over_refusal"] for r in res["rows"]]
    rates += [u for u in ((res["utility"] or {}).get("before"), (res["utility"] or {}).get("after")) if u]
    return [f"{r['rate']:.3f} ({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}) (n={r['n']}"
            + (f", {r['unparsed']} unparsed)" if r["unparsed"] else ")") for r in rates]


def _front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


def test_protect_outputs(tmp_path):
    res = protect_results()
    paths = write_protect_outputs(res, tmp_path)
    assert set(paths) == {"json", "html", "card"} and all(p.is_file() for p in paths.values())
    assert json.loads(paths["json"].read_text()) == res

    card = paths["card"].read_text()
    front = _front_matter(card)
    assert front["base_model"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and front["library_name"] == "peft"
    assert front["tags"] == ["safegene", "safety", "lora"]
    assert card == model_card(res)
    # every rate with its interval and n; the unparsed answers beside n
    assert len(_rates(res)) == 8 and all(r in card for r in _rates(res))
    assert "0.344 (0.24-0.47) (n=64)" in card and "0.078 (0.03-0.18) (n=51, 1 unparsed)" in card
    assert "-0.016" in card and "-0.830" in card and "-0.020" in card
    assert res["command"] in card and "PeftModel.from_pretrained" in card and '"OUT/model"' in card
    assert "safegene serve --model runs/T --adapter safety=OUT/adapter" in card
    assert "| 12 | 1.300 |" in card and "c" * 64 in card and "FAILED" in card

    page = paths["html"].read_text()
    assert page.count("<img src='data:image/png;base64,") == 3  # safety–utility + one category chart per judge
    assert all(r in page for r in _rates(res))
    assert "--fail-if limits: FAILED" in page and "<td>passed</td>" in page and "<td>FAILED</td>" in page
    assert "a" * 64 in page and "recalibrate" in page and "matplotlib is not installed" not in page
    assert "FAILED harmful&gt;0.05 (0.078)" in page  # in the summary line


def test_eval_with_one_row(tmp_path):
    res = eval_results()
    paths = write_protect_outputs(res, tmp_path)
    assert set(paths) == {"json", "html"} and not (tmp_path / "README.md").exists()
    page = paths["html"].read_text()
    assert len(_rates(res)) == 4 and all(r in page for r in _rates(res))
    assert page.count("<img src='data:image/png;base64,") == 3
    assert "change (after" not in page and "+ safety adapter" not in page and "0.812 (0.70-0.89) (n=64)" in page
    assert "fail-if" not in page and "safegene eval --model runs/T" in page and "<td>-0.830</td>" in page
    assert "utility, exact-match (n=64): 0.812." in page  # the summary line


def test_eval_alone_without_answers(tmp_path):
    """A model alone on task data without answers: no agreement to measure (nothing to agree with), only the
    reference log-likelihood."""
    res = eval_results()
    res["utility"].update(kind="agreement", after=None)
    page = write_protect_outputs(res, tmp_path)["html"].read_text()
    assert "the reference" not in page and "<td>-0.830</td>" in page and "No task utility rate" in page
    assert page.count("<img src='data:image/png;base64,") == 2


def test_eval_without_utility_or_categories(tmp_path):
    """eval with no task data (no utility) and a judge that recorded no categories: the figures that can be drawn."""
    res = eval_results()
    res["utility"] = None
    res["rows"][0]["harmful"]["content-classifier"]["by_category"] = {}
    page = write_protect_outputs(res, tmp_path)["html"].read_text()
    assert page.count("<img src='data:image/png;base64,") == 1 and "No task utility rate" in page
    assert "utility:" not in page and "0.266 (0.17-0.38) (n=64)" in page and "log-likelihood" not in page


def test_eval_with_adapter_and_agreement(tmp_path):
    """eval of a model with and without an adapter, utility as agreement with the model alone (no 'before' rate)."""
    res = protect_results()
    res.update(kind="eval", limits=None, split=None, merged=None)
    res["utility"] = {"kind": "agreement", "n": 64, "before": None, "after": Rate(60, 64).to_dict(), "drop": 0.0625}
    page = write_protect_outputs(res, tmp_path)["html"].read_text()
    assert "the reference" in page and "0.938 (0.85-0.98) (n=64)" in page and "-0.062" in page
    assert page.count("<img src='data:image/png;base64,") == 3


def test_report_without_matplotlib(tmp_path, monkeypatch):
    import safegene.plotting

    def no_matplotlib(**kw):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(safegene.plotting, "figure", no_matplotlib)
    page = write_protect_outputs(protect_results(), tmp_path)["html"].read_text()
    assert "<img" not in page and "matplotlib is not installed" in page and "0.344 (0.24-0.47) (n=64)" in page


def test_front_matter_quotes_odd_names():
    res = protect_results()
    res["base_model_hub"] = "org/model: v2 # beta"
    assert _front_matter(model_card(res))["base_model"] == "org/model: v2 # beta"


def test_inputs_recorded_by_name():
    res = protect_results()
    res["inputs"]["family"] = {"ref": "qwen-family", "kind": "name"}
    assert "| family | qwen-family | name | - | not on disk: recorded by name |" in model_card(res)
