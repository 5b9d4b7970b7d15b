"""Batched chat generation: left padding, KV cache, greedy by default, progress bar with tokens/s.

`generate_detailed` also says what each response cost (tokens generated, seconds). Anything with the same call
shape is a *responder* (`Responder`): inference-time defences such as self-critique or a classifier guard wrap
plain generation and report every token and second they spend, so the harness can evaluate and price them exactly
like a plain model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from .chat import prompt_text
from .config import GenerationConfig


@dataclass
class Generated:
    """One response and what it cost: every token generated for it (drafts and critiques included) and its share
    of the wall time of the batches that produced it."""

    text: str
    tokens: int
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)  # what a defence did (e.g. which screen flagged it)


class Responder(Protocol):
    """Answers chat prompts with a model; `generate_detailed` is the plain one."""

    def __call__(self, model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: GenerationConfig | None = None,
                 progress: bool = True, desc: str = "generating") -> list[Generated]: ...


def generate(model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: GenerationConfig | None = None,
             progress: bool = True, desc: str = "generating") -> list[str]:
    """Generate one response per prompt (in order). Responses are decoded without special tokens, stripped."""
    return [g.text for g in generate_detailed(model, tokenizer, prompts, cfg, progress, desc)]


def generate_detailed(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    cfg: GenerationConfig | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[Generated]:
    """`generate`, with the tokens and seconds each response cost. A prompt is one user message or a list of chat
    messages (a conversation ending with the user turn to answer)."""
    import torch
    from tqdm.auto import tqdm

    cfg = cfg or GenerationConfig()
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: list[Generated] = []
    new_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    for start in range(0, len(prompts), cfg.batch_size):
        t_batch = time.perf_counter()
        batch = [prompt_text(tokenizer, p, cfg.system_prompt) for p in prompts[start : start + cfg.batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(
                **enc,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.do_sample,
                temperature=cfg.temperature if cfg.do_sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        cont = gen[:, enc["input_ids"].shape[1] :]
        share = (time.perf_counter() - t_batch) / len(batch)
        for row in cont:
            ids = row.tolist()
            # count real tokens only: stop at the first pad/eos the batch padded with
            n = next((i for i, t in enumerate(ids) if t in (tokenizer.pad_token_id, tokenizer.eos_token_id)), len(ids))
            new_tokens += n
            out.append(Generated(tokenizer.decode(ids[:n], skip_special_tokens=True).strip(), n, share))
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    return out


def _complete_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a generation JSONL and their byte length (a torn last line from an interrupted run
    ends the read)."""
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(raw))
            except ValueError:
                break
            good_bytes += len(raw)
    return rows, good_bytes


def read_jsonl_rows(path: str | Path) -> list[dict[str, Any]]:
    return _complete_rows(Path(path))[0]


def generate_to_jsonl(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    path: str | Path,
    cfg: GenerationConfig | None = None,
    progress: bool = True,
    desc: str = "generating",
    responder: Responder | None = None,
) -> list[dict[str, Any]]:
    """Generate for `items` (each with 'id' and 'prompt'), appending each finished batch to a JSONL file; each
    row records the response, its tokens and seconds (and what a defence did, under 'meta').

    A re-run with the same file skips the ids already answered, so a crash or Ctrl-C loses nothing.
    """
    responder = responder or generate_detailed
    cfg = cfg or GenerationConfig()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        rows, good_bytes = _complete_rows(path)
        done = {str(row["id"]): row for row in rows}
        if good_bytes < path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(good_bytes)
    todo = [it for it in items if str(it["id"]) not in done]
    if not todo:  # all answered already: leave the file untouched
        return [done[str(it["id"])] for it in items]
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            responses = responder(model, tokenizer, [c["prompt"] for c in chunk], cfg, progress=False)
            for it, g in zip(chunk, responses):
                row = {**it, "response": g.text, "tokens": g.tokens, "seconds": round(g.seconds, 4)}
                if g.meta:
                    row["meta"] = g.meta
                done[str(it["id"])] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            if progress:
                print(f"\r{desc}: {len(done)}/{len(items)}", end="", flush=True)
    if progress:
        print()
    return [done[str(it["id"])] for it in items]
