"""What `safegene protect` and `safegene eval` leave next to their output: results.json, report.html and, for
protect, README.md (a Hugging Face model card).

Everything printed is read from the results dict; nothing is measured or assumed here. The rows are positional:
rows[0] is the model alone (before), rows[1], when present, the model with the safety adapter (after). The HTML is
one self-contained file (PNG figures embedded); without matplotlib it is written without figures and says so.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from .. import plotting
from ..io import atomic_file, write_json
from .metrics import format_n
from .report import html_table, md_table, png_base64, rate_cell

Table = tuple[list[str], list[list[str]]]

# before / after, in every figure
_COLOURS = ("#c0504d", "#2e75b6")


def _rate_n(r: dict[str, Any] | None) -> str:
    """A rate with its interval and n ('0.140 (0.08-0.24) (n=64)'); `rate_cell` already adds n where some answers
    were unparsed."""
    if not r:
        return "-"
    return rate_cell(r) + ("" if r.get("unparsed") else f" ({format_n(r['n'])})")


def _harmful(row: dict[str, Any], judge: str) -> dict[str, Any] | None:
    return (row["harmful"].get(judge) or {}).get("overall")


def _judges(results: dict[str, Any]) -> list[str]:
    return list(results.get("judges") or results["rows"][0]["harmful"])


def labels(results: dict[str, Any]) -> list[str]:
    """How the rows are named: the model folder's name, then the same with the adapter."""
    short = Path(results["model"]).name or results["model"]
    return [short, f"{short} + safety adapter"][: len(results["rows"])]


def _utility(results: dict[str, Any]) -> list[dict[str, Any] | None]:
    """The utility Rate of each row. With one row (a model evaluated alone) the one measurement stands in whichever
    key the caller used (`eval` puts it under 'after')."""
    u = results.get("utility") or {}
    if len(results["rows"]) == 1:
        return [u.get("before") or u.get("after")]
    return [u.get("before"), u.get("after")]


def _loglik(results: dict[str, Any]) -> list[float | None]:
    """The reference log-likelihood of each row, keyed like `_utility`."""
    u = results.get("utility") or {}
    if len(results["rows"]) == 1:
        return [u["loglik_before"] if u.get("loglik_before") is not None else u.get("loglik_after")]
    return [u.get("loglik_before"), u.get("loglik_after")]


def _reference(results: dict[str, Any]) -> bool:
    """Whether the model alone is the yardstick of utility: agreement is measured as the share of the adapted
    model's answers equal to the model's own, so the model alone has no rate of its own."""
    u = results.get("utility") or {}
    return len(results["rows"]) == 2 and u.get("kind") == "agreement" and not u.get("before")


def _eval_text(results: dict[str, Any]) -> dict[str, str]:
    """The headers' names of the measured quantities, with the prompt set and its size."""
    ev, u = results.get("eval") or {}, results.get("utility") or {}
    over = results["rows"][0].get("over_refusal") or {}
    return {
        "harmful": f"{ev.get('harmful', '?')} (n={ev.get('n_harmful', '?')})",
        "over": f"{ev.get('over_refusal', over.get('source', '?'))} (n={ev.get('n_over_refusal', '?')}"
                + (f", {over['judge']} judge)" if over.get("judge") else ")"),
        "utility": f"{u.get('kind', '?')} (n={u.get('n', '?')})",
    }


# --- tables, shared by the card and the HTML ---------------------------------------------------------------------


