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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import (BenchConfig, DegradeConfig, ExtractConfig, FinetuneConfig, RecalibrateConfig, SelectConfig,
                     dump_yaml, opt, to_dict)
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
    "self-critique": "self-critique",
    "classifier-guard": "classifier guard",
    "mixed-ft": "mixed safety+task FT",
}


def _same(recorded: Any, cfg: Any) -> bool:
    """Does a stage's recorded config equal `cfg`? A key the record lacks matches when `cfg` leaves it at its
    default: an option added in a later version does not invalidate finished stages that never used it."""
    current = json.loads(json.dumps(to_dict(cfg) if not isinstance(cfg, dict) else cfg))
    defaults = json.loads(json.dumps(to_dict(type(cfg)()))) if dataclasses.is_dataclass(cfg) else {}
    return _match(recorded, current, defaults)


def _match(recorded: Any, current: Any, defaults: Any) -> bool:
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        return recorded == current
    defaults = defaults if isinstance(defaults, dict) else {}
    for key, value in current.items():
        if key in recorded:
            if not _match(recorded[key], value, defaults.get(key)):
                return False
        elif key not in defaults or defaults[key] != value:
            return False
    return set(recorded) <= set(current)


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


def _responder_stage(name: str, card_path: Path, key: dict[str, Any],
                     build: Callable[[dict[str, Any] | None], tuple[Any, dict[str, Any]]]) -> tuple[Any, float, dict, bool]:
    """(responder, build seconds, what the build found, key changed?). A matching card hands its findings (a fitted
    threshold) back to `build`, which then skips the fitting."""
    card = _read_card(card_path)
    reuse = card if card and _same(card.get("key"), key) else None
    print(f"[{name}] " + ("reusing its fitted settings" if reuse else "building"))
    t = time.perf_counter()
    responder, info = build(reuse["info"] if reuse else None)
    seconds = float(reuse["seconds"]) if reuse else round(time.perf_counter() - t, 1)
    if not reuse:
        write_json(card_path, {"key": key, "info": info, "seconds": seconds})
    return responder, seconds, info, reuse is None


