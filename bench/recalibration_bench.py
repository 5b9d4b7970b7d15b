"""Recalibration cost next to re-aligning the same task model by safety SFT on the same shots, in one run.

    python bench/recalibration_bench.py --adapter runs/evidence/adapter-selected --task-model runs/evidence/task-sst2 \
        --task sst2 [--variants "optimizer=adam,steps=20;optimizer=line-search,search_points=2"] [--realign-steps 24]

Re-align is the bench's own `realign` baseline (`safegene.baselines.realign.realign`): a LoRA trained on T with the
recalibration's refusal shots and task shots, so both methods see exactly the same examples. Every recalibration
variant (a `;`-separated list of RecalibrateConfig overrides) runs on the same loaded T; the first is the reference.
Reports wall time, the time of each recalibration phase (cache of the lower layers; Adam: steps and objective checks;
line search: the gradient pass and the search), the objective before and after, and `recalibrate_vs_realign` =
recalibration seconds / re-align seconds (the issue's goal is <= 0.20; re-align's seconds include loading its own
copy of T, so `recalibrate_vs_realign_training` divides by its training loop alone). With `--eval-harmful N
--eval-over-refusal M`, each variant's adapter is attached to T and answers N held-out safety-eval prompts and M
over-refusal prompts; the harmful rate per judge and the over-refusal rate are compared with the first variant's on
the same prompts by exact McNemar tests, and with `--compare-with FILE` also with the first variant of an earlier
run that answered the same prompts. `--dtype` runs T, every recalibration and re-align in that dtype; `--repeat N`
alternates the variants and re-align N times in one process and records each repeat's ratio. Writes
bench/results/recalibration.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _value(text: str) -> object:
    """A JSON value (20, 0.1, true, "adam"), or the bare text (adam, line-search)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variants(text: str) -> list[dict[str, object]]:
    out = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        pairs = dict(kv.split("=", 1) for kv in chunk.split(","))
        out.append({k.strip(): _value(v.strip()) for k, v in pairs.items()})
    return out or [{}]


def evaluate(cal: object, model: object, tok: object, args: argparse.Namespace, name: str) -> dict:
    """Harmful rate per judge and over-refusal of T with `cal` attached, on the held-out prompts, with the per-prompt
    verdicts kept for the paired tests."""
    from safegene.data import harmful_prompts
    from safegene.evaluation.harness import EvalSets, evaluate_model, over_refusal_prompts
    from safegene.evaluation.judges import get_judge
    from safegene.generation import GenerationConfig

    over, source = over_refusal_prompts("auto", args.eval_over_refusal, 0)
    sets = EvalSets(harmful=harmful_prompts("safety-eval", n=args.eval_harmful, seed=0), over_refusal=over,
                    over_refusal_source=source, n_task=0, over_refusal_tokens=48)
    judges = [get_judge(j) for j in args.judges.split(",")]
    gen = GenerationConfig(max_new_tokens=args.eval_tokens, batch_size=32)
    with cal.attach(model):
        row = evaluate_model(name, model, tok, sets, judges, gen, Path(args.work) / "responses").to_dict()
    return {"n_harmful": len(sets.harmful), "n_over_refusal": len(over), "over_refusal_source": source,
            "max_new_tokens": args.eval_tokens,
            "harmful": {j: h["overall"] for j, h in row["harmful"].items()}, "verdicts": row["verdicts"],
            "over_refusal": row.get("over_refusal")}


def paired(ref: dict, ev: dict) -> dict:
    """Exact McNemar of two evaluations on the same prompts: harmful (each judge), over-refusal."""
    from safegene.evaluation.metrics import mcnemar_exact
    from safegene.evaluation.significance import verdict_bits

    return {**{f"harmful.{j}": mcnemar_exact(verdict_bits(ref["verdicts"][j]), verdict_bits(v))
               for j, v in ev["verdicts"].items()},
            "over_refusal": mcnemar_exact(verdict_bits(ref["over_refusal"]["verdicts"]),
                                          verdict_bits(ev["over_refusal"]["verdicts"]))}


def paired_with_first(rows: list[dict]) -> None:
    """Exact McNemar of each variant against the first on the same prompts."""
    for r in rows[1:]:
        r["paired_vs_first"] = paired(rows[0]["eval"], r["eval"])