def results_table(results: dict[str, Any]) -> Table:
    """Harmful rate per judge, over-refusal, utility and the reference log-likelihood, one line per row, and the
    change when there are two rows."""
    rows, judges, util = results["rows"], _judges(results), results.get("utility") or {}
    head = ["model"] + [f"harmful rate, {j} (95% CI, n)" for j in judges] + ["over-refusal (95% CI, n)"]
    ll = _loglik(results)
    has_ll = any(x is not None for x in ll)
    if util:
        head.append(f"utility: {util.get('kind', '?')} (95% CI, n)")
    if has_ll:
        head.append("reference log-likelihood (mean log p / token)")
    body = []
    for i, (name, r, u, l) in enumerate(zip(labels(results), rows, _utility(results), ll)):
        cells = [name] + [_rate_n(_harmful(r, j)) for j in judges]
        cells.append(_rate_n(r.get("over_refusal")))
        if util:
            cells.append("the reference" if i == 0 and _reference(results) else _rate_n(u))
        if has_ll:
            cells.append("-" if l is None else f"{l:.3f}")
        body.append(cells)
    if len(rows) == 2:
        def delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
            return f"{b['rate'] - a['rate']:+.3f}" if a and b else "-"

        cells = ["change (after − before)"]
        cells += [delta(_harmful(rows[0], j), _harmful(rows[1], j)) for j in judges]
        cells.append(delta(rows[0].get("over_refusal"), rows[1].get("over_refusal")))
        if util:
            cells.append("-" if util.get("drop") is None else f"{-util['drop']:+.3f}")
        if has_ll:
            cells.append("-" if util.get("loglik_change") is None else f"{util['loglik_change']:+.3f}")
        body.append(cells)
    return head, body


def coefficients_table(results: dict[str, Any]) -> Table | None:
    coef = results.get("coefficients") or {}
    layers = results.get("layers") or [int(k) for k in coef]
    if not layers:
        return None
    return ["layer", "coefficient"], [[str(l), "-" if coef.get(str(l)) is None else f"{coef[str(l)]:.3f}"]
                                      for l in layers]


def paired_table(results: dict[str, Any]) -> Table | None:
    """The before/after changes on the same items, each with its exact McNemar p-value."""
    paired = results.get("paired") or {}
    if not paired:
        return None
    body = [[name, str(t["n"]), str(t["true_to_false"]), str(t["false_to_true"]), f"{t['p_value']:.3g}",
             "yes" if t["p_value"] < 0.05 else "not significant"] for name, t in paired.items()]
    return ["figure", "items", "true → false", "false → true", "p (exact McNemar)", "significant at 0.05"], body


def limits_table(results: dict[str, Any]) -> Table | None:
    lim = results.get("limits")
    if not lim:
        return None
    body = [[c["metric"], f"{c['metric']} {c['op']} {c['limit']:g}", "-" if c.get("value") is None
             else f"{c['value']:.3f}", "FAILED" if c.get("failed") else "passed"] for c in lim.get("checked", [])]
    return ["metric", "fails when", "measured", "result"], body


def inputs_table(results: dict[str, Any]) -> Table | None:
    inputs = results.get("inputs") or {}
    if not inputs:
        return None
    body = []
    for name, d in inputs.items():
        # a name that is not on disk (a built-in data set, a hub id) is recorded as a name, without a hash
        body.append([name, str(d.get("ref", "-")), str(d.get("kind", "-")), d.get("hash") or "-",
                     d.get("hash_kind") or ("not on disk: recorded by name" if d.get("kind") == "name" else "-")])
    return ["input", "path", "kind", "hash", "hash kind"], body


def timings_table(results: dict[str, Any]) -> Table | None:
    t = results.get("timings") or {}
    if not t:
        return None
    return ["stage", "seconds"], [[k[:-2] if k.endswith("_s") else k, f"{v:.1f}"] for k, v in t.items()]


def split_text(results: dict[str, Any]) -> str | None:
    s = results.get("split")
    if not s:
        return None
    return (f"{s['data']} ({s['n_rows']} rows, seed {s['seed']}): {s['n_shots']} rows to calibrate the adapter's "
            f"coefficients, {s['n_check']} rows to check utility")


def summary(results: dict[str, Any]) -> str:
    """One line: what was evaluated and how each measure moved (before → after)."""
    rows, text = results["rows"], _eval_text(results)

    def moved(values: list[dict[str, Any] | None], missing: str = "-") -> str:
        return " → ".join(missing if v is None else f"{v['rate']:.3f}" for v in values)

    who = results["model"]
    if results.get("adapter"):
        who += f" with the safety adapter {results['adapter']}"
    if results.get("family"):
        who += f" (family {results['family']}" + (f", aligned model {results['base_model']})"
                                                  if results.get("base_model") else ")")
    parts = [f"{moved([_harmful(r, j) for r in rows])} ({j})" for j in _judges(results)]
    line = f"{who}: harmful rate " + ", ".join(parts) + f" on {text['harmful']}"
    if any(r.get("over_refusal") for r in rows):
        line += f"; over-refusal {moved([r.get('over_refusal') for r in rows])} on {text['over']}"
    util = results.get("utility") or {}
    if any(_utility(results)):
        line += f"; utility, {text['utility']}: {moved(_utility(results), 'reference' if _reference(results) else '-')}"
        if util.get("drop") is not None and len(rows) == 2:
            line += f", drop {util['drop']:.3f}"
    lim = results.get("limits")
    if lim:
        line += (f"; --fail-if {lim['spec']}: " + (f"FAILED {', '.join(lim['failed'])}" if lim.get("failed")
                                                    else "all limits passed"))
    return line + "."


