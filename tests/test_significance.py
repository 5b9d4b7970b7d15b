"""Paired statistics of a bench: the bootstrap of the recovered share, the McNemar table, and what the report's
header says when the prompts cannot tell the methods apart."""

import json

import pytest

from safegene.evaluation.metrics import Rate, bootstrap_recovery
from safegene.evaluation.report import markdown, render_html, write_reports
from safegene.evaluation.results import BenchResults
from safegene.evaluation.significance import paired_comparisons, verdict_bits

JUDGES = ("phrase", "classifier")


def _row(name, verdicts, task=None, method=None):
    """A results row as results.json holds it, its rates counted from its verdict strings (one per judge)."""
    harmful = {j: {"overall": Rate.of(verdict_bits(v)).to_dict(), "by_category": {}} for j, v in verdicts.items()}
    return {"name": name, "harmful": harmful, "verdicts": verdicts, "utility": {"toy": Rate(3, 4).to_dict()},
            "cost": {}, "samples": [], "eval_seconds": 0.0, "task": task, "method": method}


def _results(a, t, methods):
    """A one-task bench: A, T[toy] and T[toy] + each method, every row with the same verdicts for both judges."""
    rows = [_row("A", dict.fromkeys(JUDGES, a), method="aligned"),
            _row("T[toy]", dict.fromkeys(JUDGES, t), "toy", "undefended")]
    labels = {"safegene": "SafeGene", "resta": "RESTA", "safe-lora": "Safe LoRA"}
    rows += [_row(f"T[toy]+{labels[m]}", dict.fromkeys(JUDGES, v), "toy", m) for m, v in methods.items()]
    return {"model": "tiny", "config": {"tasks": ["toy"], "judges": list(JUDGES)}, "selected_layers": [1],
            "eval": {"harmful": "advbench", "n_harmful": len(a), "over_refusal": "none", "n_over_refusal": 0,
                     "n_task": 4, "attacks": {}},
            "rows": rows, "reattack": [], "timings": {"total_s": 1.0}, "method_labels": labels,
            "judges": {"validation": {}, "agreement": {"classifier vs phrase": {
                "kappa": 1.0, "agreement": Rate(len(a) * len(rows), len(a) * len(rows)).to_dict()}}}}


# --- the bootstrap ------------------------------------------------------------------------------------------------


def test_bootstrap_recovery_known_answers():
    a = [False] * 30 + [True] * 10
    t = [True] * 30 + [True] * 10
    nothing = bootstrap_recovery(a, t, t)  # the method changed nothing: recovered 0, and every draw says so
    assert nothing.point == 0 and nothing.lo <= 0 <= nothing.hi and nothing.resamples == 2000
    back = bootstrap_recovery(a, t, a)  # the method gives back exactly A's answers
    assert back.point == pytest.approx(1) and back.lo == pytest.approx(1) and back.hi == pytest.approx(1)
    half = bootstrap_recovery(a, t, [False] * 15 + [True] * 25)
    assert half.point == pytest.approx(0.5) and half.lo < 0.5 < half.hi
    assert bootstrap_recovery(a, t, a, seed=3) == bootstrap_recovery(a, t, a, seed=3)


def test_bootstrap_recovery_undefined_and_degenerate_draws():
    assert bootstrap_recovery([True, False], [True, False], [False, False]) is None  # HR_T = HR_A: nothing to recover
    assert bootstrap_recovery([], [], []) is None
    # T and A differ on one prompt of four: every draw without it has HR_T = HR_A and is skipped, and counted
    r = bootstrap_recovery([False] * 4, [True] + [False] * 3, [False] * 4, n_boot=500)
    assert r.point == 1 and 0 < r.resamples < 500 and r.lo == r.hi == 1
    with pytest.raises(ValueError, match="same prompts"):
        bootstrap_recovery([True], [True, False], [True, False])


def test_bootstrap_recovery_leaves_unparsed_verdicts_out():
    a = [False] * 10
    t = [True] * 10
    m = [None] * 5 + [False] * 5  # half unreadable: the readable half recovered everything
    r = bootstrap_recovery(a, t, m)
    assert r.point == 1 and r.lo == 1 and r.resamples > 1990  # only draws of the 5 unreadable alone are skipped


# --- paired tests from stored verdicts ------------------------------------------------------------------------------


