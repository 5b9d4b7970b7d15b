"""Recalibration cost next to re-aligning the same task model by safety SFT, measured in one run.

    python bench/recalibration_bench.py --adapter runs/demo/adapter-selected --task-model runs/demo/task-arithmetic \
        --task arithmetic [--realign-steps 40]

Re-alignment = LoRA SFT of T on refusal pairs mixed with task pairs (the usual fix SafeGene is meant to replace),
with the foundation's training settings. Prints wall times and their ratio; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--task-model", required=True)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--recal-steps", type=int, default=30)
    ap.add_argument("--realign-steps", type=int, default=40)
    args = ap.parse_args()

    from safegene.adapter import SafetyAdapter
    from safegene.recalibration import RecalibrateConfig
    from safegene.training import FinetuneConfig, LoraTrainConfig
    from safegene.models import load_model, load_tokenizer
    from safegene.recalibration import recalibrate
    from safegene.training import finetune

    adapter = SafetyAdapter.load(args.adapter)
    t = time.perf_counter()
    model, tok = load_model(args.task_model), load_tokenizer(args.task_model)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    cal = recalibrate(adapter, RecalibrateConfig(task_model=args.task_model, task=args.task, steps=args.recal_steps),
                      model=model, tokenizer=tok)
    recal_s = time.perf_counter() - t
    del model
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        # safety SFT: refusal pairs with a third of task data mixed in so utility is not simply overwritten
        card = finetune(FinetuneConfig(model=args.task_model, task=args.task, n_examples=4 * args.realign_steps,
                                       poison_ratio=0.67, poison_data="uncensorbench-refusals", save="adapter",
                                       output=f"{tmp}/realigned", train=LoraTrainConfig(max_steps=args.realign_steps)),
                        overwrite=True)
        realign_s = time.perf_counter() - t
    row = {
        "layers": adapter.layers, "recal_steps": args.recal_steps, "recalibrate_s": round(recal_s, 1),
        "model_load_s": round(load_s, 1), "realign_steps": args.realign_steps, "realign_s": round(realign_s, 1),
        "realign_train_s": card["training"]["seconds"], "speedup": round(realign_s / recal_s, 2),
        "coefficients": {str(l): round(cal.coefficients[l], 3) for l in cal.layers},
    }
    print(f"| recalibrate ({args.recal_steps} steps, {len(adapter.layers)} scalars) | {row['recalibrate_s']} s |")
    print(f"| re-align by safety SFT ({args.realign_steps} LoRA steps) | {row['realign_s']} s |")
    print(f"| ratio (re-align / recalibrate) | {row['speedup']}x |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
