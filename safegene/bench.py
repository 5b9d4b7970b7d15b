"""`safegene bench CONFIG.yaml`: SafeGene next to its peers on the same models, prompts and judges, in one run.

    A (aligned) -> degrade -> D;  A -> task fine-tunes (a little poison mixed in) -> T_task
    extract A - D once, select layers once (on D)
    for each T_task and each method of the registry (`safegene.baselines.METHODS`) named in `methods`: build the
    method's defence and evaluate T with it like T itself: harmful rate per judge and category, over-refusal, task
    utility, and what the method cost.

Every stage writes its artifact under `output` and is reused on a re-run when its recorded config matches, so an
interrupted bench resumes; generations are appended to JSONL as they finish. Writes results.json, results.md and
report.html.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .adapter.extract import ExtractConfig
from .baselines import METHODS, Defence, Method, MethodContext, default_methods, get_method
from .baselines.classifier_guard import ClassifierGuardConfig
from .baselines.projection import ProjectionBaselineConfig
from .baselines.self_critique import SelfCritiqueConfig
from .config import check, dump_yaml, opt, settings, to_dict
from .generation import GenerationConfig
from .recalibration import RecalibrateConfig
from .selection import SelectConfig
from .training import DegradeConfig, FinetuneConfig, LoraTrainConfig, degrade, finetune, resolved_train
from .data import get_task, harmful_prompts
from .data.attacks import ATTACKS
from .evaluation.results import BenchResults, ResultRow
from .io import write_json
from .models import DEFAULT_MODEL, load_model, load_tokenizer, prepare_model
from .models.placement import PlacementConfig
from .runcard import RUN_CARD, library_versions
from .stages import adapter_stage, read_card, same_config, trained_or_reused


@dataclass
class BenchConfig:
    """One file describes a whole benchmark: models x defences x judges, on one aligned model family.

    Pipeline: A -> degrade -> D; A -> task fine-tunes (poison mixed in) -> T_task; extract A - D; select layers on D;
    then per task model every method in `methods` and every judge in `judges`, on the same prompts.
    """

    model: str = opt(DEFAULT_MODEL, "aligned model A (embedded name, HF folder or GGUF file)")
    output: str = opt("runs/bench", "output folder (stages whose recorded config matches are reused)",
                      aliases=("-o",))
    tasks: list[str] = opt(["arithmetic", "sst2"], "task names; each gets a poisoned fine-tune T_task")
    methods: list[str] = opt(default_methods(), "defences evaluated on every T: " + ", ".join(METHODS)
                             + " (default: all but the experimental " + ", ".join(
                                 n for n, m in METHODS.items() if m.experimental) + ")")
    judges: list[str] = opt(["refusal-phrase", "content-classifier"],
                            "judges of harmful responses: refusal-phrase, content-classifier, llm:<model>, "
                            "endpoint:<url>?model=<name>")
    validate_judges: bool = opt(True, "measure every judge's accuracy on PyRIT's human-labelled responses")
    harmful: str = opt("advbench", "held-out harmful prompts (never used in training)")
    n_harmful: int = opt(64, "harmful prompts per model")
    over_refusal: str = opt("auto", "benign-but-sensitive prompts; auto: shared:xstest-safe when present, else "
                            "benign-sensitive")
    n_over_refusal: int = opt(32, "benign-sensitive prompts per model")
    over_refusal_tokens: int | None = opt(None, "new tokens per over-refusal answer; None: generation.max_new_tokens "
                                          "(the refusal-phrase judge that scores them reads only the opening ~200 "
                                          "characters, ~48 tokens)", added_later=True)
    n_task: int = opt(64, "test items per task")
    seed: int = opt(0, "seed of every sample")
    generation: GenerationConfig = opt(GenerationConfig(max_new_tokens=32, batch_size=32), "decoding settings")
    train: LoraTrainConfig = opt(LoraTrainConfig(), "LoRA settings of degrade and fine-tunes (max_steps: see below)")
    degrade_examples: int = opt(160, "harmful pairs for D")
    degrade_steps: int = opt(40, "LoRA steps for D")
    task_examples: int = opt(160, "examples per task fine-tune (poison included)")
    task_steps: int = opt(40, "LoRA steps per task fine-tune")
    poison_ratio: float = opt(0.1, "share of harmful pairs mixed into the task data")
    select_prompts: int = opt(32, "harmful and benign prompts for layer selection")
    top_k: int = opt(8, "layers kept by selection")
    shots: int = opt(32, "few-shot harmful and task shots for recalibration, RESTA and re-align")
    recal_steps: int = opt(20, "Adam steps of the Adam-fitted rows (safegene-adam; the default line search of SafeGene "
                                "and RESTA takes none)")
    realign_steps: int = opt(24, "LoRA steps of the re-align baseline (on the same shots)")
    projection: ProjectionBaselineConfig = opt(ProjectionBaselineConfig(), "Safe LoRA / SafeMERGE settings")
    self_critique: SelfCritiqueConfig = opt(SelfCritiqueConfig(), "the self-critique baseline")
    guard: ClassifierGuardConfig = opt(ClassifierGuardConfig(), "the classifier-guard baseline")
    mixed_safety_ratio: float = opt(0.1, "mixed-ft baseline: share of refusals mixed into the task fine-tune")
    attacks: list[str] = opt([], "adversarial variants of the harmful prompts: " + ", ".join(ATTACKS))
    n_attack: int = opt(48, "prompts per attack")
    attack_methods: list[str] = opt(["aligned", "undefended", "safegene", "resta", "realign"],
                                    "rows evaluated under attack: aligned (A), undefended (T), or method names")
    reattack_methods: list[str] = opt([], "rows fine-tuned again on harmful pairs after the defence (the user who "
                                      "fine-tunes the shipped model once more): undefended (T) or method names")
    reattack_tasks: list[str] | None = opt(None, "tasks whose models are re-attacked; None: every task")
    reattack_data: str = opt("harmful-pairs", "harmful pairs of the re-attack (sampled apart from the poison)")
    reattack_examples: int = opt(32, "harmful pairs of the re-attack")
    reattack_steps: list[int] = opt([10], "LoRA steps of the re-attack; several: one re-attack each (a curve)")
    reprotect_methods: list[str] = opt([], "methods applied again after a re-attack, as the user of the re-attacked "
                                       "model would (the adapter is meant to be reused): each rebuilt on the "
                                       "re-attacked model of its own row and of undefended T; weight-update methods "
                                       "from `methods` only (a responder or retraining has nothing to rebuild)",
                                       added_later=True)
    placement: PlacementConfig = opt(PlacementConfig(), "where every model of the bench runs and trains, in what "
                                     "dtype (--device, --dtype; --device-map for evaluation and recalibration)",
                                     added_later=True)

    def __post_init__(self) -> None:
        check(bool(self.tasks), "tasks must name at least one task")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        check(not unknown, f"unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}")
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad, f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
        bad = [m for m in self.reattack_methods if m != "undefended" and m not in self.methods]
        check(not bad, f"reattack_methods {bad} are neither 'undefended' nor in methods")
        check(self.reattack_tasks is None or set(self.reattack_tasks) <= set(self.tasks),
              f"reattack_tasks {self.reattack_tasks} must be among tasks {self.tasks}")
        bad = [m for m in self.reprotect_methods if m not in self.methods]
        check(not bad, f"reprotect_methods {bad} are not in methods; add them to methods or drop them")
        bad = [f"{m} ({METHODS[m].kind})" for m in self.reprotect_methods if METHODS[m].kind != "update"]
        check(not bad, f"reprotect_methods {bad} cannot be re-applied to a re-attacked model (a responder keeps "
              "wrapping it unchanged, a retraining starts again from A): name weight-update methods only")
        bad = [m for m in self.reprotect_methods
               if m not in self.reattack_methods and "undefended" not in self.reattack_methods]
        check(not bad, f"reprotect_methods {bad} have no re-attacked row to re-protect: add 'undefended' or them to "
              "reattack_methods")
        check(self.reattack_examples >= 1 and bool(self.reattack_steps) and min(self.reattack_steps) >= 1,
              "reattack_examples and every reattack_steps entry must be >= 1")
        check(0 < self.mixed_safety_ratio < 1 - self.poison_ratio,
              f"mixed_safety_ratio must be in (0, {1 - self.poison_ratio:g}) (room for the task data)")
        check("classifier-guard" not in self.methods or self.guard.guard not in self.judges,
              f"the guard '{self.guard.guard}' is also a scoring judge: a guard cannot grade its own work; pick "
              "another guard or judge")
        check(bool(self.judges), "judges must name at least one judge")
        check(min(self.n_harmful, self.n_task, self.shots) >= 1, "n_harmful, n_task and shots must be >= 1")
        check(self.n_over_refusal >= 0, "n_over_refusal must be >= 0")
        check(0 <= self.poison_ratio < 1, f"poison_ratio must be in [0, 1), got {self.poison_ratio}")
        check(self.train.max_steps == LoraTrainConfig().max_steps,
              "train.max_steps is not used by the bench: set degrade_steps, task_steps, realign_steps or "
              "reattack_steps")

    def steps(self, n: int) -> LoraTrainConfig:
        """The benchmark's LoRA settings with `n` optimizer steps, in the dtype it trains in here (`auto` resolved
        against the placement: the stage keys record what ran)."""
        return resolved_train(dataclasses.replace(self.train, max_steps=n), self.placement)


def method_labels() -> dict[str, str]:
    return {name: m.label for name, m in METHODS.items()}


# --- stages: each reused on a re-run when what it recorded matches ----------------------------------------------------


def _defence_stage(method: Method, ctx: MethodContext, store: Path, key: dict[str, Any],
                   label: str | None = None) -> tuple[Defence, float, bool]:
    """(defence, build seconds, rebuilt?), reusing what an earlier run left: an update is stored as an adapter
    folder; a retrained model is reused by its build when the folder's own run card records the same config; a
    responder's findings (a fitted threshold) are stored in `stage.json` and handed back to its build as
    `ctx.found`."""
    label = label or f"{method.name} {ctx.task}"
    if method.kind == "update":
        update, seconds, fresh = adapter_stage(label, store, key, lambda: method.build(ctx).update)
        return Defence(update=update, row={"layers": update.layers, "coefficients": {
            str(layer): round(update.coefficients[layer], 4) for layer in update.layers}}), seconds, fresh
    if method.kind == "retrain":
        defence = method.build(ctx)
        return defence, float(defence.seconds or 0.0), defence.rebuilt
    card = read_card(store / "stage.json")
    reuse = card if card and same_config(card.get("key"), key) else None
    print(f"[{label}] " + ("reusing what it stored" if reuse else "building"))
    t = time.perf_counter()
    defence = method.build(dataclasses.replace(ctx, found=reuse["info"] if reuse else None))
    seconds = float(reuse["seconds"]) if reuse else defence.seconds or round(time.perf_counter() - t, 1)
    if not reuse:
        write_json(store / "stage.json", {"key": key, "info": defence.info, "seconds": seconds})
    return defence, seconds, reuse is None


def _forget(responses: Path, row: str) -> None:
    from .evaluation.harness import slug

    for f in responses.glob(f"{slug(row)}.*.jsonl"):
        f.unlink()


def _complete(path: Path, n: int) -> bool:
    from .generation import read_jsonl_rows

    return path.is_file() and len(read_jsonl_rows(path)) >= n


def _evaluate_defended(evaluate: Callable, name: str, defence: Defence, t_model: Any, t_tok: Any,
                       placement: PlacementConfig | None = None, **kw: Any) -> ResultRow:
    """Evaluate T with a defence in place: its update attached, its responder answering, or its model instead."""
    if defence.model:
        model, tok = load_model(defence.model, placement), load_tokenizer(defence.model)
        return evaluate(name, model, tok, **kw)
    if defence.update is not None:
        with defence.update.attach(t_model, check=False):
            return evaluate(name, t_model, t_tok, **kw)
    return evaluate(name, t_model, t_tok, responder=defence.responder, **kw)


# --- the run ----------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What every part of one benchmark run shares."""

    cfg: BenchConfig
    out: Path
    responses: Path
    evaluate: Callable[..., ResultRow]
    timings: dict[str, float]
    progress: bool
    snapshot: Callable[[list[ResultRow]], None] = lambda rows: None  # rows so far -> results.partial.*

    def attacked(self, method: str) -> bool:
        return bool(self.cfg.attacks) and method in self.cfg.attack_methods


