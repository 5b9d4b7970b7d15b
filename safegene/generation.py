"""Batched chat generation: left padding, KV cache, greedy by default, progress bar with tokens/s.

Prompts are batched by length (less padding: every row of a batch computes as many positions as its longest prompt)
and answered in the caller's order; rows that finished leave the running batch, their slice of the KV cache
dropped, once enough have (a batch otherwise computes its finished rows until its longest answer ends). Both leave
greedy outputs token-identical on the CPU; both can be turned off (`sort_by_length`, `drop_finished`).
`backend: vllm` hands generation to a vLLM engine instead: backends are found by name in
`safegene.generation_backends`, which also holds what every backend shares (the settings, `Generated`, the prompt
ids and stop tokens); this module is the transformers backend, and imports no other.

`generate_detailed` also says what each response cost (tokens generated, seconds). Anything with the same call
shape is a *responder* (`Responder`): inference-time defences such as self-critique or a classifier guard wrap
plain generation and report every token and second they spend, so the harness can evaluate and price them exactly
like a plain model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

# what every backend shares lives below this module, so that another backend takes it without importing this one;
# the names stay importable from here, where callers have always found them
from .generation_backends import (  # noqa: F401
    BACKENDS, Generated, GenerationConfig, Responder, backend, prompt_token_ids, stop_token_ids,
)


@dataclass(frozen=True)
class Sampling:
    """How one row of a batch picks its tokens: greedy at temperature 0, else sampled from the smallest set of
    tokens whose probability reaches `top_p` (seeded when `seed` is set)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Decoded:
    tokens: list[int]  # the response's tokens, without the stop token
    finish_reason: str  # "stop": a stop token, or `on_token` ended it; "length": max_new_tokens reached


