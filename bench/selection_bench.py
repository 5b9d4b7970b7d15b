"""Layer selection's cost, side by side in one run: the linearised refusal gain (the default `select` score) as it
ran before (one whole-model forward + backward per batch, the LM head over every position) and as it runs now
(`forward.ShotPasses`: the LM head only at the scored positions, with and without the chat-template prefix run once
per batch), and the exact per-layer gain with and without the prefix cut. Every variant's scores are checked equal to
the reference's.

    python bench/selection_bench.py [--model qwen2.5-coder-0.5b-instruct] [--prompts 16] [--repeats 2]

Writes bench/results/selection.json (seconds per variant, best of `--repeats`, and the ratio to the first).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def whole_model_linear_gain(adapter, model, tok, prompts, opening, batch_size=8):
    """The linearised gain as computed before ShotPasses: d/dα of log p(opening) through model(...) over every
    position. Kept here only as the timing reference."""
    import torch

    from safegene.adapter import AttachedAdapter
    from safegene.data.records import PromptResponse
    from safegene.models.placement import float32_math
    from safegene.objectives import encode_batch

    idx = adapter.all_layers
    handle = AttachedAdapter(model, adapter.select(idx))
    total = torch.zeros(len(idx))
    try:
        pairs = [PromptResponse(p, opening) for p in prompts]
        for s in range(0, len(pairs), batch_size):
            batch = encode_batch(tok, pairs[s:s + batch_size], 256)
            alpha = torch.zeros(len(idx), requires_grad=True)
            for j, l in enumerate(idx):
                handle.scales[l] = alpha[j]
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.target_mask]
            targets = batch.targets[batch.target_mask]
            lp = torch.log_softmax(float32_math(logits), -1).gather(-1, targets.unsqueeze(-1)).sum()
            (g,) = torch.autograd.grad(lp, alpha)
            total += g
    finally:
        handle.remove()
    return (total / len(prompts)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="embedded name or HF folder (A)")
    ap.add_argument("--prompts", type=int, default=16, help="harmful and as many benign prompts")
    ap.add_argument("--repeats", type=int, default=2, help="each variant runs this many times; the best is kept")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" / "selection.json"))
    args = ap.parse_args()

    import torch

    from bench.scale_bench import random_adapter
    from safegene.data import benign_prompts, harmful_prompt_texts
    from safegene.io import write_json
    from safegene.models import load_model, load_tokenizer
    from safegene.selection import refusal_gain, refusal_gain_linear, refusal_opening

    torch.manual_seed(0)
    model, tok = load_model(args.model), load_tokenizer(args.model, padding_side="right")
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = random_adapter(model)  # the timing does not depend on what the update is
    # what `select` reads by default: harmful-pairs prompts against the arithmetic task's
    harmful = harmful_prompt_texts("harmful-pairs", args.prompts, 0)
    benign = benign_prompts("arithmetic", args.prompts, 0)
    refusal = "I'm sorry, but I can't assist with that."
    opening = refusal_opening(tok, refusal, 4)

    def linear(reuse):
        return lambda: refusal_gain_linear(adapter, model, tok, harmful, benign, refusal, progress=False,
                                           reuse_prefix=reuse)["refusal-gain"]

    def exact(reuse):
        return lambda: refusal_gain(adapter, model, tok, harmful, benign, refusal, progress=False,
                                    reuse_prefix=reuse)["refusal-gain"]

    def before():
        h = whole_model_linear_gain(adapter, model, tok, harmful, opening)
        b = whole_model_linear_gain(adapter, model, tok, benign, opening)
        return [x - y for x, y in zip(h, b)]

    variants = [("linearised, whole model (before)", before), ("linearised, scored positions, whole rows", linear(False)),
                ("linearised, scored positions, prefix once (default)", linear(True)),
                ("exact per layer, whole rows", exact(False)), ("exact per layer, prefix once", exact(True))]
    rows, reference = [], {}
    for name, run in variants:
        times, scores = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            scores = run()
            times.append(time.perf_counter() - t)
        kind = "exact" if name.startswith("exact") else "linearised"
        ref = reference.setdefault(kind, scores)
        diff = max(abs(a - b) for a, b in zip(scores, ref))
        scale = max(abs(x) for x in ref) or 1.0
        rows.append({"variant": name, "seconds": round(min(times), 2), "all_seconds": [round(x, 2) for x in times],
                     "max_score_diff_vs_first_of_kind": round(diff, 8), "relative_diff": round(diff / scale, 8)})
        print(f"{name}: {rows[-1]['seconds']} s (runs {rows[-1]['all_seconds']}), scores differ by {diff:.2e} "
              f"({diff / scale:.1e} of the largest)", flush=True)
    for r in rows:
        first = next(x for x in rows if x["variant"].split(",")[0] == r["variant"].split(",")[0])
        r["of_first_of_kind"] = round(r["seconds"] / first["seconds"], 3)
    write_json(args.output, {"date": datetime.date.today().isoformat(), "machine": "2 CPU cores, float32",
                             "model": args.model, "layers": len(adapter.all_layers), "adapter": "random, rank 8",
                             "prompts": {"harmful": len(harmful), "benign": len(benign)}, "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