def _eval_sets(cfg: BenchConfig, responses: Path) -> Any:
    """The prompts every row is measured on. Stored answers of a kind (harmful and its attacks, over-refusal) are
    dropped when that kind's prompts or decoding changed, and only those: a shorter over-refusal limit keeps an hour
    of harmful answers. (Task answers carry their own tag in their file names.)"""
    from .data.attacks import attack_prompts
    from .evaluation.harness import EvalSets, over_refusal_prompts

    over, over_src = over_refusal_prompts(cfg.over_refusal, cfg.n_over_refusal, cfg.seed)
    sets = EvalSets(harmful=harmful_prompts(cfg.harmful, n=cfg.n_harmful, seed=cfg.seed), over_refusal=over,
                    over_refusal_source=over_src, n_task=cfg.n_task, seed=cfg.seed, tasks=list(cfg.tasks),
                    over_refusal_tokens=cfg.over_refusal_tokens)
    sets.attacks = {a: attack_prompts(a, sets.harmful, cfg.n_attack, cfg.seed) for a in cfg.attacks}
    manifest = {"harmful": {"prompts": [p.prompt for p in sets.harmful], "generation": settings(cfg.generation)},
                "over_refusal": {"prompts": [p.prompt for p in over],
                                 "generation": settings(sets.over_refusal_generation(cfg.generation))}}
    stored = _manifest_by_kind(read_card(responses / "manifest.json"))
    stale = {"harmful": ("*.harmful.jsonl", "*.attack-*.jsonl"), "over_refusal": ("*.over_refusal.jsonl",)}
    for kind, patterns in stale.items():
        if stored.get(kind) != manifest[kind] and responses.is_dir():
            for f in [f for pattern in patterns for f in responses.glob(pattern)]:
                f.unlink()
    responses.mkdir(parents=True, exist_ok=True)
    write_json(responses / "manifest.json", manifest)
    return sets


