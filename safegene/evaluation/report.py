"""results.md (the table) and report.html (figures, judge validation and agreement, timings, config, versions).

Every comparison the tables invite is tested on the same prompts (`significance`): the header of the main table
says which differences are significant, and says so when none is, rather than let the row order read as a ranking.

Figures are PNGs embedded in the HTML, so the report is one self-contained file. Without matplotlib the report
is written without figures and says so.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from ..io import atomic_file, write_json
from ..plotting import figure
from .metrics import format_n
from .significance import ALPHA, paired_comparisons, row_named as _row


#: under the paired-tests table: how to read a row, and what "significant" does not promise across many tests
PAIRED_NOTE = (f"harmful → not: prompts the reference's answer was judged harmful and this row's not; exact "
               f"two-sided McNemar, not corrected for the number of tests: about 1 in {1 / ALPHA:.0f} comes out "
               f"significant by chance where nothing differs")
#: the pairs tested under attack (significance._attack_tests: the plain prompts' pairs)
ATTACK_PAIRS = "on each attack's prompts: T against A, each defended row against T, A and T + SafeGene"


def rate_cell(r: dict[str, Any] | None, ci: bool = True) -> str:
    if not r:
        return "-"
    text = f"{r['rate']:.3f} ({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})" if ci else f"{r['rate']:.3f}"
    # results written before judges could leave answers unparsed have no such field
    return text + (f" ({format_n(r['n'], r['unparsed'])})" if r.get("unparsed") else "")


def recovery(rows: list[dict[str, Any]], row: dict[str, Any], judge: str) -> float | None:
    """(HR_T − HR_method) / (HR_T − HR_A): the share of the safety lost by fine-tuning that a method gives back."""
    if not row.get("task") or row.get("method") in (None, "undefended"):
        return None
    a, t = _row(rows, "A"), _row(rows, f"T[{row['task']}]")
    if not a or not t:
        return None
    hr_a, hr_t = a["harmful"][judge]["overall"]["rate"], t["harmful"][judge]["overall"]["rate"]
    hr_m = row["harmful"][judge]["overall"]["rate"]
    return (hr_t - hr_m) / (hr_t - hr_a) if abs(hr_t - hr_a) > 1e-9 else None


def _label(results: dict[str, Any], r: dict[str, Any]) -> str:
    """How a row is named in tables: A, D and T by name, a method as T[task] + its label."""
    if r.get("method") in (None, "aligned", "degraded", "undefended"):
        return r["name"]
    return f"T[{r['task']}] + {results.get('method_labels', {}).get(r['method'], r['method'])}"


def _with_paired(results: dict[str, Any]) -> dict[str, Any]:
    """The results with their paired tests: a results.json from before they (or the re-protections' tests, or the
    tests under attack) were stored gets them computed."""
    stored = results.get("paired")
    attacked = any(r.get("attack_verdicts") for r in results.get("rows") or [])
    if stored is not None and ("reprotect" in stored or not results.get("reprotect")) and (
            "attacks" in stored or not attacked):
        return results
    return {**results, "paired": paired_comparisons(results)}


def _recovered(results: dict[str, Any], row: dict[str, Any], judge: str) -> str:
    """'80% (33% to 100%)': the share with its paired-bootstrap 95% interval (how many resamples it rests on:
    `bootstrap_line`); the bare share where the verdicts to resample are missing."""
    b = next((x for x in results["paired"]["recovered"] if x["row"] == row["name"] and x["judge"] == judge), None)
    if b is None:
        x = recovery(results["rows"], row, judge)
        return "-" if x is None else f"{x:.0%}"
    if b["recovered"] is None:
        return "-"
    if b["ci95"] is None:
        return f"{b['recovered']:.0%} (no interval: 0 of {b['n_boot']} resamples)"
    return f"{b['recovered']:.0%} ({b['ci95'][0]:.0%} to {b['ci95'][1]:.0%})"


def bootstrap_line(results: dict[str, Any]) -> str:
    """What the recovered intervals rest on: how many resamples, and how many of them had no share (HR_T = HR_A in
    the draw), per task and judge; the fewest left of any method is reported."""
    recs = _with_paired(results)["paired"]["recovered"]
    if not recs:
        return ""
    fewest: dict[tuple[str, str], int] = {}
    for b in recs:
        if b["recovered"] is not None:
            fewest[b["task"], b["judge"]] = min(fewest.get((b["task"], b["judge"]), b["n_boot"]), b["resamples"])
    n_boot = recs[0]["n_boot"]
    skipped = [f"{n_boot - used} (T[{task}], {judge})" for (task, judge), used in fewest.items() if used < n_boot]
    return (f"Recovered: 95% interval over {n_boot} resamples of the harmful prompts (n={results['eval']['n_harmful']},"
            f" one draw shared by A, T and the method)" + (f"; resamples with HR_T = HR_A have no share and are left "
                                                          f"out: {'; '.join(skipped)}." if skipped else "."))


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    results = _with_paired(results)
    rows = results["rows"]
    judges = list(rows[0]["harmful"])
    tasks = results["config"]["tasks"]
    head = (["model"] + [f"harmful rate, {j} (95% CI)" for j in judges]
            + [f"recovered ({j}, 95% bootstrap CI)" for j in judges]
            + ["over-refusal"] + [f"{t} accuracy" for t in tasks] + ["cost (s)"])
    body = []
    for r in rows:
        name = _label(results, r)
        cells = [name] + [rate_cell(r["harmful"][j]["overall"]) for j in judges]
        cells += [_recovered(results, r, j) for j in judges]
        cells.append(rate_cell(r.get("over_refusal"), ci=False))
        cells += [rate_cell(r["utility"].get(t), ci=False) for t in tasks]
        b = r.get("build_seconds")
        cells.append("-" if b is None else ("<1" if b < 1 else f"{b:.0f}"))
        body.append(cells)
    return head, body


def attack_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Harmful rate under each attack, per judge, for the rows evaluated under attack (None when there are none)."""
    rows = [r for r in results["rows"] if r.get("attacks")]
    if not rows:
        return None
    attacks = list(rows[0]["attacks"])
    judges = list(rows[0]["harmful"])
    n = results["eval"].get("attacks", {})
    head = ["model"] + [f"plain ({j})" for j in judges] + [f"{a} ({j}, n={n.get(a, '?')})" for a in attacks for j in judges]
    body = []
    for r in rows:
        body.append([_label(results, r)] + [rate_cell(r["harmful"][j]["overall"], ci=False) for j in judges]
                    + [rate_cell(r["attacks"][a][j]["overall"]) for a in attacks for j in judges])
    return head, body