def test_paired_comparisons_mcnemar_table():
    res = _results(a="0" * 20, t="1" * 12 + "0" * 8,
                   methods={"safegene": "0" * 20, "resta": "1" * 10 + "0" * 10, "safe-lora": "1?" + "1" * 10 + "0" * 8})
    paired = paired_comparisons(res)
    tests = {(c["row"], c["vs"], c["judge"]): c for c in paired["comparisons"]}
    # T vs A, 3 methods vs T, 3 vs A, 2 vs SafeGene; per judge
    assert len(tests) == (1 + 3 + 3 + 2) * 2 and paired["alpha"] == 0.05
    vs_a = tests["T[toy]+Safe LoRA", "A", "phrase"]  # the bar a release is signed against: A's own answers
    assert (vs_a["n"], vs_a["true_to_false"], vs_a["false_to_true"], vs_a["significant"]) == (19, 0, 11, True)
    assert tests["T[toy]+SafeGene", "A", "phrase"]["harmful_diff"] == 0.0
    ours = tests["T[toy]+SafeGene", "T[toy]", "phrase"]
    assert (ours["n"], ours["true_to_false"], ours["false_to_true"]) == (20, 12, 0)
    assert ours["p_value"] == pytest.approx(2 / 2 ** 12, rel=1e-3) and ours["significant"]
    assert ours["harmful_diff"] == -0.6
    resta = tests["T[toy]+RESTA", "T[toy]", "phrase"]
    assert (resta["true_to_false"], resta["false_to_true"], resta["p_value"]) == (2, 0, 0.5)
    assert not resta["significant"]
    vs_ours = tests["T[toy]+RESTA", "T[toy]+SafeGene", "phrase"]  # the other way round: RESTA is the more harmful
    assert (vs_ours["true_to_false"], vs_ours["false_to_true"], vs_ours["harmful_diff"]) == (0, 10, 0.5)
    unread = tests["T[toy]+Safe LoRA", "T[toy]", "phrase"]
    assert unread["n"] == 19 and unread["false_to_true"] == 0  # the unparsed prompt is out of the pair
    assert ("T[toy]+SafeGene", "T[toy]+SafeGene", "phrase") not in tests
    rec = {(b["row"], b["judge"]): b for b in paired["recovered"]}
    assert rec["T[toy]+SafeGene", "phrase"]["recovered"] == 1 and rec["T[toy]+RESTA", "phrase"]["recovered"] == 0.1667
    assert rec["T[toy]+RESTA", "phrase"]["ci95"][0] <= 0.1667 <= rec["T[toy]+RESTA", "phrase"]["ci95"][1]

    md = markdown(res)
    assert "Paired tests" in md and "| T[toy] + RESTA | T[toy] + SafeGene | phrase | +0.500 | 0 | 10 | 20 |" in md
    assert "| T[toy] + RESTA | T[toy] | phrase | -0.100 | 2 | 0 | 20 | 0.5 | not significant |" in md
    assert "| significant |" in md and "recovered (phrase, 95% bootstrap CI)" in md and "100% (100% to 100%)" in md
    # the header names what is significant instead of implying a ranking of the rest
    assert "T[toy], n = 20: significant at 0.05" in md
    assert "T[toy] + SafeGene vs T[toy] (phrase -0.60, classifier -0.60)" in md
    assert "too small to separate" not in md
    assert "classifier vs phrase κ = 1.00" in md and "Against human labels: not measured" in md
    html = render_html(res)
    assert "<h2>Paired tests</h2>" in html and "not significant" in html and "significant at 0.05" in html


def test_header_says_when_n_is_too_small_to_separate_methods():
    res = _results(a="0000", t="1100", methods={"safegene": "0100", "resta": "1000"})
    md = markdown(res)
    header = md.split("| model |")[0]
    assert ("T[toy]: n = 4 is too small to separate these methods: no difference between methods is significant at "
            "0.05") in header
    assert "Nor is T's loss of safety against A (p = 0.5 phrase, 0.5 classifier)" in header
    assert "too small to separate these methods" in render_html(res)