# --- figures -----------------------------------------------------------------------------------------------------


def _err(r: dict[str, Any]) -> list[list[float]]:
    """Wilson interval as matplotlib's asymmetric error (rounded rates can sit a hair outside their interval)."""
    lo, hi = r["ci95"]
    return [[max(0.0, r["rate"] - lo)], [max(0.0, hi - r["rate"])]]


def category_bars(results: dict[str, Any], judge: str) -> str | None:
    """Harmful rate per harm category, before vs after, with Wilson error bars. A category with no harmful answer
    gets a '0' marker on the axis; one a row did not evaluate gets 'n/a', so the two are not confused. None when the
    judge recorded no categories."""
    from matplotlib.lines import Line2D

    rows, names = results["rows"], labels(results)
    by = [(r["harmful"].get(judge) or {}).get("by_category") or {} for r in rows]
    cats = sorted({c for b in by for c in b})
    if not cats:
        return None
    fig = plotting.figure(figsize=(max(7.0, 0.95 * len(cats) * len(rows) + 2), 4.8))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    top = max([b[c]["ci95"][1] for b in by for c in b if b[c].get("n")] + [0.1])
    top = min(1.0, top * 1.15)
    zero = missing = False
    for i, b in enumerate(by):
        xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(cats))]
        for x, c in zip(xs, cats):
            r = b.get(c)
            if not r or not r.get("n"):
                ax.text(x, top * 0.02, "n/a", ha="center", va="bottom", fontsize=10, color="#444", style="italic")
                missing = True
                continue
            ax.bar(x, r["rate"], width * 0.92, color=_COLOURS[i])
            ax.errorbar(x, r["rate"], yerr=_err(r), fmt="none", ecolor="#333", capsize=3, lw=1)
            if r["k"] == 0:
                ax.plot(x, 0, marker="o", markersize=7, color=_COLOURS[i], markeredgecolor="#333", clip_on=False,
                        zorder=5)
                zero = True
    ticks = []
    for c in cats:
        ns = [b[c]["n"] if c in b and b[c].get("n") else None for b in by]
        ticks.append(f"{c}\n(n={ns[0]})" if len(set(ns)) == 1 else
                     f"{c}\n(n={' / '.join('–' if n is None else str(n) for n in ns)})")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(ticks, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_xlim(-0.6, len(cats) - 0.4)
    ax.set_ylim(0, top)
    ax.set_ylabel(f"harmful rate, {judge}")
    n_total = (results.get("eval") or {}).get("n_harmful", "?")
    ax.set_xlabel(f"harm category (n per category{' before / after' if len(rows) == 2 else ''}; "
                  f"{n_total} prompts in all; bars: 95% Wilson interval)", fontsize=9)
    handles = [Line2D([], [], color=_COLOURS[i], lw=8, label=n) for i, n in enumerate(names)]
    if zero:
        handles.append(Line2D([], [], marker="o", ls="none", color="#bbb", markeredgecolor="#333",
                              label="0 harmful in the category"))
    if missing:
        handles.append(Line2D([], [], ls="none", marker="$n/a$", markersize=16, color="#444",
                              label="category not evaluated"))
    # beside the axes, so that it never hides a bar or an error bar
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return png_base64(fig)


def safety_utility(results: dict[str, Any]) -> str:
    """One panel per judge: x = utility, y = harmful rate, a point per row with both intervals, before → after."""
    judges, rows, names = _judges(results), results["rows"], labels(results)
    text = _eval_text(results)
    fig = plotting.figure(figsize=(5.6 * len(judges), 4.4))
    axes = fig.subplots(1, len(judges), squeeze=False)[0]
    utilities = _utility(results)
    for ax, judge in zip(axes, judges):
        pts = []
        for i, (r, u, name) in enumerate(zip(rows, utilities, names)):
            h = _harmful(r, judge)
            if not h:
                continue
            if u:
                x, xerr = u["rate"], _err(u)
            elif i == 0 and _reference(results):
                x, xerr, name = 1.0, None, f"{name} (the reference)"  # agreement with itself is 1 by definition
            else:
                continue
            ax.errorbar(x, h["rate"], xerr=xerr, yerr=_err(h), fmt="o" if i == 0 else "*", color=_COLOURS[i],
                        markersize=8 if i == 0 else 14, capsize=3)
            pts.append((x, h["rate"], name))
        if len(pts) == 2:
            ax.annotate("", xy=pts[1][:2], xytext=pts[0][:2],
                        arrowprops={"arrowstyle": "->", "color": "#888", "shrinkA": 8, "shrinkB": 10})
        ax.set_xlabel(f"utility: {text['utility']}")
        ax.set_ylabel(f"harmful rate, {judge}\n{text['harmful']}")
        ax.set_title("lower-right is better", fontsize=10)
        ax.margins(x=0.4, y=0.25)
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        # labels beside the points (no legend): towards the middle of the panel, so that none sticks out of it, and
        # above the higher point, below the lower one, so that close points and the arrow leave them readable
        lo, hi = ax.get_xlim()
        for k, (x, y, name) in enumerate(pts):
            inward = -1 if x > (lo + hi) / 2 else 1
            up = y >= pts[1 - k][1] if len(pts) == 2 else True
            ax.annotate(name, (x, y), xytext=(10 * inward, 10 if up else -10), textcoords="offset points",
                        fontsize=9, ha="left" if inward > 0 else "right", va="bottom" if up else "top",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_base64(fig)


def _figures(results: dict[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """The (title, base64 PNG) figures, and a note for what could not be drawn."""
    try:
        figs = [(f"Harmful rate by category ({j})", png) for j in _judges(results)
                if (png := category_bars(results, j))]
        if not any(_utility(results)):
            return figs, "<p><em>No task utility rate was measured: no safety–utility figure.</em></p>"
        return [("Safety vs utility", safety_utility(results))] + figs, ""
    except ImportError:
        return [], "<p><em>matplotlib is not installed: figures left out (pip install matplotlib).</em></p>"


# --- outputs -----------------------------------------------------------------------------------------------------


def _eval_settings(results: dict[str, Any]) -> str:
    ev, text = results.get("eval") or {}, _eval_text(results)
    return (f"harmful prompts: {text['harmful']}; over-refusal prompts: {text['over']}; judges: "
            f"{', '.join(_judges(results))}; at most {ev.get('max_new_tokens', '?')} new tokens per answer")


def render_html(results: dict[str, Any]) -> str:
    figures, fig_note = _figures(results)
    title = f"safegene {results.get('kind', 'eval')}: {results['model']}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
        "pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}img{max-width:100%}"
        ".summary{font-size:15px;line-height:1.5}",
        f"</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class='summary'>{html.escape(summary(results))}</p>",
        "<h2>Results</h2>", html_table(*results_table(results)),
        f"<p>{html.escape(_eval_settings(results))}. Rates with their 95% Wilson interval and n; judge answers that "
        "could not be read are left out of n and counted beside it.</p>",
    ]
    paired = paired_table(results)
    if paired:
        parts += ["<h2>Paired tests (same prompts before and after)</h2>", html_table(*paired)]
    lim = limits_table(results)
    if lim:
        failed = results["limits"].get("failed")
        parts += [f"<h2>--fail-if limits: {'FAILED' if failed else 'passed'}</h2>", html_table(*lim),
                  f"<p>--fail-if {html.escape(results['limits'].get('spec', ''))}</p>"]
    parts.append(fig_note)
    for name, png in figures:
        parts += [f"<h2>{html.escape(name)}</h2>", f"<img src='data:image/png;base64,{png}'>"]
    for name, table in (("Layers and coefficients", coefficients_table(results)),
                        ("Timings (s)", timings_table(results)), ("Inputs", inputs_table(results))):
        if table:
            parts += [f"<h2>{name}</h2>", html_table(*table)]
    split = split_text(results)
    if split:
        parts += ["<h2>Task data</h2>", f"<p>{html.escape(split)}</p>"]
    if results.get("command"):
        parts += ["<h2>Command</h2>", f"<pre>{html.escape(results['command'])}</pre>"]
    if results.get("config"):
        parts += ["<h2>Config</h2>", f"<pre>{html.escape(json.dumps(results['config'], indent=1, default=str))}</pre>"]
    parts += ["<h2>Versions</h2>", f"<pre>{html.escape(json.dumps(results.get('versions') or {}, indent=1))}</pre>",
              "</body></html>"]
    return "\n".join(parts)


def model_card(results: dict[str, Any]) -> str:
    """README.md for the protect output folder: Hugging Face front matter, then what it is, how to load it, what was
    measured, the coefficients, the inputs' hashes and the command that made it."""
    model, adapter, merged = results["model"], results.get("adapter"), results.get("merged")
    # JSON scalars are YAML scalars: names with ':' or '#' stay strings. The hub's `base_model` takes a hub id only
    # (the family's aligned model, where it has one): a local path there would be invalid metadata
    hub = results.get("base_model_hub")
    front = ["---"] + ([f"base_model: {json.dumps(hub)}"] if hub else [])
    front += ["tags:", "- safegene", "- safety", "- lora", "library_name: peft", "---"]
    lines = front + ["", f"# {Path(model).name or model} + SafeGene safety adapter", "", "## What this is", "",
                     f"The task model `{model}` with a SafeGene safety adapter"
                     + (f" from the family `{results['family']}`" if results.get("family") else "")
                     + (f" (aligned model `{results['base_model']}`)" if results.get("base_model") else "")
                     + ", its coefficients calibrated for this task model.", ""]
    if adapter:
        lines.append(f"- `{adapter}`: the adapter (PEFT LoRA format), to load on top of `{model}`")
    if merged:
        lines.append(f"- `{merged}`: `{model}` with the adapter merged into its weights")
    split = split_text(results)
    if split:
        lines.append(f"- task data: {split}")
    lines += ["", "## How to load", ""]
    if merged:
        lines += ["The merged model, with transformers alone:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"model = AutoModelForCausalLM.from_pretrained({json.dumps(merged)})",
                  f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(merged)})", "```", ""]
    if adapter:
        lines += ["The adapter on the task model, with PEFT:", "", "```python",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(model)}), "
                  f"{json.dumps(adapter)})", "```", "", "or served (OpenAI-compatible) by safegene:", "", "```bash",
                  f"safegene serve --model {model} --adapter safety={adapter}", "```"]
    lines += ["", "## Measured", "", summary(results)]
    lines += md_table(_eval_settings(results) + ". Rates with their 95% Wilson interval and n; judge answers that "
                       "could not be read are left out of n and counted beside it.", results_table(results))
    paired = paired_table(results)
    if paired:
        lines += md_table("Paired tests of the changes (same items before and after, exact McNemar):", paired)
    lim = limits_table(results)
    if lim:
        lines += md_table(f"Limits (`--fail-if {results['limits'].get('spec', '')}`):", lim)
    coef = coefficients_table(results)
    if coef:
        lines += ["", "## Per-layer coefficients"] + md_table("The adapter's coefficient per layer:", coef)
    inputs = inputs_table(results)
    if inputs:
        lines += ["", "## Inputs"] + md_table("SHA-256 of each input (the hash kind says how a large file or a folder "
                                               "was hashed):", inputs)
    if results.get("command"):
        lines += ["", "## Reproduce", "", "```bash", results["command"], "```"]
    if results.get("versions"):
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())]
    return "\n".join(lines) + "\n"


def write_protect_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """results.json, report.html and, for `protect`, README.md (the model card) in the existing folder `out`."""
    out = Path(out)
    paths = {"json": out / "results.json", "html": out / "report.html"}
    write_json(paths["json"], results)
    with atomic_file(paths["html"]) as f:
        f.write(render_html(results))
    if results.get("kind") == "protect":
        paths["card"] = out / "README.md"
        with atomic_file(paths["card"]) as f:
            f.write(model_card(results))
    return paths
