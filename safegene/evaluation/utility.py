"""Task utility: accuracy / exact match of generated answers against the task's own labels."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from ..generation import Generated, GenerationConfig, Responder, generate_detailed, generate_to_jsonl
from ..data import get_task
from ..io import sha256_text
from .metrics import Rate


def cost_per_request(generated: Sequence[Generated] | Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean tokens and seconds per response (from `Generated`s or stored generation rows)."""
    tokens = [g.tokens if isinstance(g, Generated) else g.get("tokens") for g in generated]
    seconds = [g.seconds if isinstance(g, Generated) else g.get("seconds") for g in generated]
    metas = [(g.meta if isinstance(g, Generated) else g.get("meta")) or {} for g in generated]
    out: dict[str, Any] = {"n": len(generated), "tokens": None, "seconds": None}
    if generated and all(t is not None for t in tokens) and all(s is not None for s in seconds):
        # (rows stored before costs were recorded have neither)
        out |= {"tokens": round(sum(tokens) / len(tokens), 2), "seconds": round(sum(seconds) / len(seconds), 4)}
    if any("flag" in m for m in metas):  # a guard: how many answers it replaced with a refusal
        out["flagged"] = sum(bool(m.get("flag")) for m in metas)
    return out


def task_utility(model: Any, tokenizer: Any, task: str, n: int = 100, seed: int = 0, batch_size: int = 8,
                 progress: bool = True, responder: Responder | None = None,
                 responses_path: str | Path | None = None) -> dict[str, Any]:
    """Accuracy on `n` test items of `task`, and what answering them cost per item (tokens, seconds): the task
    prompts are the traffic a deployed model serves, so they price an inference-time defence.

    With `responses_path` the answers are appended to that JSONL and reused by a later call (the file name should
    identify the items and decoding; see `task_items_tag`)."""
    spec = get_task(task)
    examples = spec.load("test", n=n, seed=seed)
    t0 = time.perf_counter()
    cfg = GenerationConfig(max_new_tokens=spec.max_new_tokens, batch_size=batch_size)
    answer = responder or generate_detailed
    if responses_path is None:
        generated: Sequence[Any] = answer(model, tokenizer, [e.chat() for e in examples], cfg, progress=progress,
                                          desc=f"{task} utility")
        responses = [g.text for g in generated]
    else:
        items = [{"id": str(i), "prompt": e.chat(), "answer": e.answer} for i, e in enumerate(examples)]
        generated = generate_to_jsonl(model, tokenizer, items, responses_path, cfg, progress=progress,
                                      desc=f"{task} utility", responder=answer)
        responses = [r["response"] for r in generated]
    correct = sum(spec.score(r, e) for r, e in zip(responses, examples))
    return {
        "task": task,
        "accuracy": Rate(correct, len(examples)).to_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
        "cost": cost_per_request(generated),
        "samples": [{"prompt": e.prompt[-120:], "answer": e.answer, "response": r} for e, r in list(zip(examples, responses))[:3]],
    }


def task_items_tag(task: str, n: int, seed: int) -> str:
    """A short hash of a task's test items and answer length: stored answers are reused only for the same items."""
    spec = get_task(task)
    items = spec.load("test", n=n, seed=seed)
    return sha256_text(f"{spec.max_new_tokens}\n" + "\n".join(json.dumps(e.chat()) for e in items))[:8]
