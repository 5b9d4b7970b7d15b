"""Generation throughput, measured in one run on the same prompts: one prompt at a time, batched as before
(input order, finished rows ride along), and batched the fast way (length-sorted batches, finished rows dropped).

    python bench/generation_bench.py [--model NAME] [--n 32] [--batch 8,32] [--max-new-tokens 64] [--skip-single]

Prints new tokens per second of each mode side by side, the speed-ups, and how many responses are identical to the
batched-as-before ones (greedy decoding with different padding can differ in the last float bits, so a few may
diverge late); writes the rows to bench/results/generation.json (`--output`).
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded default model")
    ap.add_argument("--n", type=int, default=32, help="prompts (AdvBench, fixed seed)")
    ap.add_argument("--batch", default="8,32", help="batch sizes to measure, comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--skip-single", action="store_true", help="skip the one-prompt-at-a-time baseline (slow)")
    ap.add_argument("--output", default="bench/results/generation.json")
    args = ap.parse_args()

    import torch

    from safegene.data import harmful_prompts
    from safegene.generation import GenerationConfig, generate_detailed
    from safegene.io import write_json
    from safegene.models import DEFAULT_MODEL, load_model, load_tokenizer, prepare_model
    from safegene.models.placement import model_device

    ref = args.model or DEFAULT_MODEL
    if ref == DEFAULT_MODEL:
        prepare_model(ref)
    model, tok = load_model(ref), load_tokenizer(ref)
    prompts = [p.prompt for p in harmful_prompts("advbench", n=args.n, seed=1)]
    generate_detailed(model, tok, prompts[:2], GenerationConfig(max_new_tokens=4, batch_size=2), progress=False)

    def run(batch: int, fast: bool) -> tuple[list[str], float, int]:
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch, sort_by_length=fast,
                               drop_finished=fast)
        t = time.perf_counter()
        out = generate_detailed(model, tok, prompts, cfg, progress=False)
        seconds = time.perf_counter() - t
        return [g.text for g in out], seconds, sum(g.tokens for g in out)

    rows = []
    single = None
    if not args.skip_single:
        texts, s, n = run(1, False)
        single = {"tok_s": round(n / s, 1), "s": round(s, 1), "tokens": n}
        print(f"| one prompt at a time | {single['tok_s']} tok/s | {single['s']} s |")
    for batch in (int(b) for b in args.batch.split(",")):
        before, s_before, n_before = run(batch, fast=False)
        fast, s_fast, n_fast = run(batch, fast=True)
        row = {"batch": batch, "before_tok_s": round(n_before / s_before, 1), "before_s": round(s_before, 1),
               "fast_tok_s": round(n_fast / s_fast, 1), "fast_s": round(s_fast, 1),
               "speedup_fast_vs_before": round(s_before / s_fast, 2),
               "identical_responses": sum(a == b for a, b in zip(before, fast)), "tokens_before": n_before,
               "tokens_fast": n_fast}
        if single:
            row["speedup_fast_vs_single"] = round(single["s"] / s_fast, 2)
        rows.append(row)
        print(f"| batch {batch}, as before (input order, finished rows ride along) | {row['before_tok_s']} tok/s "
              f"| {row['before_s']} s |")
        print(f"| batch {batch}, sorted + finished rows dropped | {row['fast_tok_s']} tok/s | {row['fast_s']} s "
              f"| {row['speedup_fast_vs_before']}x | identical {row['identical_responses']}/{args.n} |")
    result = {"model": ref, "device": str(model_device(model)), "dtype": str(next(model.parameters()).dtype),
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "n": args.n,
              "max_new_tokens": args.max_new_tokens, "one_at_a_time": single, "batched": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