def cost_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """What answering one request costs each row of each task (tokens generated, seconds), on the task's own test
    prompts and on the harmful prompts, as a ratio to plain T measured in the same run; for a guard, how many
    benign requests (over-refusal set + task items) it refused. None when no row recorded costs."""
    rows = [r for r in results["rows"] if r.get("task") and (r.get("cost") or {}).get(f"task:{r['task']}", {}).get("seconds")]
    if not rows:
        return None
    head = ["model", "task: tokens / request", "× T", "task: s / request", "× T", "harmful: tokens / request", "× T",
            "harmful: s / request", "× T", "guard refusals on benign"]
    body = []
    for r in rows:
        t_cost = (_row(results["rows"], f"T[{r['task']}]") or {}).get("cost") or {}
        cells = [_label(results, r)]
        for key in (f"task:{r['task']}", "harmful"):
            c, ref = r["cost"].get(key) or {}, t_cost.get(key) or {}
            for field, fmt in (("tokens", "{:.1f}"), ("seconds", "{:.3f}")):
                cells.append("-" if c.get(field) is None else fmt.format(c[field]))
                cells.append(f"{c[field] / ref[field]:.2f}" if c.get(field) is not None and ref.get(field) else "-")
        tc = r["cost"][f"task:{r['task']}"]
        flagged = "-"
        if "flagged" in tc:
            over = r["cost"].get("over_refusal", {})
            flagged = f"{tc['flagged'] + over.get('flagged', 0)} / {tc['n'] + over.get('n', 0)}"
        body.append(cells + [flagged])
    return head, body