def _responder_builders(cfg: BenchConfig, task: str) -> dict[str, tuple[dict, Callable]]:
    """method -> (what it depends on, build(found) -> (responder, findings)) for the inference-time defences."""
    from .baselines import ClassifierGuard, SelfCritique
    from .evaluation.judges import get_judge
    from .data import benign_prompts, harmful_prompt_texts

    def guard(found: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
        g = ClassifierGuard(get_judge(cfg.guard.guard), cfg.guard)
        if not cfg.guard.screen_prompts or cfg.guard.prompt_threshold is not None:
            return g, {}
        if found and "threshold" in found:
            g.prompt_threshold = found["threshold"]
            return g, found
        n = cfg.guard.n_calibration
        # calibration traffic, disjoint from the evaluation sets: training-side harmful requests vs the task's
        # own training prompts and general benign requests
        harmful = harmful_prompt_texts("harmful-pairs", n, cfg.seed + 3)
        benign = benign_prompts(task, n - n // 2, cfg.seed + 3) + benign_prompts("depresso", n // 2, cfg.seed + 3)
        fit = g.fit_prompt_threshold(harmful, benign)
        print(f"[classifier-guard {task}] prompt threshold {fit['threshold']:+.3f}, balanced accuracy "
              f"{fit['balanced_accuracy']:.3f} on {fit['n_harmful']}+{fit['n_benign']} calibration prompts")
        return g, fit

    return {
        "self-critique": ({"self_critique": to_dict(cfg.self_critique)}, lambda found: (SelfCritique(cfg.self_critique), {})),
        "classifier-guard": ({"guard": to_dict(cfg.guard), "task": task}, guard),
    }


def _complete(path: Path, n: int) -> bool:
    from .generation import read_jsonl_rows

    return path.is_file() and len(read_jsonl_rows(path)) >= n


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
    task_n: dict[str, int] = {}
    fresh_tasks: set[str] = set()
    reattack_rows: list[dict[str, Any]] = []
    for task in cfg.tasks:
        # small tasks (gsm8k-100 has 60 train items, aoa 10) get fewer examples, keeping the poison ratio
        n_task = task_n[task] = min(cfg.task_examples, int(len(get_task(task).load("train")) / (1 - cfg.poison_ratio)))
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
        responders = _responder_builders(cfg, task)
        defences: dict[str, dict[str, Any]] = {"undefended": {"name": f"T[{task}]", "key": {}}}
        for method in cfg.methods:
            name = f"T[{task}]+{METHOD_LABELS[method]}"
            if method in responders:
                key, build = responders[method]
                key = {**key, "upstream": upstream}
                responder, seconds, info, fresh = _responder_stage(
                    f"{method} {task}", out / "methods" / task / method / "stage.json", key, build)
                if fresh:
                    _forget(responses, name)
                row = evaluate(name, t_model, t_tok, tasks=[task], attacks=attacked(method), responder=responder)
                extra: dict[str, Any] = {"defence": info}
                defences[method] = {"name": name, "key": key, "responder": responder}
            elif method == "mixed-ft":
                mcfg = FinetuneConfig(model=aligned, task=task, n_examples=task_n[task], poison_ratio=cfg.poison_ratio,
                                      safety_ratio=cfg.mixed_safety_ratio, save="adapter",
                                      output=str(out / f"task-{task}-mixed"), train=train_cfg(cfg.task_steps))
                card, fresh = _train_stage(f"mixed-ft {task}", out / f"task-{task}-mixed", mcfg, finetune)
                if fresh:
                    _forget(responses, name)
                seconds = card["training"]["seconds"]
                m_model, m_tok = load_model(out / f"task-{task}-mixed"), load_tokenizer(out / f"task-{task}-mixed")
                row = evaluate(name, m_model, m_tok, tasks=[task], attacks=attacked(method))
                del m_model
                extra = {"data": card.get("data")}
                defences[method] = {"name": name, "key": {"mixed": to_dict(mcfg), "trained_s": seconds},
                                    "model": str(out / f"task-{task}-mixed")}
            else:
                key, build = builders[method]
                key = {**key, "upstream": upstream}
                update, seconds, fresh = _adapter_stage(f"{method} {task}", out / "methods" / task / method, key, build)
                if fresh:
                    _forget(responses, name)
                with update.attach(t_model, check=False):
                    row = evaluate(name, t_model, t_tok, tasks=[task], attacks=attacked(method))
                extra = {"layers": update.layers,
                         "coefficients": {str(l): round(update.coefficients[l], 4) for l in update.layers}}
                defences[method] = {"name": name, "key": key, "update": update}
            timings[f"{method}_{task}_s"] = seconds
            rows.append({**row, "task": task, "method": method, "build_seconds": seconds, **extra})
        for method in cfg.reattack_methods if cfg.reattack_tasks is None or task in cfg.reattack_tasks else []:
            for steps in cfg.reattack_steps:
                reattack_rows.append(_reattack(cfg, task, method, steps, defences[method], t_ref, t_tok, upstream,
                                               evaluate, out, responses, train_cfg, progress))
        del t_model

    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    results = {
        "model": aligned, "config": to_dict(cfg), "config_yaml": dump_yaml(cfg), "versions": _versions(),
        "selected_layers": selected.layers, "eval": {"harmful": cfg.harmful, "n_harmful": len(sets.harmful),
                                                     "attacks": {a: len(v) for a, v in sets.attacks.items()},
                                                     "over_refusal": over_src, "n_over_refusal": len(over),
                                                     "n_task": cfg.n_task},
        "rows": rows, "reattack": reattack_rows,
        "judges": {"validation": validation, "agreement": judge_agreement(rows)},
        "timings": timings, "method_labels": METHOD_LABELS,
    }
    paths = write_reports(results, out)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results


def _reattack(cfg: BenchConfig, task: str, method: str, steps: int, defence: dict[str, Any], t_ref: str, t_tok: Any,
              upstream: dict[str, Any], evaluate: Callable, out: Path, responses: Path, train_cfg: Callable,
              progress: bool) -> dict[str, Any]:
    """Fine-tune the defended model once more on a few harmful pairs (LoRA, `steps`) and measure its
    harmful rate again. Weight-space defences are merged into T first; an inference-time defence keeps wrapping the
    re-attacked weights (the attacker changes the weights, not the serving stack); mixed-ft is re-attacked itself."""
    from .apply import apply_adapter
    from .data import prompt_response_pairs
    from .evaluation.harness import slug
    from .training import train_lora

    name = f"{defence['name']} re-attacked {steps} steps"
    rcfg = {"data": cfg.reattack_data, "examples": cfg.reattack_examples, "train": to_dict(train_cfg(steps))}
    key = {"reattack": rcfg, "defence": defence["key"], "upstream": upstream}
    card_path = out / "reattack" / task / f"{method}-{steps}.json"
    card = _read_card(card_path)
    if not (card and _same(card.get("key"), key)):
        _forget(responses, name)
        card = None
    model = None
    if card is None or not _complete(responses / f"{slug(name)}.harmful.jsonl", cfg.n_harmful):
        print(f"[re-attack {task}] {defence['name']}: {steps} LoRA steps on {cfg.reattack_examples} "
              "harmful pairs")
        model = load_model(defence.get("model") or t_ref)
        if "update" in defence:
            apply_adapter(defence["update"], model, mode="merge")
        pairs = prompt_response_pairs(cfg.reattack_data, n=cfg.reattack_examples, seed=cfg.seed + 101)
        model, stats = train_lora(model, t_tok, pairs, train_cfg(steps), progress=progress)
        card = {"key": key, "training": stats.to_dict()}
        write_json(card_path, card)
    row = evaluate(name, model, t_tok, over_refusal=False, responder=defence.get("responder"))
    del model
    return {**row, "task": task, "method": method, "defence_row": defence["name"],
            "reattack": {"steps": steps, "examples": cfg.reattack_examples,
                         "seconds": card["training"]["seconds"], "final_loss": card["training"]["final_loss"]}}


@dataclass
class RejudgeConfig:
    """Add judges to a finished bench from its stored responses (no generation)."""

    output: str | None = opt(None, "the bench's output folder (with results.json and responses/)", positional=True)
    judges: list[str] = opt([], "judges to add (repeatable)", aliases=("--judge",))
    validate: bool = opt(True, "measure each added judge against human labels")


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
        for row in results["rows"] + results.get("reattack", []):
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
