"""`safegene bench CONFIG.yaml`: SafeGene next to its peers on the same models, prompts and judges, in one run.

    A (aligned) -> degrade -> D;  A -> task fine-tunes (a little poison mixed in) -> T_task
    extract A - D once, select layers once (on D)
    for each T_task: every method builds an update to add to T (SafeGene, its ablations, RESTA, Safe LoRA,
    SafeMERGE, re-align), attached at runtime and evaluated like T itself:
    harmful rate per judge and category, over-refusal, task utility, and what each method cost.

Every stage writes its artifact under `output` and is reused on a re-run when its recorded config matches, so an
interrupted bench resumes; generations are appended to JSONL as they finish. Writes results.json, results.md and
report.html.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .config import (BenchConfig, DegradeConfig, ExtractConfig, FinetuneConfig, RecalibrateConfig, SelectConfig,
                     dump_yaml, to_dict)
from .data import get_task, harmful_prompts
from .io import write_json
from .models import DEFAULT_MODEL, load_model, load_tokenizer, prepare_model
from .training import RUN_CARD, _versions, degrade, finetune

METHOD_LABELS = {
    "safegene": "SafeGene",
    "safegene-all-layers": "SafeGene, no layer selection",
    "safegene-alpha1": "SafeGene, α=1 (no recalibration)",
    "resta": "RESTA",
    "safe-lora": "Safe LoRA",
    "safemerge": "SafeMERGE",
    "realign": "re-align (safety SFT)",
}


def _same(recorded: Any, cfg: Any) -> bool:
    return recorded == json.loads(json.dumps(to_dict(cfg) if not isinstance(cfg, dict) else cfg))


def _read_card(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train_stage(name: str, output: Path, cfg: Any, fn: Callable) -> tuple[dict[str, Any], bool]:
    """(run card, rebuilt?) of a training stage; a folder whose card records the same config is reused."""
    card = _read_card(output / RUN_CARD)
    if card and _same(card.get("config"), cfg):
        print(f"[{name}] reusing {output}")
        return card, False
    print(f"[{name}] training -> {output}")
    return fn(cfg, overwrite=True), True


def _adapter_stage(name: str, output: Path, key: dict[str, Any], build: Callable[[], Any]) -> tuple[Any, float, bool]:
    """(adapter, build seconds, rebuilt?): reuse `output` when its card's bench key matches, else build and save."""
    from .adapter import SafetyAdapter

    card = _read_card(output / "safegene.json")
    if card and _same((card.get("bench") or {}).get("key"), key):
        print(f"[{name}] reusing {output}")
        return SafetyAdapter.load(output), float(card["bench"]["seconds"]), False
    print(f"[{name}] -> {output}")
    t = time.perf_counter()
    adapter = build()
    seconds = round(time.perf_counter() - t, 1)
    adapter.card["bench"] = {"key": key, "seconds": seconds}
    adapter.save(output, overwrite=True)
    return adapter, seconds, True


def _forget(responses: Path, row: str) -> None:
    from .evaluation.harness import slug

    for f in responses.glob(f"{slug(row)}.*.jsonl"):
        f.unlink()


