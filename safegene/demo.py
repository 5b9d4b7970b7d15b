"""`safegene demo`: the SafeGene pipeline end to end on the embedded default model, with a table at the end.

A (aligned) -> degrade -> D;  A -> task fine-tunes (a little poison mixed in) -> T_task;
extract (A - D) -> select layers (on D) -> recalibrate per T_task -> evaluate A, D, T, T + SafeGene.

Every stage writes its artifact under the output folder and reuses one whose recorded config matches, so an
interrupted demo picks up where it stopped. The table goes to stdout and summary.{json,md}.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import (DegradeConfig, ExtractConfig, FinetuneConfig, GenerationConfig, LoraTrainConfig,
                     RecalibrateConfig, SelectConfig, to_dict)
from .data import get_task, harmful_prompts, shared_data_dir
from .io import atomic_file, write_json
from .models import DEFAULT_MODEL, load_model, load_tokenizer, prepare_model
from .training import RUN_CARD, degrade, finetune


@dataclass
class DemoPreset:
    n_eval_harmful: int
    n_eval_task: int
    degrade_examples: int
    degrade_steps: int
    task_examples: int
    task_steps: int
    poison_ratio: float
    learning_rate: float
    max_new_tokens: int
    select_prompts: int
    top_k: int
    recal_shots: int
    recal_steps: int
    tasks: list[str] = field(default_factory=list)


def preset(quick: bool) -> DemoPreset:
    # tasks with exact answers; the shared folder adds the field's standard classification task when present
    tasks = ["arithmetic", "sst2" if shared_data_dir() else "gsm8k-100"]
    if quick:
        return DemoPreset(n_eval_harmful=24, n_eval_task=24, degrade_examples=40, degrade_steps=10, task_examples=40,
                          task_steps=10, poison_ratio=0.1, learning_rate=4e-4, max_new_tokens=32, select_prompts=12,
                          top_k=8, recal_shots=16, recal_steps=10, tasks=tasks[:1])
    return DemoPreset(n_eval_harmful=100, n_eval_task=100, degrade_examples=160, degrade_steps=40, task_examples=160,
                      task_steps=40, poison_ratio=0.1, learning_rate=2e-4, max_new_tokens=40, select_prompts=32,
                      top_k=8, recal_shots=32, recal_steps=30, tasks=tasks)


def _same(a: Any, cfg: Any) -> bool:
    return a == json.loads(json.dumps(to_dict(cfg)))


def _read_card(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train_stage(name: str, output: Path, cfg: Any, fn: Callable, overwrite: bool) -> dict[str, Any]:
    card = _read_card(output / RUN_CARD)
    if card and not overwrite and _same(card.get("config"), cfg):
        print(f"[{name}] reusing {output}")
        return card
    print(f"[{name}] training -> {output}")
    return fn(cfg, overwrite=True)


def _adapter_stage(name: str, output: Path, key: str, cfg: Any, build: Callable, overwrite: bool):
    """Reuse an adapter folder whose card records the same config under `key`, else build and save it."""
    from .adapter import SafetyAdapter

    card = _read_card(output / "safegene.json")
    section = (card or {}).get(key) if key else card
    if card and not overwrite and section and _same(section.get("config"), cfg):
        print(f"[{name}] reusing {output}")
        return SafetyAdapter.load(output)
    print(f"[{name}] -> {output}")
    return build()


def _evaluate(label: str, model: Any, tok: Any, prompts, tasks: list[str], p: DemoPreset) -> dict[str, Any]:
    from .evaluation import refusal_rate, task_utility

    gen = GenerationConfig(max_new_tokens=p.max_new_tokens, batch_size=8)
    out: dict[str, Any] = {"refusal": refusal_rate(model, tok, prompts, gen), "utility": {}}
    for task in tasks:
        out["utility"][task] = task_utility(model, tok, task, n=p.n_eval_task)
    msg = f"[{label}] refusal {out['refusal']['refusal']['rate']:.3f} (n={out['refusal']['refusal']['n']})"
    for task, u in out["utility"].items():
        msg += f", {task} accuracy {u['accuracy']['rate']:.3f} (n={u['accuracy']['n']})"
    print(msg)
    return out


def run_demo(output: str | Path = "runs/demo", quick: bool = False, overwrite: bool = False,
             model: str | None = None) -> dict[str, Any]:
    from .adapter import extract_adapter
    from .selection import plot_layer_scores, select_layers

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    p = preset(quick)
    aligned = model or DEFAULT_MODEL
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if aligned == DEFAULT_MODEL:
        t = time.perf_counter()
        prepare_model(aligned)
        timings["prepare_model_s"] = round(time.perf_counter() - t, 1)
    prompts = harmful_prompts("advbench", n=p.n_eval_harmful, seed=0)
    train = dict(batch_size=4, max_length=96, learning_rate=p.learning_rate)
    rows: dict[str, dict[str, Any]] = {}

    a_model, a_tok = load_model(aligned), load_tokenizer(aligned)
    rows["A"] = _evaluate("A", a_model, a_tok, prompts, p.tasks, p)
    del a_model

    dcfg = DegradeConfig(model=aligned, n_examples=p.degrade_examples, output=str(out / "degraded"),
                         train=LoraTrainConfig(max_steps=p.degrade_steps, **train))
    timings["degrade_s"] = _train_stage("degrade", out / "degraded", dcfg, degrade, overwrite)["training"]["seconds"]
    d_model, d_tok = load_model(out / "degraded"), load_tokenizer(out / "degraded")
    rows["D"] = _evaluate("D", d_model, d_tok, prompts, [], p)

    task_models = {}
    for task in p.tasks:
        # small tasks (gsm8k-100 has 60 train items) get fewer examples, keeping the poison ratio
        n_task = min(p.task_examples, int(len(get_task(task).load("train")) / (1 - p.poison_ratio)))
        fcfg = FinetuneConfig(model=aligned, task=task, n_examples=n_task, poison_ratio=p.poison_ratio, save="adapter",
                              output=str(out / f"task-{task}"), train=LoraTrainConfig(max_steps=p.task_steps, **train))
        card = _train_stage(f"finetune {task}", out / f"task-{task}", fcfg, finetune, overwrite)
        timings[f"finetune_{task}_s"] = card["training"]["seconds"]
        task_models[task] = str(out / f"task-{task}")

    # --- SafeGene: extract once, select once, recalibrate per task model -----------------------------------------
    ecfg = ExtractConfig(aligned=aligned, degraded=str(out / "degraded"), output=str(out / "adapter"))
    t = time.perf_counter()
    adapter = _adapter_stage("extract", out / "adapter", "", ecfg,
                             lambda: extract_adapter(ecfg, overwrite=True), overwrite)
    timings["extract_s"] = round(time.perf_counter() - t, 1)
    scfg = SelectConfig(model=str(out / "degraded"), n_harmful=p.select_prompts, n_benign=p.select_prompts, top_k=p.top_k)

    def build_selection(model: Any, tok: Any):
        sel = select_layers(adapter, scfg, model=model, tokenizer=tok)
        sel.save(out / "adapter-selected", overwrite=True, plot=lambda d: plot_layer_scores(sel, d / "layer_scores.png"))
        return sel

    t = time.perf_counter()
    selected = _adapter_stage("select", out / "adapter-selected", "selection", scfg,
                              functools.partial(build_selection, d_model, d_tok), overwrite)
    timings["select_s"] = round(time.perf_counter() - t, 1)
    del d_model
    print(f"[select] layers {selected.layers}")

    for task, t_ref in task_models.items():
        t_model, t_tok = load_model(t_ref), load_tokenizer(t_ref)
        rows[f"T[{task}]"] = _evaluate(f"T[{task}]", t_model, t_tok, prompts, [task], p)
        rcfg = RecalibrateConfig(task_model=t_ref, task=task, n_harmful=p.recal_shots, n_task=p.recal_shots,
                                 steps=p.recal_steps)

        t = time.perf_counter()
        calibrated = _adapter_stage(f"recalibrate {task}", out / f"adapter-{task}", "recalibration", rcfg,
                                    functools.partial(_calibrate, selected, rcfg, t_model, t_tok, out / f"adapter-{task}"),
                                    overwrite)
        timings[f"recalibrate_{task}_s"] = round(time.perf_counter() - t, 1)
        print(f"[recalibrate {task}] α = " + ", ".join(f"{l}:{calibrated.coefficients[l]:.2f}" for l in calibrated.layers))
        with calibrated.attach(t_model):
            rows[f"T[{task}]+SafeGene"] = _evaluate(f"T[{task}]+SafeGene", t_model, t_tok, prompts, [task], p)
        del t_model
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    summary = {"preset": to_dict(p), "model": aligned, "judge": "refusal-phrase", "eval_prompts": "advbench",
               "selected_layers": selected.layers, "rows": rows, "timings": timings}
    write_json(out / "summary.json", summary)
    table = render_table(summary)
    with atomic_file(out / "summary.md") as f:
        f.write(table + "\n")
    print()
    print(table)
    print(f"\nwrote {out / 'summary.json'} and {out / 'summary.md'} in {timings['total_s']:.0f} s")
    return summary


def _calibrate(adapter: Any, cfg: RecalibrateConfig, model: Any, tok: Any, output: Path):
    from .recalibration import recalibrate

    cal = recalibrate(adapter, cfg, model=model, tokenizer=tok)
    cal.save(output, overwrite=True)
    return cal


def recovery(rows: dict[str, Any], name: str) -> float | None:
    """Share of the refusals lost by fine-tuning that SafeGene gives back: (R_T+SG - R_T) / (R_A - R_T)."""
    if not name.endswith("+SafeGene"):
        return None
    base = name[: -len("+SafeGene")]
    ra, rt, rs = (rows[k]["refusal"]["refusal"]["rate"] for k in ("A", base, name))
    return (rs - rt) / (ra - rt) if ra != rt else None


def render_table(summary: dict[str, Any]) -> str:
    tasks = summary["preset"]["tasks"]
    lines = [
        f"model: {summary['model']}; harmful prompts: {summary['eval_prompts']} (held out from all training); "
        f"judge: {summary['judge']}; SafeGene layers: {summary.get('selected_layers')}",
        "",
        "| model | refusal rate (95% CI) | harmful rate | n | recovered | " + " | ".join(f"{t} accuracy (n)" for t in tasks) + " |",
        "|---|---|---|---|---|" + "---|" * len(tasks),
    ]
    for name, r in summary["rows"].items():
        ref = r["refusal"]["refusal"]
        rec = recovery(summary["rows"], name)
        cells = []
        for t in tasks:
            u = r["utility"].get(t)
            cells.append(f"{u['accuracy']['rate']:.3f} ({u['accuracy']['n']})" if u else "-")
        lines.append(f"| {name} | {ref['rate']:.3f} ({ref['ci95'][0]:.2f}-{ref['ci95'][1]:.2f}) | {1 - ref['rate']:.3f} | "
                     f"{ref['n']} | {'-' if rec is None else f'{rec:.0%}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