def _manifest_by_kind(stored: dict[str, Any] | None) -> dict[str, Any]:
    """A stored manifest in today's per-kind form; the older flat form (one decoding for every kind) is read too."""
    if not stored:
        return {}
    if isinstance(stored.get("harmful"), list):
        return {kind: {"prompts": stored.get(kind), "generation": stored.get("generation")}
                for kind in ("harmful", "over_refusal")}
    return stored


def _validated_judges(cfg: BenchConfig) -> tuple[list[Any], dict[str, Any]]:
    from .evaluation.judge_validation import human_labelled, validate_judge
    from .evaluation.judges import get_judge

    judges = [get_judge(j, cfg.placement) for j in cfg.judges]  # an llm: judge runs where the models run
    validation = {}
    if cfg.validate_judges:
        items = human_labelled()
        for j in judges:
            v = validation[j.name] = validate_judge(j, items)
            print(f"[judge {j.name}] accuracy vs human labels {v['accuracy']['rate']:.3f} (n={v['n']}), "
                  f"κ {v['kappa_vs_human']}")
    return judges, validation


def _family(run: _Run, rows: list[ResultRow]) -> tuple[Any, Any]:
    """A and D evaluated, A − D extracted and its layers selected: (adapter, selected adapter)."""
    from .adapter import extract_adapter
    from .selection import plot_layer_scores, select_layers

    cfg, out, timings = run.cfg, run.out, run.timings
    a_model, a_tok = load_model(cfg.model, cfg.placement), load_tokenizer(cfg.model)
    rows.append(_tagged(run.evaluate("A", a_model, a_tok, tasks=cfg.tasks, attacks=run.attacked("aligned")),
                        None, "aligned"))
    run.snapshot(rows)
    del a_model
    dcfg = DegradeConfig(model=cfg.model, n_examples=cfg.degrade_examples, output=str(out / "degraded"),
                         train=cfg.steps(cfg.degrade_steps), placement=cfg.placement)
    card, fresh = trained_or_reused("degrade", out / "degraded", dcfg, degrade)
    timings["degrade_s"] = card["training"]["seconds"]
    if fresh:
        _forget(run.responses, "D")
    d_model, d_tok = load_model(out / "degraded", cfg.placement), load_tokenizer(out / "degraded")
    rows.append(_tagged(run.evaluate("D", d_model, d_tok, over_refusal=False), None, "degraded"))
    run.snapshot(rows)

    # no placement: the SVD runs on the CPU, and only distillation (not run here) would load models; `settings`
    # leaves the default placement out of the key, so that adapters extracted before it existed still match
    ecfg = ExtractConfig(aligned=cfg.model, degraded=str(out / "degraded"), output=str(out / "adapter"))
    adapter, timings["extract_s"], _ = adapter_stage(
        "extract", out / "adapter", {"extract": settings(ecfg), "degraded_trained_s": timings["degrade_s"]},
        lambda: extract_adapter(ecfg, overwrite=True, save=False))
    scfg = SelectConfig(model=str(out / "degraded"), n_harmful=cfg.select_prompts, n_benign=cfg.select_prompts,
                        top_k=cfg.top_k, seed=cfg.seed, placement=cfg.placement)
    selected, timings["select_s"], fresh_sel = adapter_stage(
        "select", out / "adapter-selected", {"select": settings(scfg), "adapter": adapter.card.get("bench")},
        functools.partial(select_layers, adapter, scfg, model=d_model, tokenizer=d_tok))
    if fresh_sel:
        plot_layer_scores(selected, out / "layer_scores.png")
    print(f"[select] layers {selected.layers}")
    return adapter, selected


