"""`safegene` command line: a thin layer over the library API, generated from the configs.

Each command is one config dataclass and one library call. Its flags come from the config's fields (name, type,
default, help text, allowed values), nested configs as dotted flags (`--train.max-steps`, also `--max-steps` where
that leaf name is unambiguous); every command also takes `--config FILE.yaml` (same keys), `--set key.sub=value`
and `--run-card PATH`. Flags override the file, which overrides the defaults. A command that writes an output folder
writes `safegene_run.json` into it (see `safegene.runcard`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import NULL, opt
from .errors import ConfigError, SafegeneError
from .models.registry import DEFAULT_MODEL

_POSITIONAL = "_positional_"


# --- commands whose config lives here: they only read and print --------------------------------------------------


@dataclass
class ModelsConfig:
    """List the embedded models, or prepare one (assemble, verify, convert to safetensors, cache)."""

    action: str = opt("list", "list or prepare", choices=("list", "prepare"), positional=True)
    name: str = opt(DEFAULT_MODEL, "embedded model to prepare", positional=True)
    force: bool = opt(False, "rebuild the cached safetensors folder")


@dataclass
class DataConfig:
    """List the built-in data sets and tasks, or show a few records of one."""

    action: str = opt("list", "list or show", choices=("list", "show"), positional=True)
    name: str | None = opt(None, "data set or task to show", positional=True)
    n: int = opt(3, "records shown", aliases=("-n",))
    split: str = opt("train", "split of a task", choices=("train", "test"))


# --- the library calls ----------------------------------------------------------------------------------------------


def _print_training_card(card: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(card, indent=2, default=str))
        return
    tr = card["training"]
    print(f"{card['kind']}: wrote {card['output']}")
    print(f"  {card['data']['n_pairs']} pairs, {tr['steps']} steps, mean loss of first/last 5 steps "
          f"{tr['loss_first5_mean']:.3f} -> {tr['loss_last5_mean']:.3f}, "
          f"{tr['seconds_per_step']:.2f} s/step, peak RSS {tr['peak_rss_mb']:.0f} MB")


def run_models(cfg: ModelsConfig, flags: argparse.Namespace) -> Path | None:
    from .models import EMBEDDED_MODELS, cache_dir, prepare_model
    from .runcard import peak_rss_mb

    if cfg.action == "list":
        for spec in EMBEDDED_MODELS.values():
            folder = cache_dir() / "models" / spec.name
            state = "cached" if (folder / "safegene_model.json").exists() else "not converted"
            aligned = "aligned" if spec.safety_aligned else "NOT aligned"
            print(f"{spec.name:30s} {spec.approx_params:>5s}  {aligned:11s}  {state:13s}  {spec.description}")
        return None
    t0 = time.perf_counter()
    path = prepare_model(cfg.name, force=cfg.force)
    print(f"{cfg.name}: {path}  ({time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB)")
    return None


def run_data(cfg: DataConfig, flags: argparse.Namespace) -> None:
    from .data import DATASETS, TASKS, dataset_info, get_task, load_builtin

    if cfg.action == "list":
        print("data sets:")
        for d in DATASETS.values():
            print(f"  {d.name:28s} {d.kind:9s} {d.description}")
        print("tasks (exact answers):")
        for t in TASKS.values():
            print(f"  {t.name:28s} {'':9s} {t.description}")
        return
    if not cfg.name:
        raise ConfigError("data show needs a NAME: safegene data show arithmetic (see `safegene data list`)")
    if cfg.name in TASKS:
        rows: list[Any] = get_task(cfg.name).load(cfg.split)
    else:
        dataset_info(cfg.name)
        rows = load_builtin(cfg.name)
    print(f"{cfg.name}: {len(rows)} records")
    for r in rows[: cfg.n]:
        print(json.dumps({k: (v[:200] + "..." if isinstance(v, str) and len(v) > 200 else v)
                          for k, v in vars(r).items()}, ensure_ascii=False))


def _main_process() -> bool:
    """Under `accelerate launch` every process runs the command (RANK is its index): the first one alone prints the
    result and writes the run card."""
    import os

    return os.environ.get("RANK", "0") == "0"


def run_degrade(cfg: Any, flags: argparse.Namespace) -> None:
    from .training import degrade

    card = degrade(cfg, overwrite=flags.overwrite)
    if _main_process():
        _print_training_card(card, flags.json)


def run_finetune(cfg: Any, flags: argparse.Namespace) -> None:
    from .training import finetune

    card = finetune(cfg, overwrite=flags.overwrite)
    if _main_process():
        _print_training_card(card, flags.json)


def run_eval_refusal(cfg: Any, flags: argparse.Namespace) -> None:
    from .evaluation import evaluate_refusal
    from .io import write_json

    res = evaluate_refusal(cfg)
    if cfg.save_json:
        write_json(cfg.save_json, res)
    r = res["refusal"]
    print(f"{cfg.model}: refusal rate {r['rate']:.3f} (95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}, n={r['n']}, "
          f"judge={res['judge']}) in {res['seconds']:.0f} s")
    for c, v in res["by_category"].items():
        print(f"  {c:40s} {v['rate']:.3f} (n={v['n']})")


def run_extract(cfg: Any, flags: argparse.Namespace) -> None:
    from .adapter import extract_adapter

    ad = extract_adapter(cfg, overwrite=flags.overwrite)
    c = ad.card
    print(f"extract: wrote {cfg.output}: {len(ad.factors)} modules over {len(ad.all_layers)} layers, rank {ad.rank}, "
          f"{c['timings']['total_s']:.1f} s, process peak RSS {c['process_peak_rss_mb']:.0f} MB")
    if c.get("distill"):
        print(f"  distillation KL to A: {c['distill']['kl_to_A']}")
    if c["untracked_drift"]:
        print(f"  note: {len(c['untracked_drift'])} non-target tensors differ between A and D (see safegene.json)")


def run_select(cfg: Any, flags: argparse.Namespace) -> None:
    from .adapter import SafetyAdapter
    from .selection import plot_layer_scores, select_layers

    out = select_layers(SafetyAdapter.load(cfg.adapter), cfg)
    out.save(cfg.output, overwrite=flags.overwrite, plot=lambda d: plot_layer_scores(out, d / "layer_scores.png"))
    sel = out.card["selection"]
    print(f"select: wrote {cfg.output}: layers {sel['selected_layers']} ({cfg.method}, {sel['seconds']:.0f} s)")
    for layer, v in sel["scores"].items():
        mark = "*" if int(layer) in sel["selected_layers"] else " "
        print(f"  {mark} layer {int(layer):3d}  {v:+.4f}")


def run_recalibrate(cfg: Any, flags: argparse.Namespace) -> None:
    from .adapter import SafetyAdapter
    from .recalibration import recalibrate

    out = recalibrate(SafetyAdapter.load(cfg.adapter), cfg)
    out.save(cfg.output, overwrite=flags.overwrite)
    rc = out.card["recalibration"]
    print(f"recalibrate: wrote {cfg.output} in {rc['seconds']:.0f} s")
    print("  α: " + ", ".join(f"{layer}:{v:.2f}" for layer, v in rc["coefficients"].items()))
    print(f"  objective: {rc['objective']}")


def run_apply(cfg: Any, flags: argparse.Namespace) -> None:
    from .adapter import SafetyAdapter
    from .apply import merge_to_folder

    out = merge_to_folder(SafetyAdapter.load(cfg.adapter), cfg.model, cfg.output, overwrite=flags.overwrite,
                          shard_bytes=cfg.shard_mb << 20, placement=cfg.placement)
    print(f"apply: wrote {out} (task model with the safety adapter merged)")


def run_gate(cfg: Any, flags: argparse.Namespace) -> None:
    from .adapter import SafetyAdapter
    from .serve.gate import gate_adapter

    out = gate_adapter(SafetyAdapter.load(cfg.adapter), cfg)
    out.save(cfg.output, overwrite=flags.overwrite)
    g = out.card["gate"]
    print(f"gate: wrote {cfg.output}: layer {g['layer']}, separation AUC {g['fit']['auc']:.3f} on the fitting "
          f"prompts, mean strength harmful {g['fit']['mean_strength_harmful']:.2f} / benign "
          f"{g['fit']['mean_strength_benign']:.2f}")


def run_serve(cfg: Any, flags: argparse.Namespace) -> None:
    import os

    from .serve import serve

    adapters = cfg.adapter_paths()
    print(f"serving {cfg.model} on http://{cfg.host}:{cfg.port}/v1 (adapters: {', '.join(adapters) or 'none'})",
          flush=True)
    serve(cfg.model, adapters, host=cfg.host, port=cfg.port, admin_token=os.environ.get(cfg.admin_token_env) or None,
          model_name=cfg.name, max_batch=cfg.max_batch, max_input_tokens=cfg.max_input_tokens, use_gate=cfg.use_gate,
          placement=cfg.placement)


def _print_bench(res: dict[str, Any]) -> None:
    print()
    print(Path(res["paths"]["md"]).read_text())
    print(f"report: {res['paths']['html']}" + (f"  (total {res['timings']['total_s']:.0f} s)"
                                                if "total_s" in res.get("timings", {}) else ""))


def run_bench(cfg: Any, flags: argparse.Namespace) -> None:
    from .bench import run_bench as bench

    _print_bench(bench(cfg))


def run_rejudge(cfg: Any, flags: argparse.Namespace) -> None:
    from .bench import rejudge

    _print_bench(rejudge(cfg.output, cfg.judges, validate=cfg.validate, placement=cfg.placement))


def run_judge(cfg: Any, flags: argparse.Namespace) -> None:
    from .evaluation.judge_validation import human_labelled, validate_judge
    from .evaluation.judges import get_judge
    from .io import write_json

    items = human_labelled()
    measured = {}
    for spec in cfg.judges:
        v = measured[spec] = validate_judge(get_judge(spec, cfg.placement), items)
        print(f"{v['judge']}: accuracy {v['accuracy']['rate']:.3f} (95% CI {v['accuracy']['ci95'][0]:.2f}-"
              f"{v['accuracy']['ci95'][1]:.2f}, n={v['n']}), TPR {v['true_positive_rate']['rate']:.3f}, "
              f"TNR {v['true_negative_rate']['rate']:.3f}, κ vs human {v['kappa_vs_human']}, AUC {v['auc']}, "
              f"{v['seconds_per_item'] * 1000:.1f} ms/item")
    if cfg.output:
        write_json(cfg.output, measured)


def run_family_build(cfg: Any, flags: argparse.Namespace) -> None:
    from .protect import build_family

    family = build_family(cfg)
    t = family["timings"]
    print(f"family: wrote {cfg.output}: layers {family['selected_layers']} of {family['aligned']} "
          f"(degrade {t['degrade_s']:.0f} s, extract {t['extract_s']:.0f} s, select {t['select_s']:.0f} s; "
          f"this run {t['total_s']:.0f} s)")


def _print_protect(results: dict[str, Any], output: str) -> int:
    from .protect import LIMITS_FAILED

    rows = results["rows"]
    split = results.get("split")
    if split:
        print(f"  task data {split['data']}: {split['n_rows']} rows -> {split['n_shots']} recalibration shots, "
              f"{split['n_check']} held-out check items (seed {split['seed']})")
    for judge in results["judges"]:
        cells = [f"{r['harmful'][judge]['overall']['rate']:.3f} (n={r['harmful'][judge]['overall']['n']})"
                 for r in rows]
        print(f"  harmful, {judge}: " + " -> ".join(cells))
    over = [r.get("over_refusal") for r in rows]
    if all(over):
        print("  over-refusal: " + " -> ".join(f"{o['rate']:.3f} (n={o['n']})" for o in over))
    u = results.get("utility")
    if u:
        rates = [x for x in (u.get("before"), u.get("after")) if x]
        print(f"  utility ({u['kind']}): " + " -> ".join(f"{x['rate']:.3f}" for x in rates) + f" (n={u['n']})"
              + (f", response log-likelihood change {u['loglik_change']:+.3f}" if u.get("loglik_change") is not None
                 else ""))
    print(f"  report: {Path(output) / 'report.html'}  ({results['timings']['total_s']:.0f} s)")
    limits = results.get("limits")
    if limits and limits["failed"]:
        print("safegene: limits failed: " + "; ".join(limits["failed"]), file=sys.stderr)
        return LIMITS_FAILED
    return 0


def run_protect(cfg: Any, flags: argparse.Namespace) -> int:
    from .protect import protect

    results = protect(cfg, overwrite=flags.overwrite, argv=flags.argv)
    print(f"protect: wrote {cfg.output}: adapter" + (" + merged model" if results["merged"] else "")
          + f", α {results['coefficients']}")
    return _print_protect(results, cfg.output)


def run_eval(cfg: Any, flags: argparse.Namespace) -> int:
    from .protect import evaluate

    results = evaluate(cfg, overwrite=flags.overwrite, argv=flags.argv)
    print(f"eval: wrote {cfg.output}")
    return _print_protect(results, cfg.output)


def run_demo(cfg: Any, flags: argparse.Namespace) -> None:
    from .demo import run_demo as demo

    _print_bench(demo(output=cfg.output, quick=cfg.quick, overwrite=flags.overwrite, model=cfg.model,
                      placement=cfg.placement))


# --- the command table ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: Callable[[], type]  # imported lazily: `safegene --help` must not import torch
    run: Callable[[Any, argparse.Namespace], int | None]  # returns an exit status, or None for 0
    required: tuple[str, ...] = ()  # config fields the command cannot do without
    output: str | None = None  # the config field naming the output folder (gets the run card)
    card_next_to: str | None = None  # or the field naming an output file (the card goes to FILE.run.json)
    config_positional: bool = False  # `safegene bench CONFIG.yaml`
    inputs: tuple[str, ...] = ()  # config fields naming inputs, hashed into the run card
    json_flag: bool = False
    overwrite: bool = False  # offers --overwrite (the command replaces an existing output when asked)
    card_name: str = "safegene_run.json"  # the card's file name in the output folder
    card_first: bool = False  # write the card before running (a server runs until it is stopped)


def _cfg(module: str, name: str) -> Callable[[], type]:
    def load() -> type:
        import importlib

        return getattr(importlib.import_module(module), name)
    return load


COMMANDS = [
    Command("models", "list embedded models or prepare (assemble, verify, convert) one",
            lambda: ModelsConfig, run_models),
    Command("data", "list built-in data sets and tasks, or show a few records", lambda: DataConfig, run_data),
    Command("degrade", "fine-tune the aligned model on harmful pairs -> degraded model D",
            _cfg("safegene.training", "DegradeConfig"), run_degrade, output="output", inputs=("model",), json_flag=True,
            overwrite=True),
    Command("finetune", "fine-tune a model on a task (optionally poisoned) -> task model T",
            _cfg("safegene.training", "FinetuneConfig"), run_finetune, output="output", inputs=("model", "task"),
            json_flag=True, overwrite=True),
    Command("eval-refusal", "refusal rate on harmful prompts (refusal-phrase judge)",
            _cfg("safegene.evaluation.refusal", "RefusalEvalConfig"), run_eval_refusal, card_next_to="save_json",
            inputs=("model",)),
    Command("extract", "aligned A + degraded D -> safety adapter (PEFT-loadable folder)",
            _cfg("safegene.adapter.extract", "ExtractConfig"), run_extract, output="output",
            inputs=("aligned", "degraded"), overwrite=True),
    Command("select", "score layers with harmful/benign prompts; keep the top ones",
            _cfg("safegene.selection", "SelectConfig"), run_select, required=("adapter", "output"), output="output",
            inputs=("adapter", "model"), overwrite=True),
    Command("recalibrate", "learn one coefficient per selected layer for a task model",
            _cfg("safegene.recalibration", "RecalibrateConfig"), run_recalibrate, required=("adapter", "output"),
            output="output", inputs=("adapter", "task_model"), overwrite=True),
    Command("apply", "merge a (calibrated) adapter into a task model -> new HF folder",
            _cfg("safegene.apply", "ApplyConfig"), run_apply, required=("adapter", "model", "output"),
            output="output", inputs=("adapter", "model"), overwrite=True),
    Command("bench", "run a benchmark config: models x defences x judges -> results + report.html",
            _cfg("safegene.bench", "BenchConfig"), run_bench, output="output", config_positional=True),
    Command("rejudge", "add judges to a finished bench from its stored responses (no generation)",
            _cfg("safegene.bench", "RejudgeConfig"), run_rejudge, required=("output", "judges"), output="output",
            card_name="safegene_run.rejudge.json"),
    Command("judge", "measure judges against PyRIT's human-labelled responses",
            _cfg("safegene.evaluation.judge_validation", "JudgeValidationConfig"), run_judge,
            card_next_to="output"),
    Command("gate", "fit the adaptive gate of an adapter on the model it will serve with",
            _cfg("safegene.serve.gate", "GateConfig"), run_gate, required=("adapter", "output"), output="output",
            inputs=("adapter", "model"), overwrite=True),
    Command("serve", "OpenAI-compatible server with per-request safety adapters and hot swap",
            _cfg("safegene.serve.server", "ServeConfig"), run_serve, inputs=("model",), card_first=True),
    Command("family build", "once per model family: degrade A, extract A - D, select layers -> a family folder",
            _cfg("safegene.protect", "FamilyConfig"), run_family_build, required=("output",), output="output",
            inputs=("aligned",)),
    Command("protect", "after every fine-tune: recalibrate the family's adapter on T, measure before/after, write "
            "adapter, report and model card", _cfg("safegene.protect", "ProtectConfig"), run_protect,
            required=("model", "family", "task_data", "output"), output="output",
            inputs=("model", "family", "task_data"), overwrite=True),
    Command("eval", "measure any model (optionally with an adapter): harmful rate, over-refusal, utility, report",
            _cfg("safegene.protect", "EvalConfig"), run_eval, required=("model", "output"), output="output",
            inputs=("model", "adapter", "task_data"), overwrite=True),
    Command("demo", "the pipeline and benchmark end to end on the embedded default model",
            _cfg("safegene.demo", "DemoConfig"), run_demo, output="output", overwrite=True),
]


# --- flags from config fields -----------------------------------------------------------------------------------------


@dataclass
class _Flag:
    dest: str  # dotted config key
    field: dataclasses.Field
    type: Any
    leaf_alias: bool  # also offered under its own name (`--max-steps` for `train.max_steps`) where unambiguous


def _flags(cls: type, prefix: str = "") -> list[_Flag]:
    hints = typing.get_type_hints(cls)
    out: list[_Flag] = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += _flags(t, f"{prefix}{f.name}.")
        else:
            # a nested config opts in to short flags for its fields (the LoRA and decoding settings that every
            # training and evaluation command shares); others keep only their dotted names
            out.append(_Flag(prefix + f.name, f, t, bool(prefix) and getattr(cls, "cli_leaf_flags", False)
                             and f.metadata.get("leaf_flag", True)))
    return out


def _base_type(t: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    args = typing.get_args(t)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return t, False


def _parse_value(none_ok: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        # values stay strings here: the config reader converts them, so a bad value reads the same from a flag as
        # from YAML ("expected int, got 'ten'")
        return NULL if none_ok and text.lower() in ("none", "null") else text
    return parse


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default) if f.default is not None else "none"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return ",".join(map(str, value)) if isinstance(value, list) else "…"
    return "required"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    flags = _flags(cls)
    primary = {"--" + fl.dest.replace("_", "-") for fl in flags}
    wanted: dict[str, list[str]] = {}  # extra spelling -> dests that want it
    for fl in flags:
        spellings = list(fl.field.metadata.get("aliases", ()))
        if fl.leaf_alias:
            spellings.append("--" + fl.field.name.replace("_", "-"))
        for s in spellings:
            wanted.setdefault(s, []).append(fl.dest)
    taken = {"--config", "--set", "--run-card", "--overwrite", "--json", "-h", "--help"}
    for fl in flags:
        meta = fl.field.metadata
        base, none_ok = _base_type(fl.type)
        # an extra spelling is offered only where it is unambiguous within this command
        names = ["--" + fl.dest.replace("_", "-")] + [
            s for s, dests in wanted.items() if dests == [fl.dest] and s not in primary and s not in taken]
        allowed = f"; one of {', '.join(meta['choices'])}" if meta.get("choices") else ""
        help_text = f"{meta.get('help', '')} (default: {_default_text(fl.field)}{allowed})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": fl.dest, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kw.update(action="append", metavar="A[,B...]", type=_parse_value(none_ok))
        else:
            kw.update(type=_parse_value(none_ok), metavar=fl.field.name.upper())
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
        if meta.get("positional"):
            many = typing.get_origin(base) is list
            # no argparse `choices` here: argparse would test the absent default against them; the config checks
            parser.add_argument(_POSITIONAL + fl.dest, nargs="*" if many else "?", default=argparse.SUPPRESS,
                                metavar=fl.field.name.upper(), help=f"same as --{fl.dest.replace('_', '-')}")
        parser.add_argument(*names, **kw)


def overrides_from(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dotted config keys that the command line set (and only those: unset flags leave the file's values)."""
    values = vars(args)
    out: dict[str, Any] = {}
    for fl in _flags(cls):
        given = [values[k] for k in (_POSITIONAL + fl.dest, fl.dest) if values.get(k) not in (None, [])]
        if not given:
            continue
        if len(given) == 2 and given[0] != given[1]:
            raise ConfigError(f"{fl.dest} is given twice ({given[0]} and --{fl.dest.replace('_', '-')} {given[1]}); "
                              "give it once")
        v = given[0]
        if isinstance(v, list):
            # repeated flags and comma lists both mean a list: --judges a --judges b,c -> [a, b, c]; "none" clears it
            v = NULL if NULL in v else [part.strip() for item in v for part in str(item).split(",") if part.strip()]
        out[fl.dest] = v
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.max_steps=10), got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def command_named(argv: Sequence[str]) -> str:
    """The command an argument list runs ("" when it names none): global options take no value, so the first words
    that are not options name it."""
    words = [a for a in argv if not a.startswith("-")][:2]
    names = {cmd.name for cmd in COMMANDS}
    return next((n for n in (" ".join(words), words[0] if words else "") if n in names), "")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, flags for that command alone (the others are listed by name), so that
    running one command does not import every stage's module (the server's config alone pulls in FastAPI)."""
    from . import __version__

    ap = argparse.ArgumentParser(prog="safegene", description="Reusable safety adapters for fine-tuned LLMs.")
    ap.add_argument("--version", action="version", version=f"safegene {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}  # "family build": a command group with its own verbs
    for cmd in COMMANDS:
        where, name = sub, cmd.name
        if " " in cmd.name:
            group, name = cmd.name.split(" ", 1)
            if group not in groups:
                groups[group] = sub.add_parser(group, help=f"{group} commands").add_subparsers(
                    dest=f"{group}_command", required=True)
            where = groups[group]
        if only is not None and cmd.name != only:
            where.add_parser(name, help=cmd.help)
            continue
        cls = cmd.config()
        p = where.add_parser(name, help=cmd.help, description=(cls.__doc__ or cmd.help).strip())
        if cmd.config_positional:
            p.add_argument("config_file", nargs="?", metavar="CONFIG.yaml", help="same as --config")
        p.add_argument("--config", help=f"YAML file with {cls.__name__} keys (flags override it)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, dotted (repeatable)")
        p.add_argument("--run-card", metavar="PATH", help="also write the run card here")
        if cmd.overwrite:
            p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        if cmd.json_flag:
            p.add_argument("--json", action="store_true", help="print the run card as JSON")
        add_config_arguments(p, cls)
        p.set_defaults(command_spec=cmd, config_class=cls)
    return ap


def command_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its full name ("family build" included)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = command_parsers(sub, f"{prefix}{name} ")
                out.update(nested or {f"{prefix}{name}": sub})
    return out


def _card_paths(cmd: Command, cfg: Any, args: argparse.Namespace) -> list[Path]:
    paths = []
    if cmd.output and getattr(cfg, cmd.output, None) and Path(getattr(cfg, cmd.output)).is_dir():
        paths.append(Path(getattr(cfg, cmd.output)) / cmd.card_name)
    if cmd.card_next_to and getattr(cfg, cmd.card_next_to, None):
        paths.append(Path(str(getattr(cfg, cmd.card_next_to)) + ".run.json"))
    if args.run_card:
        paths.append(Path(args.run_card))
    return paths


def _write_cards(cmd: Command, cfg: Any, args: argparse.Namespace, started: float, began_at: float,
                 config_file: str | None) -> None:
    from .runcard import run_card, write_run_card

    paths = _card_paths(cmd, cfg, args)
    if paths and _main_process():
        card = run_card(cmd.name, cfg, inputs={name: getattr(cfg, name, None) for name in cmd.inputs},
                        started=started, config_file=str(config_file) if config_file else None)
        for path in paths:
            write_run_card(path, card, since=began_at)


def run_command(args: argparse.Namespace) -> int:
    from .config import load_config

    cmd: Command = args.command_spec
    cls = args.config_class
    started, began_at = time.perf_counter(), time.time()
    positional_file = getattr(args, "config_file", None)
    if args.config and positional_file and args.config != positional_file:
        raise ConfigError(f"two config files ({positional_file} and --config {args.config}); give one")
    config_file = args.config or positional_file
    cfg = load_config(cls, config_file, overrides_from(args, cls))
    missing = [name for name in cmd.required if getattr(cfg, name) in (None, [], "")]
    if missing:
        raise ConfigError(f"{cmd.name} needs {', '.join(missing)}: give " + " and ".join(
            f"--{m.replace('_', '-')}" for m in missing) + f" (see `safegene {cmd.name} --help`)")
    for flag in ("overwrite", "json"):
        if not hasattr(args, flag):
            setattr(args, flag, False)
    if cmd.card_first:
        _write_cards(cmd, cfg, args, started, began_at, config_file)
    status = cmd.run(cfg, args) or 0  # a command may end with a status of its own (protect's failed limits)
    if not cmd.card_first:
        _write_cards(cmd, cfg, args, started, began_at, config_file)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(argv) if argv is not None else sys.argv[1:]
    ap = build_parser(only=command_named(args))
    a = ap.parse_args(args)
    a.argv = args  # for the outputs that say how to reproduce them
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_command(a)
    except SafegeneError as e:
        if a.verbose:
            raise
        print(f"safegene: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safegene: interrupted; no partial output was left under the final name", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if a.verbose:
            raise
        print(f"safegene: error: unexpected {type(e).__name__}: {e} (run with -v for the traceback, and please "
              "report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