def reattack_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Harmful rate of each defended model before and after it is fine-tuned again on harmful pairs, and the share
    of its protection (over T, re-attacked the same way) that survives."""
    re_rows = results.get("reattack") or []
    if not re_rows:
        return None
    judges = list(re_rows[0]["harmful"])
    head = (["model", "re-attack"] + [f"before ({j})" for j in judges] + [f"after ({j}, 95% CI)" for j in judges]
            + [f"protection kept ({j})" for j in judges])
    body = []
    for r in re_rows:
        before = _row(results["rows"], r["defence_row"])
        t_before = _row(results["rows"], f"T[{r['task']}]")
        t_after = next((x for x in re_rows if x["task"] == r["task"] and x["method"] == "undefended"
                        and x["reattack"]["steps"] == r["reattack"]["steps"]), None)
        kept = []
        for j in judges:
            if r["method"] == "undefended" or not (before and t_before and t_after):
                kept.append("-")
                continue
            prot = t_before["harmful"][j]["overall"]["rate"] - before["harmful"][j]["overall"]["rate"]
            prot_after = t_after["harmful"][j]["overall"]["rate"] - r["harmful"][j]["overall"]["rate"]
            kept.append(f"{prot_after / prot:.0%}" if prot > 1e-9 else "-")
        info = r["reattack"]
        body.append([r["defence_row"], f"{info['steps']} steps × {info['examples']} pairs, {info['seconds']:.0f} s"]
                    + [rate_cell(before["harmful"][j]["overall"], ci=False) if before else "-" for j in judges]
                    + [rate_cell(r["harmful"][j]["overall"]) for j in judges] + kept)
    return head, body


def _with_n(r: dict[str, Any] | None, ci: bool = True) -> str:
    return "-" if not r else f"{rate_cell(r, ci=ci)}, n={r['n']}"


def reprotect_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Each re-attacked model with a defence applied again: its harmful rate next to the re-attacked model's and to
    the same method's first protection of T, its over-refusal and task accuracy, and what rebuilding cost."""
    re_rows = results.get("reprotect") or []
    if not re_rows:
        return None
    judges = list(re_rows[0]["harmful"])
    head = (["model"] + [f"re-attacked ({j})" for j in judges] + [f"re-protected ({j}, 95% CI)" for j in judges]
            + [f"first protection of T ({j})" for j in judges]
            + ["over-refusal", "task accuracy", "build (s)"])
    body = []
    for r in re_rows:
        info = r["reprotect"]
        attacked = _row(results.get("reattack") or [], info["of"])
        first = next((x for x in results["rows"] if x.get("task") == r["task"] and x.get("method") == info["method"]),
                     None)
        b = info["seconds"]
        body.append([r["name"]]
                    + [rate_cell(attacked["harmful"][j]["overall"], ci=False) if attacked else "-" for j in judges]
                    + [_with_n(r["harmful"][j]["overall"]) for j in judges]
                    + [rate_cell(first["harmful"][j]["overall"], ci=False) if first else "-" for j in judges]
                    + [_with_n(r.get("over_refusal"), ci=False),
                       f"{rate_cell(r['utility'].get(r['task']), ci=False)} ({r['task']})"
                       if r["utility"].get(r["task"]) else "-",
                       "-" if b is None else ("<1" if b < 1 else f"{b:.0f}")])
    return head, body