def _task_model(run: _Run, task: str) -> tuple[str, int, bool]:
    """T[task] fine-tuned with poison: (folder, its number of examples, rebuilt?)."""
    cfg = run.cfg
    # small tasks (gsm8k-100 has 60 train items, aoa 10) get fewer examples, keeping the poison ratio
    n = min(cfg.task_examples, int(len(get_task(task).load("train")) / (1 - cfg.poison_ratio)))
    folder = run.out / f"task-{task}"
    fcfg = FinetuneConfig(model=cfg.model, task=task, n_examples=n, poison_ratio=cfg.poison_ratio, save="adapter",
                          output=str(folder), train=cfg.steps(cfg.task_steps), placement=cfg.placement)
    card, fresh = trained_or_reused(f"finetune {task}", folder, fcfg, finetune)
    run.timings[f"finetune_{task}_s"] = card["training"]["seconds"]
    return str(folder), n, fresh


def _tagged(row: ResultRow, task: str | None, method: str, build_seconds: float | None = None,
            **extra: Any) -> ResultRow:
    row.task, row.method, row.build_seconds = task, method, build_seconds
    row.extra.update(extra)
    return row


def _method_context(run: _Run, task: str, ref: str, model: Any, tok: Any, n_examples: int, adapter: Any,
                    selected: Any) -> MethodContext:
    """What a method builds from when it protects the task model in `ref` (T, or T re-attacked)."""
    cfg = run.cfg
    return MethodContext(settings=cfg, aligned=cfg.model, task=task, task_model=ref, model=model, tokenizer=tok,
                         adapter=adapter, selected=selected, train=cfg.steps, output=run.out, progress=run.progress,
                         task_examples=n_examples,
                         recalibrate=RecalibrateConfig(task_model=ref, task=task, n_harmful=cfg.shots,
                                                       n_task=cfg.shots, steps=cfg.recal_steps, seed=cfg.seed,
                                                       placement=cfg.placement))


