"""`safegene demo`: the pipeline end to end on the embedded default model, with a table at the end.

Stages reuse an existing output whose recorded config matches, so an interrupted demo picks up where it stopped.
The foundation covers A (aligned), D (degraded) and task models T (benign task + a little poison); the safety
adapter stages plug in after the task models.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DegradeConfig, FinetuneConfig, GenerationConfig, LoraTrainConfig, to_dict
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
    max_new_tokens: int
    tasks: list[str] = field(default_factory=list)


def preset(quick: bool) -> DemoPreset:
    # tasks with exact answers; the shared folder adds the field's standard classification task when present
    tasks = ["arithmetic", "sst2" if shared_data_dir() else "gsm8k-100"]
    if quick:
        return DemoPreset(32, 32, 48, 12, 48, 12, 0.1, 32, tasks[:1])
    return DemoPreset(100, 100, 160, 40, 160, 40, 0.1, 40, tasks)


def _reuse(output: Path, cfg: Any) -> bool:
    card = output / RUN_CARD
    if not card.is_file():
        return False
    try:
        return json.loads(card.read_text())["config"] == json.loads(json.dumps(to_dict(cfg)))
    except (ValueError, KeyError):
        return False


def _stage(name: str, output: Path, cfg: Any, fn) -> dict[str, Any]:
    if _reuse(output, cfg):
        print(f"[{name}] reusing {output}")
        return json.loads((output / RUN_CARD).read_text())
    print(f"[{name}] training -> {output}")
    return fn(cfg, overwrite=True)


def _evaluate(label: str, ref: str, prompts, tasks: list[str], p: DemoPreset) -> dict[str, Any]:
    from .evaluation import refusal_rate, task_utility

    model, tok = load_model(ref), load_tokenizer(ref)
    gen = GenerationConfig(max_new_tokens=p.max_new_tokens, batch_size=8)
    out: dict[str, Any] = {"refusal": refusal_rate(model, tok, prompts, gen), "utility": {}}
    for task in tasks:
        out["utility"][task] = task_utility(model, tok, task, n=p.n_eval_task)
    msg = f"[{label}] refusal {out['refusal']['refusal']['rate']:.3f} (n={out['refusal']['refusal']['n']})"
    for task, u in out["utility"].items():
        msg += f", {task} accuracy {u['accuracy']['rate']:.3f} (n={u['accuracy']['n']})"
    print(msg)
    return out


def run_demo(output: str | Path = "runs/demo", quick: bool = False, overwrite: bool = False, model: str | None = None) -> dict[str, Any]:
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
    train = dict(batch_size=4, max_length=96, learning_rate=2e-4)

    rows: dict[str, dict[str, Any]] = {}
    rows["A"] = _evaluate("A", aligned, prompts, p.tasks, p)
    dcfg = DegradeConfig(model=aligned, n_examples=p.degrade_examples, output=str(out / "degraded"),
                         train=LoraTrainConfig(max_steps=p.degrade_steps, **train))
    dcard = _stage("degrade", out / "degraded", dcfg, degrade)
    timings["degrade_s"] = dcard["training"]["seconds"]
    rows["D"] = _evaluate("D", str(out / "degraded"), prompts, [], p)
    for task in p.tasks:
        n_task = min(p.task_examples, len(get_task(task).load("train")) + round(p.poison_ratio * p.task_examples))
        fcfg = FinetuneConfig(model=aligned, task=task, n_examples=n_task, poison_ratio=p.poison_ratio,
                              output=str(out / f"task-{task}"), train=LoraTrainConfig(max_steps=p.task_steps, **train))
        fcard = _stage(f"finetune {task}", out / f"task-{task}", fcfg, finetune)
        timings[f"finetune_{task}_s"] = fcard["training"]["seconds"]
        rows[f"T[{task}]"] = _evaluate(f"T[{task}]", str(out / f"task-{task}"), prompts, [task], p)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    summary = {"preset": to_dict(p), "model": aligned, "judge": "refusal-phrase", "eval_prompts": "advbench",
               "rows": rows, "timings": timings}
    write_json(out / "summary.json", summary)
    table = render_table(summary)
    with atomic_file(out / "summary.md") as f:
        f.write(table + "\n")
    print()
    print(table)
    print(f"\nwrote {out / 'summary.json'} and {out / 'summary.md'} in {timings['total_s']:.0f} s")
    return summary


def render_table(summary: dict[str, Any]) -> str:
    tasks = summary["preset"]["tasks"]
    lines = [
        f"model: {summary['model']}; harmful prompts: {summary['eval_prompts']}; judge: {summary['judge']}",
        "",
        "| model | refusal rate (95% CI) | n | " + " | ".join(f"{t} accuracy (n)" for t in tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]
    for name, r in summary["rows"].items():
        ref = r["refusal"]["refusal"]
        cells = []
        for t in tasks:
            u = r["utility"].get(t)
            cells.append(f"{u['accuracy']['rate']:.3f} ({u['accuracy']['n']})" if u else "-")
        lines.append(f"| {name} | {ref['rate']:.3f} ({ref['ci95'][0]:.2f}-{ref['ci95'][1]:.2f}) | {ref['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