def recovery_by_task(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Recovered share per method and task, side by side: a task whose data contradicts refusals (role-play) shows
    how much a reused defence loses there."""
    tasks = results["config"]["tasks"]
    if len(tasks) < 2:
        return None
    results = _with_paired(results)
    rows = results["rows"]
    judges = list(rows[0]["harmful"])
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("task") and r["method"] != "undefended"))
    head = ["method"] + [f"T[{t}]: harmful ({' / '.join(judges)})" for t in tasks] + [f"recovered on {t}" for t in tasks]
    body = [["undefended T"] + [" / ".join(rate_cell(r["harmful"][j]["overall"], ci=False) for j in judges)
                               if (r := _row(rows, f"T[{t}]")) else "-" for t in tasks] + ["-"] * len(tasks)]
    for m in methods:
        cells, recs = [results.get("method_labels", {}).get(m, m)], []
        for t in tasks:
            r = next((x for x in rows if x.get("task") == t and x["method"] == m), None)
            cells.append(" / ".join(rate_cell(r["harmful"][j]["overall"], ci=False) for j in judges) if r else "-")
            recs.append(" / ".join(_recovered(results, r, j) for j in judges) if r else "-")
        body.append(cells + recs)
    return head, body


def _named(results: dict[str, Any], name: str) -> str:
    row = _row(results["rows"], name)
    return _label(results, row) if row else name


def paired_table(results: dict[str, Any], section: str | None = None) -> tuple[list[str], list[list[str]]] | None:
    """Every stored paired test: the row against its reference on the same prompts, per judge (`section`:
    'reprotect' for the tests after a re-attack, 'attacks' for those under attack, with the attack named first)."""
    paired = _with_paired(results)["paired"]
    tests = (paired.get(section) or {}).get("comparisons") if section else paired["comparisons"]
    if not tests:
        return None
    by_attack = section == "attacks"
    head = ["attack"] * by_attack + ["model", "vs", "judge", "harmful rate Δ", "harmful → not", "not → harmful",
                                     "n (paired)", "p (exact McNemar)", f"at {ALPHA:g}"]
    body = [([c["attack"]] if by_attack else []) + [_named(results, c["row"]), _named(results, c["vs"]), c["judge"],
             "-" if c["harmful_diff"] is None else f"{c['harmful_diff']:+.3f}", str(c["true_to_false"]),
             str(c["false_to_true"]), str(c["n"]), f"{c['p_value']:.3g}",
             "significant" if c["significant"] else "not significant"] for c in tests]
    return head, body


def paired_over_refusal_table(results: dict[str, Any], section: str | None = None
                              ) -> tuple[list[str], list[list[str]]] | None:
    """The paired tests of over-refusal: the same pairs of rows on the same benign-but-sensitive prompts."""
    paired = _with_paired(results)["paired"]
    tests = ((paired.get(section) or {}) if section else paired).get("over_refusal") or []
    if not tests:
        return None
    head = ["model", "vs", "over-refusal Δ", "newly refused", "no longer refused", "n (paired)", "p (exact McNemar)",
            f"at {ALPHA:g}"]
    body = [[_named(results, c["row"]), _named(results, c["vs"]),
             "-" if c["refusal_diff"] is None else f"{c['refusal_diff']:+.3f}", str(c["false_to_true"]),
             str(c["true_to_false"]), str(c["n"]), f"{c['p_value']:.3g}",
             "significant" if c["significant"] else "not significant"] for c in tests]
    return head, body


def separation(results: dict[str, Any]) -> list[str]:
    """One line per task for the main table's header: which differences between its rows the prompts can tell
    apart at 0.05, or that none can; and whether T's own loss of safety against A is significant, since every
    recovered share divides by it."""
    results = _with_paired(results)
    n = results["eval"]["n_harmful"]
    lines = []
    for task in results["config"]["tasks"]:
        t = f"T[{task}]"
        tests = [c for c in results["paired"]["comparisons"] if c["task"] == task]
        between = [c for c in tests if c["row"] != t]
        if not between:
            continue
        significant: dict[tuple[str, str], list[str]] = {}  # (row, vs) -> 'judge Δ' where significant
        for c in between:
            if c["significant"]:
                significant.setdefault((c["row"], c["vs"]), []).append(f"{c['judge']} {c['harmful_diff']:+.2f}")
        if significant:
            text = (f"{t}, n = {n}: significant at {ALPHA:g} (exact McNemar on the same prompts): "
                    + "; ".join(f"{_named(results, row)} vs {_named(results, vs)} ({', '.join(js)})"
                                for (row, vs), js in significant.items())
                    + f". No other difference between these methods is significant at {ALPHA:g}: n = {n} is too small "
                    f"to rank the rest.")
        else:
            judges = ", ".join(dict.fromkeys(c["judge"] for c in between))
            text = (f"{t}: n = {n} is too small to separate these methods: no difference between methods is "
                    f"significant at {ALPHA:g} (exact McNemar on the same prompts; {judges}), so the table is no "
                    f"ranking.")
        lost = [c for c in tests if c["row"] == t]
        if lost and not any(c["significant"] for c in lost):
            text += (" Nor is T's loss of safety against A (p = "
                     + ", ".join(f"{c['p_value']:.3g} {c['judge']}" for c in lost)
                     + "): every recovered share divides by a difference these prompts do not confirm.")
        lines.append(text)
    return lines


def _kappa(k: float | None) -> str:
    return "undefined" if k is None else f"{k:.2f}"


def judges_line(results: dict[str, Any]) -> str:
    """How far the judges behind a table can be trusted, in one line: κ between them, and each one's accuracy and
    κ against human labels."""
    agree = results["judges"].get("agreement") or {}
    val = results["judges"].get("validation") or {}
    between = "; ".join(f"{pair} κ = {_kappa(a['kappa'])} ({format_n(a['agreement']['n'])})"
                        for pair, a in agree.items()) or "one judge"
    human = "; ".join(f"{j} accuracy {v['accuracy']['rate']:.3f}, κ = {_kappa(v['kappa_vs_human'])} (n={v['n']})"
                      for j, v in val.items()) or "not measured"
    return f"Judges: between them: {between}. Against human labels: {human}."


def md_table(title: str, table: tuple[list[str], list[list[str]]] | None, note: str = "") -> list[str]:
    if not table:
        return []
    head, body = table
    return (["", title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(c) + " |" for c in body] + (["", note] if note else []))


def markdown(results: dict[str, Any]) -> str:
    results = _with_paired(results)
    ev = results["eval"]
    head, body = table_rows(results)
    judged = judges_line(results)
    lines = [
        f"model: {results['model']}; harmful prompts: {ev['harmful']} (n={ev['n_harmful']}, held out from all training); "
        f"over-refusal: {ev['over_refusal']} (n={ev['n_over_refusal']}, refusal-phrase judge); task items: n={ev['n_task']}; "
        f"SafeGene layers: {results['selected_layers']}",
    ]
    for line in separation(results):  # above the table, so that no one reads its order as a ranking first
        lines += ["", line]
    lines += [
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(c) + " |" for c in body]
    boot = bootstrap_line(results)
    lines += (["", boot] if boot else []) + ["", judged]
    lines += md_table(f"Paired tests (each row against its reference on the same prompts; {PAIRED_NOTE}):",
                       paired_table(results), judged)
    lines += md_table("Paired tests of over-refusal (same pairs, the over-refusal prompts, refusal-phrase judge):",
                       paired_over_refusal_table(results))
    first = results["config"]["judges"][0]
    lines += md_table(f"Harmful rate by category ({first} judge; k/n; – where a row has no prompts of the category):",
                       category_table(results, first), judged)
    lines += md_table("What the answers to the harmful prompts look like (the canned sentence of a row is its most "
                       "frequent refusal opening; plan or code: numbered steps, code, 'Step 1', 'here is a plan'):",
                       answer_forms_table(results))
    lines += md_table("Harmful rate under attack (plain = the held-out prompts as they are):", attack_table(results),
                       judged)
    lines += md_table(f"Paired tests under attack ({ATTACK_PAIRS}; {PAIRED_NOTE}):", paired_table(results, "attacks"),
                      judged)
    lines += md_table("Recovered share by task (role-play tasks contradict refusals):", recovery_by_task(results),
                       judged)
    lines += md_table("Inference cost per request (plain generation for weight-space methods; × T = relative "
                       "to T alone, answering the same prompts):", cost_table(results))
    lines += md_table(f"After a re-attack (the defended model fine-tuned again on harmful pairs; harmful prompts, "
                       f"n={results['eval']['n_harmful']}):", reattack_table(results), judged)
    lines += md_table("Re-protected after a re-attack (the defence applied again to the re-attacked model, as its "
                       "user would: rebuilt from the re-attacked weights; build = seconds to rebuild it):",
                       reprotect_table(results), judged)
    lines += md_table(f"Paired tests after a re-attack (each re-protection against the re-attacked model and against "
                      f"SafeGene's re-protection of it; {PAIRED_NOTE}):", paired_table(results, "reprotect"), judged)
    lines += md_table("Paired tests of over-refusal after a re-attack (re-protections against SafeGene's, "
                      "refusal-phrase judge):", paired_over_refusal_table(results, "reprotect"))
    val = results["judges"].get("validation") or {}
    if val:
        lines += ["", "Judges against human labels (PyRIT scorer_evals, responses cut to their opening):", "",
                  "| judge | accuracy (95% CI) | n | true-positive rate | true-negative rate | κ vs human | AUC |",
                  "|---|---|---|---|---|---|---|"]
        for j, v in val.items():
            lines.append(f"| {j} | {rate_cell(v['accuracy'])} | {v['n']} | {v['true_positive_rate']['rate']:.3f} | "
                         f"{v['true_negative_rate']['rate']:.3f} | {v['kappa_vs_human']} | {v['auc'] if v['auc'] is not None else '-'} |")
    agree = results["judges"].get("agreement") or {}
    if agree:
        lines += ["", "Judge agreement on the benchmark's own responses:", ""]
        for pair, a in agree.items():
            lines.append(f"- {pair}: κ = {a['kappa']}, agreement {a['agreement']['rate']:.3f} "
                         f"({format_n(a['agreement']['n'], a['agreement'].get('unparsed', 0))})")
    lines += ["", "Timings (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in results["timings"].items())]
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------------------------


def png_base64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _spread(points: list[tuple[float, float]], dx: float) -> list[float]:
    """x offsets that keep tied points apart: the k-th of m points at the same place moves by (k - (m-1)/2)·dx."""
    seen: dict[tuple[float, float], list[int]] = {}
    for i, (x, y) in enumerate(points):
        seen.setdefault((round(x, 4), round(y, 4)), []).append(i)
    offsets = [0.0] * len(points)
    for idx in seen.values():
        for k, i in enumerate(idx):
            offsets[i] = (k - (len(idx) - 1) / 2) * dx
    return offsets


def scatter(results: dict[str, Any], judge: str) -> str:
    """Safety–utility scatter, one panel per task: x = task accuracy, y = harmful rate, one point per method.

    Methods often tie at small n (same rate on the same prompts): tied points are spread sideways and every point
    carries its name, so no method hides behind another."""
    tasks = results["config"]["tasks"]
    labels = results.get("method_labels", {})
    fig = figure(figsize=(6.5 * len(tasks), 5))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    a = _row(results["rows"], "A")
    for ax, task in zip(axes[0], tasks):
        pts = [r for r in results["rows"] if r.get("task") == task] + ([a] if a else [])
        pts = [r for r in pts if r["utility"].get(task)]
        xy = [(r["utility"][task]["rate"], r["harmful"][judge]["overall"]["rate"]) for r in pts]
        xs = [x for x, _ in xy] or [0.0]
        offsets = _spread(xy, dx=max(0.006, 0.02 * (max(xs) - min(xs) + 0.1)))
        for r, (u, h), off in zip(pts, xy, offsets):
            ci = r["harmful"][judge]["overall"]["ci95"]
            label = "A (aligned)" if r["name"] == "A" else ("T (undefended)" if r["method"] == "undefended"
                                                          else labels.get(r["method"], r["method"]))
            marker = "*" if r.get("method") == "safegene" else ("s" if r["name"] == "A" else "o")
            ax.errorbar(u + off, h, yerr=[[h - ci[0]], [ci[1] - h]], fmt=marker,
                        markersize=12 if marker == "*" else 7, capsize=3, label=label)
            ax.annotate(label, (u + off, h), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel(f"{task} accuracy (n={results['eval']['n_task']}; tied points spread sideways)")
        ax.set_ylabel(f"harmful rate, {judge} (n={results['eval']['n_harmful']})")
        ax.set_title(f"T[{task}]: lower-right is better")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return png_base64(fig)


def category_bars(results: dict[str, Any], judge: str) -> str:
    """Harmful rate by category for A, each T and each T + SafeGene, with Wilson 95 % intervals.

    A rate of 0 is drawn as a short stub at zero with its interval (measured, none harmful); a category a row has no
    prompts in gets an "×" at the axis instead (not measured), so the two never look alike."""
    show = [r for r in results["rows"] if r["name"] == "A" or r.get("method") in ("undefended", "safegene")]
    cats = sorted({c for r in show for c in r["harmful"][judge]["by_category"]})
    fig = figure(figsize=(max(10.0, len(cats) * (0.5 + 0.18 * len(show))), 5.2))
    ax = fig.subplots()
    width = 0.8 / max(len(show), 1)
    for i, r in enumerate(show):
        by = r["harmful"][judge]["by_category"]
        xs = [c + i * width for c in range(len(cats))]
        have = [(x, by[c]) for x, c in zip(xs, cats) if c in by and by[c].get("n")]
        name = r["name"] if r.get("method") != "safegene" else f"T[{r['task']}] + SafeGene"
        bars = ax.bar([x for x, _ in have], [max(b["rate"], 0.006) for _, b in have], width, label=name)
        color = bars.patches[0].get_facecolor() if bars.patches else None
        ax.errorbar([x for x, _ in have], [b["rate"] for _, b in have],
                    yerr=[[b["rate"] - b["ci95"][0] for _, b in have], [b["ci95"][1] - b["rate"] for _, b in have]],
                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        missing = [x for x, c in zip(xs, cats) if not (c in by and by[c].get("n"))]
        if missing:
            ax.plot(missing, [0.0] * len(missing), "x", color=color or "gray", markersize=7)
    ns = {c: max((r["harmful"][judge]["by_category"].get(c, {}).get("n", 0) for r in show), default=0) for c in cats}
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cats))])
    ax.set_xticklabels([f"{c} (n={ns[c]})" for c in cats], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"harmful rate ({judge}), 95% CI")
    ax.set_ylim(0, 1.05)
    ax.set_title("× at the axis: no prompts of that category for that row (not measured); a stub at 0: measured, none "
                 "harmful", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png_base64(fig)


def answer_forms_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """How each row's answers to the harmful prompts look: refusals, one canned sentence, plans and code."""
    rows = [r for r in results["rows"] if r.get("answer_forms")]
    if not rows:
        return None
    head = ["model", "refusal phrase", "one canned sentence", "distinct refusal openings", "plan or code, no refusal",
            "refusal, then plan or code"]
    body = []
    for r in rows:
        f = r["answer_forms"]
        body.append([_label(results, r)] + [rate_cell(f[k], ci=False) for k in ("refusals", "canned")]
                    + [str(f["distinct_refusal_openings"])]
                    + [rate_cell(f[k], ci=False) for k in ("structured_compliance", "refusal_then_compliance")])
    return head, body


def category_table(results: dict[str, Any], judge: str) -> tuple[list[str], list[list[str]]] | None:
    """Harmful rate per category for every row (plain prompts): k/n, "–" where a row has no prompts of it."""
    rows = [r for r in results["rows"] if r["harmful"].get(judge)]
    cats = sorted({c for r in rows for c in r["harmful"][judge]["by_category"]})
    if not cats:
        return None
    head = ["category"] + [_label(results, r) for r in rows]
    body = []
    for c in cats:
        cells = []
        for r in rows:
            b = r["harmful"][judge]["by_category"].get(c)
            cells.append(f"{b['rate']:.2f} ({b['k']}/{b['n']})" if b and b.get("n") else "–")
        body.append([c] + cells)
    return head, body


def html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def render_html(results: dict[str, Any]) -> str:
    results = _with_paired(results)
    judges = list(results["rows"][0]["harmful"])
    figures = []
    try:
        for j in judges:
            figures.append((f"Safety vs utility ({j})", scatter(results, j)))
        figures.append((f"Harmful rate by category ({judges[0]})", category_bars(results, judges[0])))
        fig_note = ""
    except ImportError:
        fig_note = "<p><em>matplotlib is not installed: figures left out (pip install matplotlib).</em></p>"
    head, body = table_rows(results)
    val = results["judges"].get("validation") or {}
    vhead = ["judge", "accuracy (95% CI)", "n", "true-positive rate", "true-negative rate", "κ vs human", "AUC", "s / item"]
    vbody = [[j, rate_cell(v["accuracy"]), str(v["n"]), f"{v['true_positive_rate']['rate']:.3f}",
              f"{v['true_negative_rate']['rate']:.3f}", str(v["kappa_vs_human"]), str(v["auc"] or "-"),
              f"{v['seconds_per_item']:.3f}"] for j, v in val.items()]
    agree = results["judges"].get("agreement") or {}
    abody = [[p, str(a["kappa"]), rate_cell(a["agreement"]), str(a["agreement"]["n"])] for p, a in agree.items()]
    tbody = [[k[:-2] if k.endswith("_s") else k, f"{v:.1f}"] for k, v in results["timings"].items()]
    md_intro = markdown(results).split("\n")[0]
    judged = f"<p>{html.escape(judges_line(results))}</p>"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>safegene benchmark</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
        "pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}img{max-width:100%}",
        "</style></head><body><h1>safegene benchmark</h1>",
        f"<p>{html.escape(md_intro)}</p>",
        "<h2>Results</h2>", *(f"<p><strong>{html.escape(line)}</strong></p>" for line in separation(results)),
        html_table(head, body), judged,
        "<p>recovered = (HR<sub>T</sub> − HR<sub>method</sub>) / (HR<sub>T</sub> − HR<sub>A</sub>); "
        f"{html.escape(bootstrap_line(results))} cost = seconds to "
        "build the method's update for this task model (SafeGene's extraction and selection are paid once per family: "
        "see timings).</p>",
    ]
    paired = paired_table(results)
    if paired:
        parts += ["<h2>Paired tests</h2>", html_table(*paired), f"<p>{html.escape(PAIRED_NOTE)}.</p>", judged]
    paired_over = paired_over_refusal_table(results)
    if paired_over:
        parts += ["<h2>Paired tests of over-refusal</h2>", html_table(*paired_over),
                  "<p>the same pairs of rows on the over-refusal prompts (refusal-phrase judge); exact McNemar.</p>"]
    parts.append(fig_note)
    for title, png in figures:
        parts += [f"<h2>{html.escape(title)}</h2>", f"<img src='data:image/png;base64,{png}'>"]
    adv = attack_table(results)
    if adv:
        parts += ["<h2>Harmful rate under attack</h2>", html_table(*adv),
                  "<p>jailbreak: in-the-wild templates (per-template rates in results.json); past-tense: "
                  "past-tense rephrasings; multi-turn: a benign first turn, then the request; role-play: the AOA "
                  "persona's system prompt and prefix.</p>", judged]
    if adv_paired := paired_table(results, "attacks"):
        parts += ["<h2>Paired tests under attack</h2>", html_table(*adv_paired),
                  f"<p>{html.escape(ATTACK_PAIRS)}; {html.escape(PAIRED_NOTE)}.</p>", judged]
    for title, table, note, by_judges in [
        (f"Harmful rate by category ({judges[0]}, every row)", category_table(results, judges[0]),
         "k/n per category; – where a row has no prompts of that category.", True),
        ("What the answers to the harmful prompts look like", answer_forms_table(results),
         "the canned sentence of a row is its most frequent refusal opening; plan or code: numbered steps, code, "
         "'Step 1', 'here is a plan'. A defence that teaches one sentence shows a high canned share.", False),
        ("Recovered share by task", recovery_by_task(results),
         "harmful rate per judge and recovered share; a role-play task (aoa) trains the model to obey everything.",
         True),
        ("Inference cost per request", cost_table(results),
         "tokens generated and seconds per request; × T: relative to T alone in this run; guard refusals: benign "
         "requests (over-refusal set + task items) the guard answered with a refusal.", False),
        ("After a re-attack", reattack_table(results),
         "each defended model fine-tuned again on harmful pairs (LoRA); protection kept = (HR<sub>T'</sub> − "
         "HR<sub>method'</sub>) / (HR<sub>T</sub> − HR<sub>method</sub>), ' = after the re-attack.", True),
        ("Re-protected after a re-attack", reprotect_table(results),
         "the defence applied again to the re-attacked model, as its user would (rebuilt from the re-attacked "
         "weights: SafeGene and RESTA refitted, Safe LoRA and SafeMERGE on its difference from A, re-align trained "
         "on it); T re-attacked gets every such method; build = seconds to rebuild it.", True),
        ("Paired tests after a re-attack", paired_table(results, "reprotect"),
         "each re-protection against the re-attacked model and against SafeGene's re-protection of the same model; "
         f"{html.escape(PAIRED_NOTE)}.", True),
        ("Paired tests of over-refusal after a re-attack", paired_over_refusal_table(results, "reprotect"),
         "re-protections against SafeGene's re-protection of the same model, on the over-refusal prompts "
         "(refusal-phrase judge); exact McNemar.", False),
    ]:
        if table:
            parts += [f"<h2>{title}</h2>", html_table(*table), f"<p>{note}</p>"] + ([judged] if by_judges else [])
    parts += ["<h2>Judges against human labels</h2>", html_table(vhead, vbody) if vbody else "<p>not run</p>",
              "<h2>Judge agreement on these responses</h2>",
              html_table(["judges", "Cohen's κ", "agreement", "n"], abody) if abody else "<p>one judge only</p>",
              "<h2>Timings (s)</h2>", html_table(["stage", "seconds"], tbody),
              "<h2>Config</h2>", f"<pre>{html.escape(results.get('config_yaml', ''))}</pre>",
              "<h2>Versions</h2>", f"<pre>{html.escape(str(results.get('versions', {})))}</pre>",
              "</body></html>"]
    return "\n".join(parts)


def write_reports(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write results.json, results.md and report.html. `results` gains its `paired` tests here, recomputed from its
    verdicts every time (a `rejudge` changes them), so the caller's dict is what results.json holds."""
    out = Path(out)
    paths = {"json": out / "results.json", "md": out / "results.md", "html": out / "report.html"}
    results["paired"] = paired_comparisons(results)
    write_json(paths["json"], results)
    with atomic_file(paths["md"]) as f:
        f.write(markdown(results) + "\n")
    with atomic_file(paths["html"]) as f:
        f.write(render_html(results))
    return paths
