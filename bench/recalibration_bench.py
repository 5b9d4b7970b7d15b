"""Recalibration cost next to re-aligning the same task model by safety SFT on the same shots, in one run.

    python bench/recalibration_bench.py --adapter runs/evidence/adapter-selected --task-model runs/evidence/task-sst2 \
        --task sst2 [--variants "steps=20,learning_rate=0.1;steps=8,learning_rate=0.25"] [--realign-steps 24]

Re-align is the bench's own `realign` baseline (`safegene.baselines.realign.realign`): a LoRA trained on T with the
recalibration's refusal shots and task shots, so both methods see exactly the same examples. Every recalibration
variant (a `;`-separated list of RecalibrateConfig overrides) runs on the same loaded T; the first is the reference.
Reports wall time, the time of each recalibration phase (cache of the lower layers, steps, objective checks), the
objective before and after, and `recalibrate_vs_realign` = recalibration seconds / re-align seconds (the issue's goal
is <= 0.20). Writes bench/results/recalibration.json.
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


def parse_variants(text: str) -> list[dict[str, object]]:
    out = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        pairs = dict(kv.split("=", 1) for kv in chunk.split(","))
        out.append({k.strip(): json.loads(v) for k, v in pairs.items()})
    return out or [{}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="the selected safety adapter folder")
    ap.add_argument("--task-model", required=True)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--shots", type=int, default=32, help="harmful and task shots (each), as the bench")
    ap.add_argument("--variants", default="steps=20", help="';'-separated RecalibrateConfig overrides, k=v,k=v")
    ap.add_argument("--realign-steps", type=int, default=24, help="LoRA steps of re-align (the bench's default)")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" / "recalibration.json"))
    args = ap.parse_args()

    from safegene.adapter import SafetyAdapter
    from safegene.baselines.realign import realign
    from safegene.io import write_json
    from safegene.models import load_model, load_tokenizer
    from safegene.recalibration import RecalibrateConfig, recalibrate
    from safegene.training import LoraTrainConfig

    adapter = SafetyAdapter.load(args.adapter)
    base = RecalibrateConfig(task_model=args.task_model, task=args.task, n_harmful=args.shots, n_task=args.shots)
    t = time.perf_counter()
    model, tok = load_model(args.task_model), load_tokenizer(args.task_model)
    load_s = round(time.perf_counter() - t, 1)
    rows = []
    for overrides in parse_variants(args.variants):
        cfg = dataclasses.replace(base, **overrides)
        t = time.perf_counter()
        cal = recalibrate(adapter, cfg, model=model, tokenizer=tok)
        rc = cal.card["recalibration"]
        rows.append({"overrides": overrides, "seconds": round(time.perf_counter() - t, 1), "phases": rc.get("phases"),
                     "objective": rc["objective"], "coefficients": rc["coefficients"],
                     "final_loss": rc["history"][-1]["loss"] if rc["history"] else None})
        print(f"recalibrate {overrides or '(defaults)'}: {rows[-1]['seconds']} s, phases {rows[-1]['phases']}, "
              f"after {rc['objective']['after']}", flush=True)
    del model
    t = time.perf_counter()
    realigned = realign(args.task_model, base, LoraTrainConfig(max_steps=args.realign_steps))
    realign_s = round(time.perf_counter() - t, 1)
    for r in rows:
        r["recalibrate_vs_realign"] = round(r["seconds"] / realign_s, 3)
    out = {"date": datetime.date.today().isoformat(), "machine": "2 CPU cores, float32",
           "task_model": args.task_model, "adapter": args.adapter, "layers": adapter.layers, "shots": 2 * args.shots,
           "model_load_s": load_s, "realign": {"steps": args.realign_steps, "seconds": realign_s,
                                              "train_seconds": realigned.card["training"]["seconds"]},
           "recalibrate": rows}
    write_json(args.output, out)
    for r in rows:
        print(f"| recalibrate {r['overrides'] or 'defaults'} | {r['seconds']} s | {r['recalibrate_vs_realign']} of "
              f"re-align ({realign_s} s) |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