def _reprotected_by(cfg: BenchConfig, reattacked_method: str) -> list[str]:
    """The methods applied again after re-attacking the row of `reattacked_method`: every one on re-attacked T (what
    getting back costs each), a method's own on its re-attacked row (the same defence rebuilt on the new weights)."""
    if reattacked_method == "undefended":
        return list(cfg.reprotect_methods)
    return [reattacked_method] if reattacked_method in cfg.reprotect_methods else []


def _task_rows(run: _Run, task: str, t_ref: str, n_examples: int, fresh: bool, adapter: Any, selected: Any,
               rows: list[ResultRow], reattacked: list[ResultRow], reprotected: list[ResultRow]) -> None:
    """T[task] alone, then T with every method's defence; then the re-attacks asked for, each followed by the
    re-protections asked for."""
    cfg = run.cfg
    t_model, t_tok = load_model(t_ref, cfg.placement), load_tokenizer(t_ref)
    if fresh:
        _forget(run.responses, f"T[{task}]")  # method rows follow: their keys name T's training, so they rebuild
    rows.append(_tagged(run.evaluate(f"T[{task}]", t_model, t_tok, tasks=[task], attacks=run.attacked("undefended")),
                        task, "undefended"))
    run.snapshot(rows)
    t_card = read_card(Path(t_ref) / RUN_CARD) or {}
    # what every defence depends on: a retrained T or a re-extracted adapter invalidates it
    upstream = {"adapter": adapter.card.get("bench"), "selected": selected.card.get("bench"),
                "task_model": {"data": t_card.get("data"), "trained_s": (t_card.get("training") or {}).get("seconds")}}
    ctx = _method_context(run, task, t_ref, t_model, t_tok, n_examples, adapter, selected)
    defended = {"undefended": (f"T[{task}]", Defence(), {})}
    for method in map(get_method, cfg.methods):
        name = f"T[{task}]+{method.label}"
        key = {**method.key(ctx), **({"upstream": upstream} if method.upstream else {})}
        defence, seconds, fresh_defence = _defence_stage(method, ctx, run.out / "methods" / task / method.name, key)
        if fresh_defence:
            _forget(run.responses, name)
        row = _evaluate_defended(run.evaluate, name, defence, t_model, t_tok, cfg.placement, tasks=[task],
                                 attacks=run.attacked(method.name))
        run.timings[f"{method.name}_{task}_s"] = seconds
        rows.append(_tagged(row, task, method.name, seconds, **defence.row))
        run.snapshot(rows)
        # a re-attack of a retrained model is invalidated by retraining it, even with the same config
        defended[method.name] = (name, defence, {**key, "trained_s": seconds} if defence.model else key)
    if cfg.reattack_tasks is None or task in cfg.reattack_tasks:
        for method in cfg.reattack_methods:
            reprotect_with = _reprotected_by(cfg, method)
            for steps in cfg.reattack_steps:
                row, kept = _reattack(run, task, method, steps, *defended[method], t_ref, t_tok, upstream,
                                      keep_model=bool(reprotect_with))
                reattacked.append(row)
                if kept:
                    reprotected += _reprotect(run, task, row, *kept, reprotect_with, n_examples, adapter, selected)
                run.snapshot(rows)


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    from .evaluation.harness import attack_tag, evaluate_model, judge_agreement

    for task in cfg.tasks:  # fail on a misspelt task before an hour of work, not after
        get_task(task).load("test", n=1)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start, timings = time.perf_counter(), {}
    if cfg.model == DEFAULT_MODEL:
        t = time.perf_counter()
        prepare_model(cfg.model)
        timings["prepare_model_s"] = round(time.perf_counter() - t, 1)
    sets = _eval_sets(cfg, out / "responses")
    judges, validation = _validated_judges(cfg)
    run = _Run(cfg, out, out / "responses", timings=timings, progress=progress, evaluate=functools.partial(
        evaluate_model, sets=sets, judges=judges, gen=cfg.generation, responses_dir=out / "responses"))

    rows: list[ResultRow] = []
    reattacked: list[ResultRow] = []
    reprotected: list[ResultRow] = []
    selected_layers: list[int] = []

    def results_of(done: list[ResultRow]) -> BenchResults:
        return BenchResults(
            model=cfg.model, config=to_dict(cfg), rows=done, reattack=reattacked, reprotect=reprotected,
            versions=library_versions(),
            selected_layers=selected_layers, timings=timings, method_labels=method_labels(),
            judges={"validation": validation, "agreement": judge_agreement([r.to_dict() for r in done])},
            eval={"harmful": cfg.harmful, "n_harmful": len(sets.harmful),
                  "attacks": {a: len(v) for a, v in sets.attacks.items()},
                  # which stored answer files the rows were judged on (their names carry these hashes): for rejudge
                  "attack_tags": {a: attack_tag(v) for a, v in sets.attacks.items()},
                  "over_refusal": sets.over_refusal_source,
                  "n_over_refusal": len(sets.over_refusal), "n_task": cfg.n_task,
                  "max_new_tokens": cfg.generation.max_new_tokens,
                  "over_refusal_tokens": sets.over_refusal_generation(cfg.generation).max_new_tokens},
            extra={"config_yaml": dump_yaml(cfg)})

    eta = _RowClock(total=2 + len(cfg.tasks) * (1 + len(cfg.methods)))

    def snapshot(done: list[ResultRow]) -> None:
        _write_partial(results_of(list(done)), out)
        print(eta.tick(len(done), done[-1].name), flush=True)

    run.snapshot = snapshot
    adapter, selected = _family(run, rows)
    selected_layers[:] = selected.layers
    task_models = {task: _task_model(run, task) for task in cfg.tasks}
    for task, (t_ref, n_examples, fresh) in task_models.items():
        _task_rows(run, task, t_ref, n_examples, fresh, adapter, selected, rows, reattacked, reprotected)

    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    written = _written(results_of(rows), out)
    for f in out.glob(f"{PARTIAL}.*"):
        f.unlink()
    return written


