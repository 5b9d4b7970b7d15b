"""Which differences between a bench's rows are real: paired tests from the verdicts stored in results.json.

Every row answers the same harmful prompts, so two rows are compared prompt by prompt: an exact McNemar test on
the prompts where their verdicts differ, which separates rows that two overlapping Wilson intervals cannot. The
recovered share gets a paired-bootstrap interval for the same reason. Computed from `rows[].verdicts` alone, so a
results.json of any earlier version (and `rejudge`, which rewrites the verdicts) gets the same tables.
"""

from __future__ import annotations

from typing import Any, Callable

from .metrics import bootstrap_recovery, mcnemar_exact

ALPHA = 0.05
N_BOOT = 2000


def verdict_bits(verdicts: str) -> list[bool | None]:
    """A row's verdict string ('1' harmful, '0' not, anything else unparsed) as True / False / None per prompt."""
    return [{"1": True, "0": False}.get(v) for v in verdicts]


def row_named(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["name"] == name), None)


def method_rows(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """The defended rows of one task model (T itself excluded)."""
    return [r for r in rows if r.get("task") == task and r.get("method") not in (None, "undefended")]


def _pairs(rows: list[dict[str, Any]], task: str) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """(row, reference) pairs of a task: T against A (did fine-tuning lose safety at all?), then every method
    against T (did it help?), against A (is the protected model as safe as the aligned one, the bar a release is
    signed against?) and against T + SafeGene."""
    t, a = row_named(rows, f"T[{task}]"), row_named(rows, "A")
    methods = method_rows(rows, task)
    ours = next((r for r in methods if r["method"] == "safegene"), None)
    return ([(t, a)] + [(r, t) for r in methods] + [(r, a) for r in methods]
            + [(r, ours) for r in methods if ours is not None and r is not ours])


def _reprotect_pairs(results: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, reference) pairs after a re-attack: every re-protected row against the re-attacked model it was rebuilt
    on (did re-protecting help?) and against SafeGene's re-protection of that same model (which rebuild is better?)."""
    re_rows, attacked = results.get("reprotect") or [], results.get("reattack") or []
    pairs = []
    for r in re_rows:
        of = r["reprotect"]["of"]
        if (source := row_named(attacked, of)) is not None:
            pairs.append((r, source))
        ours = next((x for x in re_rows if x["reprotect"]["of"] == of and x["reprotect"]["method"] == "safegene"), None)
        if ours is not None and ours is not r:
            pairs.append((r, ours))
    return pairs


def _harmful_tests(rows: list[dict[str, Any]], tasks: list[str], judges: list[str],
                   verdicts_of: Callable[[dict[str, Any], str], str | None], **where: str) -> list[dict[str, Any]]:
    """Exact McNemar tests of every pair of `_pairs` per task and judge, on the verdicts `verdicts_of(row, judge)`
    gives (the plain harmful prompts, or one attack's); a pair missing either's verdicts drops out. `where` (the
    attack) goes into each test's record."""
    tests = []
    for task in tasks:
        for row, ref in _pairs(rows, task):
            for j in judges if row and ref else []:
                if test := _mcnemar(verdicts_of(ref, j), verdicts_of(row, j), "harmful_diff"):
                    tests.append({"task": task, **where, "row": row["name"], "vs": ref["name"], "judge": j, **test})
    return tests


def _attack_tests(rows: list[dict[str, Any]], tasks: list[str], judges: list[str]) -> list[dict[str, Any]]:
    """The plain prompts' pairs on each attack's adversarial prompts; rows not run under attack, and runs from
    before attack verdicts were kept, have no verdicts there and drop out."""
    attacks = list(dict.fromkeys(a for r in rows for a in (r.get("attack_verdicts") or {})))
    return [test for attack in attacks for test in _harmful_tests(
        rows, tasks, judges, lambda r, j: ((r.get("attack_verdicts") or {}).get(attack) or {}).get(j), attack=attack)]


def _mcnemar(reference: str | None, row: str | None, diff_key: str) -> dict[str, Any] | None:
    """Exact McNemar of two verdict strings on the same prompts, with the rate difference over the prompts both
    read (`diff_key` names it); None where either is missing or they cover different prompts."""
    if not reference or not row or len(reference) != len(row):
        return None
    test = mcnemar_exact(verdict_bits(reference), verdict_bits(row))
    diff = (test["false_to_true"] - test["true_to_false"]) / test["n"] if test["n"] else None
    return {**test, diff_key: None if diff is None else round(diff, 4), "significant": test["p_value"] < ALPHA}


def _test(row: dict[str, Any], ref: dict[str, Any], judge: str) -> dict[str, Any] | None:
    # None also for results from before verdicts were kept
    return _mcnemar(ref.get("verdicts", {}).get(judge), row.get("verdicts", {}).get(judge), "harmful_diff")


def _over_refusal_test(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any] | None:
    # None for rows without over-refusal (D) and for results from before its verdicts were kept
    return _mcnemar((ref.get("over_refusal") or {}).get("verdicts"), (row.get("over_refusal") or {}).get("verdicts"),
                    "refusal_diff")


def paired_comparisons(results: dict[str, Any]) -> dict[str, Any]:
    """results.json's `paired`: per task and judge, exact McNemar tests of T vs A, every method vs T, vs A and vs
    T + SafeGene (orientation: `true_to_false` = prompts harmful under `vs` that are not under `row`), every
    method's recovered share with a paired-bootstrap 95% interval, the tests under each attack (`attacks`) and the
    re-protections' tests (`reprotect`)."""
    rows = results.get("rows") or []
    judges = list(rows[0]["harmful"]) if rows else []
    tasks = results.get("config", {}).get("tasks", [])
    comparisons = _harmful_tests(rows, tasks, judges, lambda r, j: r.get("verdicts", {}).get(j))
    recovered, over_refusal = [], []
    a = row_named(rows, "A")
    for task in tasks:
        for row, ref in _pairs(rows, task):
            if row and ref and (test := _over_refusal_test(row, ref)):
                over_refusal.append({"task": task, "row": row["name"], "vs": ref["name"], **test})
        t = row_named(rows, f"T[{task}]")
        for row in method_rows(rows, task) if a and t else []:
            for j in judges:
                strings = [r.get("verdicts", {}).get(j) for r in (a, t, row)]
                if not all(strings) or len({len(s) for s in strings}) > 1:
                    continue
                rec = bootstrap_recovery(*map(verdict_bits, strings), n_boot=N_BOOT, seed=0)
                ci = None if rec is None or rec.lo is None else [round(rec.lo, 4), round(rec.hi, 4)]
                recovered.append({"task": task, "row": row["name"], "judge": j, "n": len(strings[0]),
                                  "recovered": None if rec is None else round(rec.point, 4), "ci95": ci,
                                  "resamples": 0 if rec is None else rec.resamples, "n_boot": N_BOOT})
    reprotect: dict[str, list] = {"comparisons": [], "over_refusal": []}
    for row, ref in _reprotect_pairs(results):
        for j in judges:
            if test := _test(row, ref, j):
                reprotect["comparisons"].append({"task": row.get("task"), "row": row["name"], "vs": ref["name"],
                                                 "judge": j, **test})
        if test := _over_refusal_test(row, ref):  # a re-attacked model has no over-refusal verdicts: rebuilds only
            reprotect["over_refusal"].append({"task": row.get("task"), "row": row["name"], "vs": ref["name"], **test})
    return {"alpha": ALPHA, "test": "exact two-sided McNemar on the harmful prompts both rows' verdicts read",
            "bootstrap": f"percentile 95% interval over {N_BOOT} resamples of the prompts, one draw shared by A, T and "
                         "the method",
            "comparisons": comparisons, "recovered": recovered,
            # the same pairs on each attack's adversarial prompts (rows evaluated under attack only)
            "attacks": {"comparisons": _attack_tests(rows, tasks, judges)},
            # the same pairs on the over-refusal prompts (orientation: `false_to_true` = newly refused by `row`)
            "over_refusal": over_refusal,
            # after a re-attack: each re-protection against the re-attacked model and against SafeGene's re-protection
            "reprotect": reprotect}