def paired_with_file(rows: list[dict], path: str) -> dict:
    """Each variant against the first variant of another run's results file (e.g. the same fit in another dtype),
    on the same prompts; an error where that run answered other prompts."""
    other = json.loads(Path(path).read_text())["recalibrate"][0]
    ref = other.get("eval")
    if not ref:
        raise SystemExit(f"{path}: its first variant has no evaluation; run it with --eval-harmful")
    for r in rows:
        ev = r["eval"]
        if (ev["n_harmful"], ev["n_over_refusal"]) != (ref["n_harmful"], ref["n_over_refusal"]):
            raise SystemExit(f"{path} answered {ref['n_harmful']} + {ref['n_over_refusal']} prompts, this run "
                             f"{ev['n_harmful']} + {ev['n_over_refusal']}: give the same --eval-harmful and "
                             "--eval-over-refusal")
        r["paired_vs_file"] = paired(ref, ev)
    return {"file": path, "overrides": other["overrides"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="the selected safety adapter folder")
    ap.add_argument("--task-model", required=True)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--shots", type=int, default=32, help="harmful and task shots (each), as the bench")
    ap.add_argument("--variants", default="optimizer=adam,steps=20;optimizer=line-search",
                    help="';'-separated RecalibrateConfig overrides, k=v,k=v (default: the bench's Adam fit as first "
                         "written, then the line search)")
    ap.add_argument("--realign-steps", type=int, default=24, help="LoRA steps of re-align (the bench's default)")
    ap.add_argument("--eval-harmful", type=int, default=0,
                    help="also answer this many held-out safety-eval prompts with each variant's adapter attached "
                         "(0: off), for paired tests of the harmful rate against the first variant")
    ap.add_argument("--eval-over-refusal", type=int, default=0, help="and this many over-refusal prompts (XSTest's "
                                                                     "safe prompts when ../shared/data is there)")
    ap.add_argument("--eval-tokens", type=int, default=64, help="new tokens per harmful answer (over-refusal: 48)")
    ap.add_argument("--judges", default="refusal-phrase,content-classifier")
    ap.add_argument("--compare-with", default=None, help="a results file of an earlier run with the same "
                    "--eval-harmful/--eval-over-refusal: every variant is also tested against its first variant on the "
                    "same prompts (exact McNemar), e.g. a bfloat16 fit against the float32 one")
    ap.add_argument("--work", default="runs/recalibration-bench", help="where the evaluation's answers are stored")
    ap.add_argument("--repeat", type=int, default=1, help="run every variant and re-align this many times, "
                    "alternating, in the same process (the machine's speed drifts: each repeat's ratio is measured "
                    "side by side); the first repeat fills the usual fields, `repeats` holds all")
    ap.add_argument("--dtype", default="auto", help="the placement's dtype for T, the recalibration and re-align "
                    "(auto: float32 on CPU); both methods run in it")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" / "recalibration.json"))
    args = ap.parse_args()

    from safegene.adapter import SafetyAdapter
    from safegene.baselines.realign import realign
    from safegene.io import write_json
    from safegene.models import load_model, load_tokenizer
    from safegene.models.placement import PlacementConfig
    from safegene.recalibration import RecalibrateConfig, recalibrate
    from safegene.training import LoraTrainConfig

    adapter = SafetyAdapter.load(args.adapter)
    placement = PlacementConfig(dtype=args.dtype)
    base = RecalibrateConfig(task_model=args.task_model, task=args.task, n_harmful=args.shots, n_task=args.shots,
                             placement=placement)
    t = time.perf_counter()
    model, tok = load_model(args.task_model, placement), load_tokenizer(args.task_model)
    load_s = round(time.perf_counter() - t, 1)
    repeats = []
    for rep in range(args.repeat):
        rows = []
        for overrides in parse_variants(args.variants):
            cfg = dataclasses.replace(base, **overrides)
            t = time.perf_counter()
            cal = recalibrate(adapter, cfg, model=model, tokenizer=tok)
            rc = cal.card["recalibration"]
            rows.append({"overrides": overrides, "seconds": round(time.perf_counter() - t, 1),
                         "phases": rc.get("phases"), "objective": rc["objective"], "coefficients": rc["coefficients"],
                         # None where the refusal floor moved the fit: its points carry the refusal NLL only
                         "final_loss": rc["history"][-1].get("loss") if rc["history"] else None})
            print(f"recalibrate {overrides or '(defaults)'}: {rows[-1]['seconds']} s, phases {rows[-1]['phases']}, "
                  f"after {rc['objective']['after']}", flush=True)
            if args.eval_harmful and rep == 0:
                rows[-1]["eval"] = evaluate(cal, model, tok, args, name=f"variant-{len(rows)}")
        if args.eval_harmful and rep == 0:
            paired_with_first(rows)
            compared = paired_with_file(rows, args.compare_with) if args.compare_with else None
        t = time.perf_counter()
        # re-align loads its own copy of T (training wraps it); T stays loaded for the next repeat's recalibration
        realigned = realign(args.task_model, base, LoraTrainConfig(max_steps=args.realign_steps))
        realign_s = round(time.perf_counter() - t, 1)
        for r in rows:
            r["recalibrate_vs_realign"] = round(r["seconds"] / realign_s, 3)
            # re-align's own seconds include loading its copy of T; its training loop alone, for a stricter comparison
            r["recalibrate_vs_realign_training"] = round(r["seconds"] / realigned.card["training"]["seconds"], 3)
        repeats.append({"recalibrate": rows, "realign": {"steps": args.realign_steps, "seconds": realign_s,
                                                         "train_seconds": realigned.card["training"]["seconds"]}})
    rows, realign_s = repeats[0]["recalibrate"], repeats[0]["realign"]["seconds"]
    out = {"date": datetime.date.today().isoformat(),
           "machine": f"2 CPU cores, {placement.dtype_name() if args.dtype == 'auto' else args.dtype}",
           "task_model": args.task_model, "adapter": args.adapter, "layers": adapter.layers, "shots": 2 * args.shots,
           "model_load_s": load_s, "realign": repeats[0]["realign"], "recalibrate": rows}
    if args.eval_harmful and args.compare_with:
        out["compared_with"] = compared
    if args.repeat > 1:
        out["repeats"] = [{"realign_s": x["realign"]["seconds"],
                           "recalibrate_s": [r["seconds"] for r in x["recalibrate"]],
                           "recalibrate_vs_realign": [r["recalibrate_vs_realign"] for r in x["recalibrate"]]}
                          for x in repeats]
    write_json(args.output, out)
    for r in rows:
        print(f"| recalibrate {r['overrides'] or 'defaults'} | {r['seconds']} s | {r['recalibrate_vs_realign']} of "
              f"re-align ({realign_s} s) |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