class _RowClock:
    """The bench's overall progress line: rows done of all, and an ETA from the rows this process computed (rows
    answered from stored generations take seconds and would make a resumed run look nearly done)."""

    def __init__(self, total: int):
        self.total, self.start, self.last, self.computed = total, time.perf_counter(), time.perf_counter(), []

    def tick(self, done: int, name: str) -> str:
        now = time.perf_counter()
        if now - self.last > 20:  # a row that took real work, not a reload of stored answers
            self.computed.append(now - self.last)
        self.last = now
        left = max(self.total - done, 0)
        per_row = sum(self.computed) / len(self.computed) if self.computed else None
        eta = f", about {per_row * left / 60:.0f} min left at {per_row / 60:.1f} min a row" if per_row and left else ""
        return f"[bench] {done}/{self.total} rows done ({name}); {(now - self.start) / 60:.0f} min so far{eta}"


#: the rows finished so far of a run still going (or stopped): results.partial.json and .md, removed at the end
PARTIAL = "results.partial"


def _write_partial(results: BenchResults, out: Path) -> None:
    """Write what is finished, so a run longer than a session leaves readable figures. Never stops the run."""
    import logging

    from .evaluation.report import markdown
    from .io import atomic_file

    data = {**results.to_dict(), "complete": False}
    try:
        write_json(out / f"{PARTIAL}.json", data)
        with atomic_file(out / f"{PARTIAL}.md") as f:
            f.write(f"**Partial: {len(results.rows)} row(s) finished; the run has not ended.**\n\n" + markdown(data)
                    + "\n")
    except Exception as e:  # noqa: BLE001 - a report of partial rows must not end a run of hours
        logging.getLogger(__name__).warning("could not write the partial results (%s); the run goes on", e)


def _written(results: BenchResults, out: Path) -> dict[str, Any]:
    from .evaluation.report import write_reports

    data = results.to_dict()
    paths = write_reports(data, out)
    data["paths"] = {k: str(v) for k, v in paths.items()}
    return data


#: inside a kept re-attacked model's folder: the re-attack card it was trained under (the row's card, copied)
REATTACK_CARD = "reattack.json"