def _method_builders(cfg: BenchConfig, adapter: Any, selected: Any, t_ref: str, t_model: Any, t_tok: Any,
                     rcfg: RecalibrateConfig, train_cfg: Callable, progress: bool) -> dict[str, tuple[dict, Callable]]:
    """method -> (what its result depends on, how to build it): each build returns the update to add to T."""
    from .baselines import realign, resta, safe_lora, safemerge, task_update
    from .recalibration import recalibrate

    realign_train = train_cfg(cfg.realign_steps)
    return {
        "safegene": ({"recalibrate": to_dict(rcfg)},
                     lambda: recalibrate(selected, rcfg, model=t_model, tokenizer=t_tok, progress=progress)),
        "safegene-all-layers": ({"recalibrate": to_dict(rcfg), "layers": "all"},
                                lambda: recalibrate(adapter.select(adapter.all_layers), rcfg, model=t_model,
                                                    tokenizer=t_tok, progress=progress)),
        "safegene-alpha1": ({"alpha": 1.0}, lambda: selected.with_coefficients(1.0)),
        "resta": ({"recalibrate": to_dict(rcfg), "tied": True},
                  lambda: resta(adapter, rcfg, model=t_model, tokenizer=t_tok, progress=progress)),
        "safe-lora": ({"projection": to_dict(cfg.projection)},
                      lambda: safe_lora(task_update(t_ref, cfg.model), adapter, cfg.projection)),
        "safemerge": ({"projection": to_dict(cfg.projection)},
                      lambda: safemerge(task_update(t_ref, cfg.model), adapter, cfg.projection)),
        "realign": ({"recalibrate": to_dict(rcfg), "train": to_dict(realign_train)},
                    lambda: realign(t_ref, rcfg, realign_train, progress=progress)),
    }


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    from .adapter import extract_adapter
    from .data.attacks import attack_prompts
    from .evaluation.harness import EvalSets, evaluate_model, judge_agreement, over_refusal_prompts
    from .evaluation.judge_validation import human_labelled, validate_judge
    from .evaluation.judges import get_judge
    from .evaluation.report import write_reports
    from .selection import plot_layer_scores, select_layers

    for task in cfg.tasks:  # fail on a misspelt task before an hour of work, not after
        get_task(task).load("test", n=1)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    responses = out / "responses"
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    aligned = cfg.model
    if aligned == DEFAULT_MODEL:
        t = time.perf_counter()
        prepare_model(aligned)
        timings["prepare_model_s"] = round(time.perf_counter() - t, 1)

    # the evaluation's identity: a change in prompts or decoding invalidates every stored generation
    over, over_src = over_refusal_prompts(cfg.over_refusal, cfg.n_over_refusal, cfg.seed)
    sets = EvalSets(harmful=harmful_prompts(cfg.harmful, n=cfg.n_harmful, seed=cfg.seed), over_refusal=over,
                    over_refusal_source=over_src, n_task=cfg.n_task, seed=cfg.seed, tasks=list(cfg.tasks))
    sets.attacks = {a: attack_prompts(a, sets.harmful, cfg.n_attack, cfg.seed) for a in cfg.attacks}
    manifest = {"harmful": [p.prompt for p in sets.harmful], "over_refusal": [p.prompt for p in over],
                "generation": to_dict(cfg.generation)}
    if _read_card(responses / "manifest.json") != manifest:
        shutil.rmtree(responses, ignore_errors=True)
    responses.mkdir(parents=True, exist_ok=True)
    write_json(responses / "manifest.json", manifest)

    judges = [get_judge(j) for j in cfg.judges]
    validation = {}
    if cfg.validate_judges:
        items = human_labelled()
        for j in judges:
            validation[j.name] = validate_judge(j, items)
            v = validation[j.name]
            print(f"[judge {j.name}] accuracy vs human labels {v['accuracy']['rate']:.3f} (n={v['n']}), "
                  f"κ {v['kappa_vs_human']}")

    rows: list[dict[str, Any]] = []
    evaluate = functools.partial(evaluate_model, sets=sets, judges=judges, gen=cfg.generation, responses_dir=responses)

    a_model, a_tok = load_model(aligned), load_tokenizer(aligned)
    def attacked(method: str) -> bool:
        return bool(cfg.attacks) and method in cfg.attack_methods

    rows.append({**evaluate("A", a_model, a_tok, tasks=cfg.tasks, attacks=attacked("aligned")), "task": None,
                 "method": "aligned"})
    del a_model

    def train_cfg(steps: int) -> Any:
        return dataclasses.replace(cfg.train, max_steps=steps)

    dcfg = DegradeConfig(model=aligned, n_examples=cfg.degrade_examples, output=str(out / "degraded"),
                         train=train_cfg(cfg.degrade_steps))
    card, fresh = _train_stage("degrade", out / "degraded", dcfg, degrade)
    timings["degrade_s"] = card["training"]["seconds"]
    if fresh:
        _forget(responses, "D")
    d_model, d_tok = load_model(out / "degraded"), load_tokenizer(out / "degraded")
    rows.append({**evaluate("D", d_model, d_tok, over_refusal=False), "task": None, "method": "degraded"})

    task_refs: dict[str, str] = {}
    fresh_tasks: set[str] = set()
    for task in cfg.tasks:
        # small tasks (gsm8k-100 has 60 train items) get fewer examples, keeping the poison ratio
        n_task = min(cfg.task_examples, int(len(get_task(task).load("train")) / (1 - cfg.poison_ratio)))
        fcfg = FinetuneConfig(model=aligned, task=task, n_examples=n_task, poison_ratio=cfg.poison_ratio,
                              save="adapter", output=str(out / f"task-{task}"), train=train_cfg(cfg.task_steps))
        card, fresh = _train_stage(f"finetune {task}", out / f"task-{task}", fcfg, finetune)
        timings[f"finetune_{task}_s"] = card["training"]["seconds"]
        task_refs[task] = str(out / f"task-{task}")
        if fresh:
            fresh_tasks.add(task)

    # --- the safety adapter: extracted once, layers selected once ------------------------------------------------
    ecfg = ExtractConfig(aligned=aligned, degraded=str(out / "degraded"), output=str(out / "adapter"))
    adapter, timings["extract_s"], _ = _adapter_stage(
        "extract", out / "adapter", {"extract": to_dict(ecfg), "degraded_trained_s": timings["degrade_s"]},
        lambda: extract_adapter(ecfg, overwrite=True, save=False))
    scfg = SelectConfig(model=str(out / "degraded"), n_harmful=cfg.select_prompts, n_benign=cfg.select_prompts,
                        top_k=cfg.top_k, seed=cfg.seed)
    selected, timings["select_s"], fresh_sel = _adapter_stage(
        "select", out / "adapter-selected", {"select": to_dict(scfg), "adapter": adapter.card.get("bench")},
        functools.partial(select_layers, adapter, scfg, model=d_model, tokenizer=d_tok))
    if fresh_sel:
        plot_layer_scores(selected, out / "layer_scores.png")
    del d_model
    print(f"[select] layers {selected.layers}")

    # --- per task model: T alone, then every method ----------------------------------------------------------------
    for task, t_ref in task_refs.items():
        t_model, t_tok = load_model(t_ref), load_tokenizer(t_ref)
        if task in fresh_tasks:
            _forget(responses, f"T[{task}]")  # method rows follow: their keys name T's training, so they rebuild
        rows.append({**evaluate(f"T[{task}]", t_model, t_tok, tasks=[task], attacks=attacked("undefended")),
                     "task": task, "method": "undefended"})
        rcfg = RecalibrateConfig(task_model=t_ref, task=task, n_harmful=cfg.shots, n_task=cfg.shots,
                                 steps=cfg.recal_steps, seed=cfg.seed)
        # what a method's update depends on: a retrained T or a re-extracted adapter invalidates it
        t_card = _read_card(Path(t_ref) / RUN_CARD) or {}
        upstream = {"adapter": adapter.card.get("bench"), "selected": selected.card.get("bench"),
                    "task_model": {"data": t_card.get("data"), "trained_s": (t_card.get("training") or {}).get("seconds")}}
        builders = _method_builders(cfg, adapter, selected, t_ref, t_model, t_tok, rcfg, train_cfg, progress)
        for method in cfg.methods:
            key, build = builders[method]
            key = {**key, "upstream": upstream}
            name = f"T[{task}]+{METHOD_LABELS[method]}"
            update, seconds, fresh = _adapter_stage(f"{method} {task}", out / "methods" / task / method, key, build)
            if fresh:
                _forget(responses, name)
            timings[f"{method}_{task}_s"] = seconds
            with update.attach(t_model, check=False):
                row = evaluate(name, t_model, t_tok, tasks=[task], attacks=attacked(method))
            rows.append({**row, "task": task, "method": method, "build_seconds": seconds,
                         "layers": update.layers, "coefficients": {str(l): round(update.coefficients[l], 4)
                                                                   for l in update.layers}})
        del t_model

    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    results = {
        "model": aligned, "config": to_dict(cfg), "config_yaml": dump_yaml(cfg), "versions": _versions(),
        "selected_layers": selected.layers, "eval": {"harmful": cfg.harmful, "n_harmful": len(sets.harmful),
                                                     "attacks": {a: len(v) for a, v in sets.attacks.items()},
                                                     "over_refusal": over_src, "n_over_refusal": len(over),
                                                     "n_task": cfg.n_task},
        "rows": rows, "judges": {"validation": validation, "agreement": judge_agreement(rows)},
        "timings": timings, "method_labels": METHOD_LABELS,
    }
    paths = write_reports(results, out)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results


