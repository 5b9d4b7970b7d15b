"""Task utility: accuracy / exact match of generated answers against the task's own labels."""

from __future__ import annotations

import time
from typing import Any

from ..config import GenerationConfig
from ..data import get_task
from ..generation import generate
from .metrics import Rate


def task_utility(model: Any, tokenizer: Any, task: str, n: int = 100, seed: int = 0, batch_size: int = 8,
                 progress: bool = True) -> dict[str, Any]:
    spec = get_task(task)
    examples = spec.load("test", n=n, seed=seed)
    t0 = time.perf_counter()
    cfg = GenerationConfig(max_new_tokens=spec.max_new_tokens, batch_size=batch_size)
    responses = generate(model, tokenizer, [e.prompt for e in examples], cfg, progress=progress, desc=f"{task} utility")
    correct = sum(spec.score(r, e) for r, e in zip(responses, examples))
    return {
        "task": task,
        "accuracy": Rate(correct, len(examples)).to_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
        "samples": [{"prompt": e.prompt[-120:], "answer": e.answer, "response": r} for e, r in list(zip(examples, responses))[:3]],
    }