def _reattack(run: _Run, task: str, method: str, steps: int, name: str, defence: Defence, key: dict[str, Any],
              t_ref: str, t_tok: Any, upstream: dict[str, Any],
              keep_model: bool = False) -> tuple[ResultRow, tuple[Path, dict[str, Any]] | None]:
    """Fine-tune the defended model once more on a few harmful pairs (LoRA, `steps`) and measure its harmful rate
    again. A weight update is merged into T first; an inference-time defence keeps wrapping the re-attacked weights
    (the attacker changes the weights, not the serving stack); a retrained model is re-attacked itself.

    With `keep_model` (it is to be re-protected) the re-attacked model is merged and saved once, as a model folder
    under reattack/<task>/<method>-<steps>/model, and evaluated as saved; returns (row, (that folder, the re-attack
    card)), else (row, None)."""
    from .apply import apply_adapter
    from .data import prompt_response_pairs
    from .evaluation.harness import slug
    from .io import atomic_dir
    from .training import train_lora

    cfg = run.cfg
    row_name = f"{name} re-attacked {steps} steps"
    settings = {"data": cfg.reattack_data, "examples": cfg.reattack_examples, "train": to_dict(cfg.steps(steps))}
    full_key = {"reattack": settings, "defence": key, "upstream": upstream}
    card_path = run.out / "reattack" / task / f"{method}-{steps}.json"
    model_dir = card_path.with_suffix("") / "model"
    card = read_card(card_path)
    if not (card and same_config(card.get("key"), full_key)):
        _forget(run.responses, row_name)
        card = None
    # the kept model is the one whose answers are stored: the same card, down to when it was trained
    have_model = card is not None and read_card(model_dir / REATTACK_CARD) == card
    if card is not None and keep_model and not have_model:
        print(f"[re-attack {task}] {row_name}: no kept model (re-attacked by a run without re-protection); training "
              "it again, and answering again with the model kept")
        _forget(run.responses, row_name)
        card = None
    complete = _complete(run.responses / f"{slug(row_name)}.harmful.jsonl", cfg.n_harmful)
    model = None
    if card is None or not (complete or have_model):
        print(f"[re-attack {task}] {name}: {steps} LoRA steps on {cfg.reattack_examples} harmful pairs")
        model = load_model(defence.model or t_ref, cfg.placement)
        if defence.update is not None:
            apply_adapter(defence.update, model, mode="merge")
        pairs = prompt_response_pairs(cfg.reattack_data, n=cfg.reattack_examples, seed=cfg.seed + 101)
        model, stats = train_lora(model, t_tok, pairs, cfg.steps(steps), progress=run.progress)
        # when it was trained tells two trainings of the same config apart (their seconds may round alike): what is
        # built on the kept model is keyed on it
        card = {"key": full_key, "training": stats.to_dict(),
                "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        if keep_model:
            # merged, and evaluated as merged: the row and its re-protections measure exactly the weights kept
            model = model.merge_and_unload()
            with atomic_dir(model_dir, overwrite=True) as tmp:
                model.save_pretrained(str(tmp), safe_serialization=True)
                t_tok.save_pretrained(str(tmp))
                write_json(tmp / REATTACK_CARD, card)
            card = read_card(model_dir / REATTACK_CARD)  # as JSON holds it, so a re-run compares like with like
        write_json(card_path, card)
    elif not complete:  # answers cut short by an interrupted run: the kept model finishes them, no training
        model = load_model(model_dir, cfg.placement)
    row = run.evaluate(row_name, model, t_tok, over_refusal=False, responder=defence.responder)
    row = _tagged(row, task, method, defence_row=name, reattack={
        "steps": steps, "examples": cfg.reattack_examples, "seconds": card["training"]["seconds"],
        "final_loss": card["training"]["final_loss"]})
    return row, ((model_dir, card) if keep_model else None)


def _reprotect(run: _Run, task: str, reattacked: ResultRow, folder: Path, card: dict[str, Any], methods: list[str],
               n_examples: int, adapter: Any, selected: Any) -> list[ResultRow]:
    """Apply each method again to a re-attacked model (kept in `folder`), as its user would after fine-tuning the
    protected model once more: the method is built from the re-attacked weights exactly as it was built from T
    (SafeGene recalibrated on them, RESTA refitted, Safe LoRA / SafeMERGE on their difference from A, re-align
    trained on them), then evaluated like a defended T: harmful prompts, over-refusal and the task."""
    cfg = run.cfg
    ref = str(folder)
    model, tok = load_model(ref, cfg.placement), load_tokenizer(ref)
    ctx = _method_context(run, task, ref, model, tok, n_examples, adapter, selected)
    # what every re-protection depends on: the re-attacked weights (their key, and their training: a re-attack
    # trained again, even with the same config, rebuilds them) and the family's adapter
    upstream = {"adapter": adapter.card.get("bench"), "selected": selected.card.get("bench"),
                "task_model": {"reattack": card["key"], "trained_at": card["trained_at"]}}
    out = []
    for method in map(get_method, methods):
        name = f"{reattacked.name} + re-protected {method.label}"
        key = {**method.key(ctx), **({"upstream": upstream} if method.upstream else {})}
        defence, seconds, fresh = _defence_stage(method, ctx, folder.parent / "reprotected" / method.name, key,
                                                 label=f"re-protect {task}: {reattacked.name} + {method.name}")
        if fresh:
            _forget(run.responses, name)
        row = _evaluate_defended(run.evaluate, name, defence, model, tok, cfg.placement, tasks=[task])
        steps = reattacked.extra["reattack"]["steps"]
        out.append(_tagged(row, task, method.name, seconds, **defence.row, reprotect={
            "method": method.name, "seconds": seconds, "of": reattacked.name, "steps": steps}))
    return out


@dataclass
class RejudgeConfig:
    """Add judges to a finished bench from its stored responses (no generation)."""

    output: str | None = opt(None, "the bench's output folder (with results.json and responses/)", positional=True)
    judges: list[str] = opt([], "judges to add (repeatable)", aliases=("--judge",))
    validate: bool = opt(True, "measure each added judge against human labels")
    placement: PlacementConfig = opt(PlacementConfig(), "where an llm:<model> judge runs, in what dtype (--device, "
                                     "--dtype, --device-map)", added_later=True)


def stored_attack_answers(base: Path, attack: str, eval_info: dict[str, Any], n: int) -> Path:
    """The file of a row's answers to `attack` that the run judged: the one its results name by hash; for a run from
    before they were named, the only stored file of that attack with `n` answers (an error where several have)."""
    from .errors import SafegeneError
    from .evaluation.harness import attack_answers_path
    from .generation import read_jsonl_rows

    if tag := (eval_info.get("attack_tags") or {}).get(attack):
        return attack_answers_path(base, attack, tag=tag)
    fitting = [f for f in sorted(base.parent.glob(f"{base.name}.attack-{attack}-*.jsonl"))
               if len(read_jsonl_rows(f)) == n]
    if len(fitting) > 1:
        raise SafegeneError(f"{base.name}: {len(fitting)} stored answer files for attack {attack} with {n} answers "
                            f"({', '.join(f.name for f in fitting)}), and results.json does not say which was judged; "
                            "remove the stale ones or re-run the bench")
    return fitting[0] if fitting else attack_answers_path(base, attack, tag="missing")


def rejudge(output: str | Path, judges: list[str], validate: bool = True,
            placement: PlacementConfig | None = None) -> dict[str, Any]:
    """Add judges to a finished bench without generating again: read its stored responses, judge them, rewrite
    results.json, results.md and report.html. A judge already present is judged again (its numbers replaced).
    `placement` places an llm:<model> judge (None: the CPU in float32)."""
    from .errors import SafegeneError
    from .evaluation.answer_forms import answer_forms
    from .evaluation.harness import judge_agreement, judge_responses, slug, stored_request
    from .evaluation.judge_validation import human_labelled, validate_judge
    from .evaluation.judges import get_judge
    from .evaluation.results import JudgedRate
    from .generation import read_jsonl_rows

    out = Path(output)
    stored = read_card(out / "results.json")
    if not stored:
        raise SafegeneError(f"{out}: no results.json; run `safegene bench` first")
    results = BenchResults.from_dict(stored)

    def judged(path: Path, expected_n: int, judge: Any) -> tuple[JudgedRate, str]:
        if not path.is_file():
            raise SafegeneError(f"{path}: stored responses are missing; re-run the bench")
        items = read_jsonl_rows(path)
        if len(items) != expected_n:
            raise SafegeneError(f"{path}: {len(items)} responses, but the row was judged on {expected_n}")
        summary, verdicts = judge_responses(judge, [stored_request(r) for r in items],
                                            [r.get("category", "uncategorized") for r in items],
                                            [r["response"] for r in items])
        return JudgedRate.from_dict(summary), verdicts

    for judge in (get_judge(j, placement) for j in judges):
        for row in results.rows + results.reattack + results.reprotect:
            print(f"[{judge.name}] {row.name}")
            first = next(iter(row.harmful.values())).overall
            row.harmful[judge.name], row.verdicts[judge.name] = judged(
                out / "responses" / f"{slug(row.name)}.harmful.jsonl", first.n + first.unparsed, judge)
            for attack, by_judge in (row.attacks or {}).items():
                n = next(iter(by_judge.values())).overall
                by_judge[judge.name], verdicts = judged(stored_attack_answers(out / "responses" / slug(row.name), attack,
                                                                              results.eval, n.n + n.unparsed),
                                                        n.n + n.unparsed, judge)
                # a run from before attack verdicts were kept gets them for the judges rejudged
                row.attack_verdicts = row.attack_verdicts or {}
                row.attack_verdicts.setdefault(attack, {})[judge.name] = verdicts
        if validate:
            results.judges["validation"][judge.name] = validate_judge(judge, human_labelled())
        results.config["judges"] = list(dict.fromkeys(results.config["judges"] + [judge.name]))
    # answer forms of runs from before they were recorded
    for row in results.rows + results.reattack + results.reprotect:
        path = out / "responses" / f"{slug(row.name)}.harmful.jsonl"
        if row.answer_forms is None and path.is_file():
            row.answer_forms = answer_forms([r["response"] for r in read_jsonl_rows(path)])
    results.judges["agreement"] = judge_agreement([r.to_dict() for r in results.rows])
    return _written(results, out)