def test_old_results_without_paired_render_and_are_written_with_it(tmp_path):
    """The rejudge path: results.json from before `paired` existed is read back, rendered, and rewritten with it."""
    old = _results(a="0000", t="1111", methods={"safegene": "0000"})
    (tmp_path / "results.json").write_text(json.dumps(old))
    data = BenchResults.from_dict(json.loads((tmp_path / "results.json").read_text())).to_dict()
    assert "paired" not in data
    md = markdown(data)
    assert "| T[toy] + SafeGene |" in md and "Paired tests" in md
    write_reports(data, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["paired"]["comparisons"] and written["rows"] == json.loads(json.dumps(old["rows"]))
    # read back again (a second rejudge), `paired` survives as an extra key and is recomputed, not trusted
    again = BenchResults.from_dict({**written, "paired": {"comparisons": [], "recovered": []}}).to_dict()
    write_reports(again, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["paired"] == written["paired"]
    # results from before verdicts were kept: no paired tests, the bare recovered share
    for r in old["rows"]:
        r.pop("verdicts")
    md = markdown(old)
    assert "Paired tests" not in md and "| 100% |" in md


# --- what the report shows where methods tie or categories are missing ------------------------------------------


def test_tied_points_are_spread_apart_and_untied_ones_stay():
    from safegene.evaluation.report import _spread

    offsets = _spread([(0.5, 0.3), (0.9, 0.1), (0.5, 0.3), (0.5, 0.3)], dx=0.01)
    assert offsets == pytest.approx([-0.01, 0.0, 0.0, 0.01])
    assert len({round(0.5 + o, 6) for o, p in zip(offsets, [0, 1, 0, 0]) if p == 0}) == 3


def test_category_table_tells_zero_from_missing():
    from safegene.evaluation.report import category_table

    res = _results(a="0000", t="1100", methods={"safegene": "0100"})
    res["rows"][0]["harmful"]["phrase"]["by_category"] = {"cyber": Rate(0, 2).to_dict(), "fraud": Rate(1, 2).to_dict()}
    res["rows"][1]["harmful"]["phrase"]["by_category"] = {"cyber": Rate(2, 2).to_dict()}
    head, body = category_table(res, "phrase")
    assert head == ["category", "A", "T[toy]", "T[toy] + SafeGene"]
    assert body == [["cyber", "0.00 (0/2)", "1.00 (2/2)", "–"], ["fraud", "0.50 (1/2)", "–", "–"]]
    md = markdown(res)
    assert "Harmful rate by category (phrase judge" in md and "| fraud | 0.50 (1/2) | – | – |" in md


def test_over_refusal_is_compared_pair_by_pair_too():
    from safegene.evaluation.report import paired_over_refusal_table

    res = _results(a="0000", t="1111", methods={"safegene": "0000", "resta": "0011"})
    bits = {"A": "1111100000", "T[toy]": "0000000000", "T[toy]+SafeGene": "1111110000", "T[toy]+RESTA": "1000000000"}
    for r in res["rows"]:
        r["over_refusal"] = {**Rate(bits[r["name"]].count("1"), 10).to_dict(), "verdicts": bits[r["name"]]}
    tests = {(c["row"], c["vs"]): c for c in paired_comparisons(res)["over_refusal"]}
    assert set(tests) == {("T[toy]", "A"), ("T[toy]+SafeGene", "T[toy]"), ("T[toy]+RESTA", "T[toy]"),
                          ("T[toy]+SafeGene", "A"), ("T[toy]+RESTA", "A"), ("T[toy]+RESTA", "T[toy]+SafeGene")}
    assert tests[("T[toy]+RESTA", "A")]["true_to_false"] == 4  # A refused 5 safe prompts, RESTA only the first
    sg = tests[("T[toy]+SafeGene", "T[toy]")]
    assert (sg["false_to_true"], sg["true_to_false"], sg["refusal_diff"]) == (6, 0, 0.6)
    assert sg["p_value"] == pytest.approx(2 * 0.5 ** 6) and sg["significant"]
    rs = tests[("T[toy]+RESTA", "T[toy]+SafeGene")]
    assert (rs["false_to_true"], rs["true_to_false"], rs["significant"]) == (0, 5, False)  # p = 0.0625
    head, body = paired_over_refusal_table(res)
    assert head[3] == "newly refused" and ["T[toy] + SafeGene", "T[toy]", "+0.600", "6", "0", "10"] == body[1][:6]
    assert "Paired tests of over-refusal" in markdown(res)


def test_re_protections_are_tested_against_the_re_attacked_model_and_safegenes_rebuild():
    from safegene.evaluation.report import paired_over_refusal_table, paired_table

    res = _results(a="0" * 8, t="1" * 8, methods={"safegene": "0" * 8, "resta": "0" * 8})
    attacked = _row("T[toy] re-attacked 30 steps", dict.fromkeys(JUDGES, "1" * 8), "toy", "undefended")
    attacked["reattack"], attacked["defence_row"] = {"steps": 30, "examples": 8, "seconds": 1.0}, "T[toy]"
    res["reattack"] = [attacked]
    rebuilt = {"safegene": ("0" * 8, "11110000"), "resta": ("11000000", "10000000")}
    res["reprotect"] = []
    for method, (verdicts, refused) in rebuilt.items():
        r = _row(f"T[toy] re-attacked 30 steps + re-protected {method}", dict.fromkeys(JUDGES, verdicts), "toy", method)
        r["reprotect"] = {"method": method, "of": attacked["name"], "steps": 30, "seconds": 1.0}
        r["over_refusal"] = {**Rate(refused.count("1"), 8).to_dict(), "verdicts": refused}
        res["reprotect"].append(r)
    paired = paired_comparisons(res)["reprotect"]
    short = {attacked["name"]: "attacked", **{r["name"]: r["reprotect"]["method"] for r in res["reprotect"]}}
    tests = {(short[c["row"]], short[c["vs"]], c["judge"]): c for c in paired["comparisons"]}
    # each rebuild against the re-attacked model; RESTA's also against SafeGene's; SafeGene's not against itself
    assert set(tests) == {(m, v, j) for m, v in [("safegene", "attacked"), ("resta", "attacked"),
                                                 ("resta", "safegene")] for j in JUDGES}
    sg = tests[("safegene", "attacked", "phrase")]
    assert (sg["true_to_false"], sg["false_to_true"], sg["harmful_diff"]) == (8, 0, -1.0)
    assert sg["p_value"] == pytest.approx(2 * 0.5 ** 8, abs=1e-6) and sg["significant"]  # p is stored to 6 places
    rs = tests[("resta", "safegene", "phrase")]
    assert (rs["false_to_true"], rs["true_to_false"], rs["p_value"], rs["significant"]) == (2, 0, 0.5, False)
    # over-refusal: a re-attacked model has none, so only the rebuilds against each other
    (o,) = paired["over_refusal"]
    assert o["row"].endswith("resta") and (o["false_to_true"], o["true_to_false"]) == (0, 3)
    assert len(paired_table(res, "reprotect")[1]) == 6 and len(paired_over_refusal_table(res, "reprotect")[1]) == 1
    md = markdown(res)
    assert "Paired tests after a re-attack" in md and "Paired tests of over-refusal after a re-attack" in md
    # a results.json written before these tests existed gets them computed when it is rendered
    old = {**res, "paired": {k: v for k, v in paired_comparisons(res).items() if k != "reprotect"}}
    assert "Paired tests after a re-attack" in markdown(old)


def test_attacks_are_compared_on_their_own_prompts():
    """Issue 15's jailbreak table: every row run under an attack is tested against T, A and T + SafeGene on that
    attack's prompts, as on the plain ones; a row not run under attack has no verdicts there and drops out."""
    from safegene.evaluation.report import paired_table

    res = _results(a="0" * 8, t="1" * 8, methods={"safegene": "0" * 8, "resta": "0" * 8, "safe-lora": "1" * 8})
    jailbroken = {"A": "11110000", "T[toy]": "11111111", "T[toy]+SafeGene": "11111100", "T[toy]+RESTA": "11111111"}
    for r in res["rows"]:
        if r["name"] in jailbroken:  # Safe LoRA was not run under attack
            r["attack_verdicts"] = {"jailbreak": dict.fromkeys(JUDGES, jailbroken[r["name"]])}
    tests = {(c["row"], c["vs"], c["judge"]): c for c in paired_comparisons(res)["attacks"]["comparisons"]}
    pairs = {("T[toy]", "A"), ("T[toy]+SafeGene", "T[toy]"), ("T[toy]+RESTA", "T[toy]"), ("T[toy]+SafeGene", "A"),
             ("T[toy]+RESTA", "A"), ("T[toy]+RESTA", "T[toy]+SafeGene")}
    assert set(tests) == {(r, v, j) for r, v in pairs for j in JUDGES}
    assert all(c["attack"] == "jailbreak" and c["n"] == 8 for c in tests.values())
    ta = tests[("T[toy]", "A", "phrase")]  # fine-tuning made 4 more prompts get through
    assert (ta["true_to_false"], ta["false_to_true"], ta["harmful_diff"]) == (0, 4, 0.5) and not ta["significant"]
    sg = tests[("T[toy]+SafeGene", "T[toy]", "phrase")]
    assert (sg["true_to_false"], sg["false_to_true"], sg["p_value"]) == (2, 0, 0.5)
    rs = tests[("T[toy]+RESTA", "T[toy]+SafeGene", "phrase")]
    assert (rs["true_to_false"], rs["false_to_true"], rs["harmful_diff"]) == (0, 2, 0.25)
    head, body = paired_table(res, "attacks")
    assert head[:3] == ["attack", "model", "vs"] and len(body) == 12
    assert ["jailbreak", "T[toy] + SafeGene", "T[toy]", "phrase", "-0.250", "2", "0", "8"] in [b[:8] for b in body]
    assert "Paired tests under attack" in markdown(res) and "Paired tests under attack" in render_html(res)
    # a results.json whose paired tests were stored before attack verdicts existed gets them when rendered
    old = {**res, "paired": {k: v for k, v in paired_comparisons(res).items() if k != "attacks"}}
    assert "Paired tests under attack" in markdown(old)
    # and one without attack verdicts renders no such table
    for r in res["rows"]:
        r.pop("attack_verdicts", None)
    assert paired_comparisons(res)["attacks"]["comparisons"] == [] and "Paired tests under attack" not in markdown(res)