def rejudge(output: str | Path, judges: list[str], validate: bool = True) -> dict[str, Any]:
    """Add judges to a finished bench without generating again: read its stored responses, judge them, rewrite
    results.json, results.md and report.html. A judge already present is judged again (its numbers replaced)."""
    from .errors import SafegeneError
    from .evaluation.harness import judge_agreement, judge_responses, slug, stored_request
    from .evaluation.judge_validation import human_labelled, validate_judge
    from .evaluation.judges import get_judge
    from .evaluation.report import write_reports
    from .generation import read_jsonl_rows

    out = Path(output)
    results = _read_card(out / "results.json")
    if not results:
        raise SafegeneError(f"{out}: no results.json; run `safegene bench` first")
    loaded = [get_judge(j) for j in judges]
    def judged(path: Path, expected_n: int, judge: Any) -> tuple[dict[str, Any], str]:
        if not path.is_file():
            raise SafegeneError(f"{path}: stored responses are missing; re-run the bench")
        items = read_jsonl_rows(path)
        if len(items) != expected_n:
            raise SafegeneError(f"{path}: {len(items)} responses, but the row was judged on {expected_n}")
        return judge_responses(judge, [stored_request(r) for r in items],
                               [r.get("category", "uncategorized") for r in items], [r["response"] for r in items])

    for judge in loaded:
        for row in results["rows"]:
            print(f"[{judge.name}] {row['name']}")
            first = next(iter(row["harmful"].values()))
            row["harmful"][judge.name], row["verdicts"][judge.name] = judged(
                out / "responses" / f"{slug(row['name'])}.harmful.jsonl", first["overall"]["n"], judge)
            for attack, by_judge in row.get("attacks", {}).items():
                files = sorted((out / "responses").glob(f"{slug(row['name'])}.attack-{attack}-*.jsonl"),
                               key=lambda p: p.stat().st_mtime)
                n = next(iter(by_judge.values()))["overall"]["n"]
                by_judge[judge.name] = judged(files[-1] if files else Path("missing"), n, judge)[0]
        if validate:
            results["judges"]["validation"][judge.name] = validate_judge(judge, human_labelled())
    results["config"]["judges"] = list(dict.fromkeys(results["config"]["judges"] + [j.name for j in loaded]))
    results["judges"]["agreement"] = judge_agreement(results["rows"])
    paths = write_reports(results, out)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results