def left_pad(rows: Sequence[Sequence[int]], tokenizer: Any) -> tuple[Any, Any]:
    """input_ids and attention_mask of token rows padded on the left, so every row continues from the right edge
    (done here rather than by the tokenizer, whose padding side is shared state)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _pick(logits: Any, sampling: Sequence[Sampling], generators: list[Any]) -> Any:
    """Next token per row from last-position logits (batch, vocab)."""
    import torch

    nxt = logits.argmax(-1)
    for i, s in enumerate(sampling):
        if s.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / s.temperature, -1)
        if s.top_p >= 1:
            nxt[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
            continue
        ranked, order = probs.sort(descending=True)
        # keep a token while the mass ranked above it is below top_p (the most likely one always stays)
        keep = (ranked.cumsum(-1) - ranked) < s.top_p
        keep[0] = True
        nxt[i] = order[torch.multinomial(ranked * keep, 1, generator=generators[i])[0]]
    return nxt


def _worth_dropping(running: int, still_going: int) -> bool:
    """Drop finished rows once they are a quarter of the running batch: each later step then costs about a quarter
    less, while the drop copies the kept rows' KV cache once (about what one step's attention reads)."""
    return still_going < running and 4 * (running - still_going) >= running


def decode(model: Any, input_ids: Any, attention_mask: Any, sampling: Sequence[Sampling], stop_ids: set[int],
           on_token: Callable[[int, list[int], str | None], bool] | None = None,
           drop_finished: bool = False) -> list[Decoded]:
    """Decode a left-padded batch with the KV cache, one token per step for every row still going.

    After each step, `on_token(row, tokens, finish)` is called for every row that was still going, with the row's
    tokens so far (stop token excluded) and its finish reason when that step ended it ("stop" or "length"), else
    None; returning True ends the row there (e.g. a stop string), with finish reason "stop". Row numbers are
    always those of the input batch. Rows that ended ride along in the batch until every row has ended, unless
    `drop_finished`: then they leave it (their slice of the KV cache too, `Cache.batch_select_indices`) once that
    saves work. Off by default, because hooks that keep per-row state (the serving gate's `row_strength`) index
    the batch as it came in. The settings are `sampling`'s alone, not those of the model's generation_config.json
    (no repetition penalty from there), so evaluation and the server decode alike.
    """
    import inspect

    import torch

    from .models.placement import model_device

    device = model_device(model)  # the embedding's device: right for a model dispatched over several devices too
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None and s.temperature > 0
                  else None for s in sampling]
    # the prefill only needs the last position's logits; computing all of them costs a vocab-sized matmul per token
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    rows = [Decoded([], "length") for _ in sampling]
    going = [True] * len(rows)
    alive = list(range(len(rows)))  # the input row of each row of the running batch
    past = None
    steps = max(s.max_new_tokens for s in sampling)
    with torch.inference_mode():
        for step in range(steps):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past, use_cache=True, **(last_only if step == 0 else {}))
            past = out.past_key_values
            nxt = _pick(out.logits[:, -1, :].float(), [sampling[i] for i in alive], [generators[i] for i in alive])
            for j, t in enumerate(nxt.tolist()):
                i = alive[j]
                if not going[i]:
                    continue
                row = rows[i]
                if t in stop_ids:
                    finish = "stop"
                else:
                    row.tokens.append(t)
                    finish = "length" if len(row.tokens) >= sampling[i].max_new_tokens else None
                if on_token is not None and on_token(i, row.tokens, finish):
                    finish = "stop"
                if finish is not None:
                    going[i] = False
                    row.finish_reason = finish
            if not any(going):
                break
            keep = [j for j, i in enumerate(alive) if going[i]]
            if (drop_finished and step + 1 < steps and _worth_dropping(len(alive), len(keep))
                    and hasattr(past, "batch_select_indices")):
                idx = torch.tensor(keep, device=nxt.device)
                past.batch_select_indices(idx)
                nxt, attention_mask, position_ids = nxt[idx], attention_mask[idx], position_ids[idx]
                alive = [alive[j] for j in keep]
            input_ids = nxt[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], 1)
            position_ids = position_ids[:, -1:] + 1
    return rows


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
    messages (a conversation ending with the user turn to answer). Runs on `cfg.backend`."""
    cfg = cfg or GenerationConfig()
    return backend(cfg.backend)(model, tokenizer, prompts, cfg, progress=progress, desc=desc)


def generate_transformers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    cfg: GenerationConfig | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[Generated]:
    """The transformers backend: `decode` in this process, on whatever device the model is."""
    from tqdm.auto import tqdm

    cfg = cfg or GenerationConfig()
    stop_ids = stop_token_ids(model, tokenizer)
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature if cfg.do_sample else 0.0)
    ids = prompt_token_ids(tokenizer, prompts, cfg.system_prompt)
    order = length_order([len(r) for r in ids]) if cfg.sort_by_length else list(range(len(ids)))
    out: list[Generated | None] = [None] * len(ids)
    new_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    for start in range(0, len(order), cfg.batch_size):
        t_batch = time.perf_counter()
        batch = order[start : start + cfg.batch_size]
        input_ids, attention_mask = left_pad([ids[i] for i in batch], tokenizer)
        rows = decode(model, input_ids, attention_mask, [sampling] * len(batch), stop_ids,
                      drop_finished=cfg.drop_finished)
        share = (time.perf_counter() - t_batch) / len(batch)
        for i, row in zip(batch, rows):
            new_tokens += len(row.tokens)
            text = tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
            out[i] = Generated(text, len(row.tokens), share)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    return out  # type: ignore[return-value]  # every slot filled: `order` is a permutation


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices of `lengths`, longest first (ties in input order): batches of similar length pad little, and the
    largest batch comes first, so a batch too large for memory fails at once rather than at the end."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


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

    A re-run with the same file skips the ids already answered, so a crash or Ctrl-C loses nothing. With
    `sort_by_length` the items are answered longest prompt first; the finished file is then rewritten (atomically)
    in the order of `items`, which readers that pair two files row by row rely on.
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
    if not todo:  # all answered already: only put the rows in order (a run cut off before it did so)
        _write_in_order(path, items)
        return [done[str(it["id"])] for it in items]
    if cfg.sort_by_length and tokenizer is not None:
        lengths = [len(r) for r in prompt_token_ids(tokenizer, [it["prompt"] for it in todo], cfg.system_prompt)]
        todo = [todo[i] for i in length_order(lengths)]
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
    _write_in_order(path, items)
    return [done[str(it["id"])] for it in items]


def _write_in_order(path: Path, items: Sequence[dict[str, Any]]) -> None:
    """Rewrite a complete generation JSONL in the order of `items` (rows of other ids kept after them), atomically;
    a file already in order is left untouched."""
    from .io import atomic_file

    rows = _complete_rows(path)[0]
    by_id = {str(r["id"]): r for r in rows}
    wanted = [str(it["id"]) for it in items]
    if [str(r["id"]) for r in rows[: len(wanted)]] == wanted:
        return
    if any(w not in by_id for w in wanted):  # not complete (cannot happen after a run): leave it for the next one
        return
    known = set(wanted)
    extra = [r for r in rows if str(r["id"]) not in known]
    with atomic_file(path) as f:
        for r in [by_id[w] for w in wanted] + extra:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
