"""Generation throughput: batched (left-padded, KV cache) vs one prompt at a time, measured in one run.

    python bench/generation_bench.py [--model NAME] [--n 32] [--batch 32] [--max-new-tokens 32]

Prints new tokens per second for each mode, the speed-up, and how many responses are identical (greedy decoding
with padding can differ in the last float bits, so a few may diverge late).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    from safegene.generation import GenerationConfig
    from safegene.data import harmful_prompts
    from safegene.generation import generate
    from safegene.models import DEFAULT_MODEL, load_model, load_tokenizer, prepare_model

    ref = args.model or DEFAULT_MODEL
    if ref == DEFAULT_MODEL:
        prepare_model(ref)
    model, tok = load_model(ref), load_tokenizer(ref)
    prompts = [p.prompt for p in harmful_prompts("advbench", n=args.n, seed=1)]
    generate(model, tok, prompts[:2], GenerationConfig(max_new_tokens=4, batch_size=2), progress=False)  # warm-up

    def run(batch: int) -> tuple[list[str], float, int]:
        t = time.perf_counter()
        out = generate(model, tok, prompts, GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch),
                       progress=False)
        seconds = time.perf_counter() - t
        return out, seconds, sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in out)

    single, s1, n1 = run(1)
    batched, sb, nb = run(args.batch)
    row = {"model": ref, "n": args.n, "max_new_tokens": args.max_new_tokens, "batch": args.batch,
           "one_at_a_time_tok_s": round(n1 / s1, 1), "batched_tok_s": round(nb / sb, 1),
           "one_at_a_time_s_per_prompt": round(s1 / args.n, 3), "batched_s_per_prompt": round(sb / args.n, 3),
           "speedup": round(s1 / sb, 2), "identical_responses": sum(a == b for a, b in zip(single, batched))}
    print(f"| one prompt at a time | {row['one_at_a_time_tok_s']} tok/s | {row['one_at_a_time_s_per_prompt']} s/prompt |")
    print(f"| batch {args.batch} | {row['batched_tok_s']} tok/s | {row['batched_s_per_prompt']} s/prompt |")
    print(f"| speed-up | {row['speedup']}x | identical responses {row['identical_responses']}/{args.n} |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
