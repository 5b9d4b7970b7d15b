"""One entry point per record kind: a built-in name or a file path, sampled deterministically."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence, TypeVar

from ..errors import DataError, SafegeneError
from .builtin import dataset_info, load_builtin
from .loaders import load_harmful_prompts, load_prompt_responses
from .records import HarmfulPrompt, PromptResponse
from .tasks import TASKS

T = TypeVar("T")


def _is_path(ref: str) -> bool:
    return ref.startswith("hf:") or Path(ref).suffix.lower() in (".jsonl", ".json", ".csv")


def sample(rows: Sequence[T], n: int | None, seed: int) -> list[T]:
    if n is None or n >= len(rows):
        return list(rows)
    if n <= 0:
        raise DataError(f"asked for {n} examples; ask for at least 1")
    return random.Random(seed).sample(list(rows), n)


def split_holdout(rows: Sequence[T], holdout: int, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic (train, held-out) split: the same seed always holds out the same rows."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:holdout])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def harmful_prompts(ref: str, n: int | None = None, seed: int = 0) -> list[HarmfulPrompt]:
    rows = load_harmful_prompts(ref) if _is_path(ref) else load_builtin(ref, kind="harmful")
    return sample(rows, n, seed)


def prompt_response_pairs(ref: str, n: int | None = None, seed: int = 0, kind: str | None = None) -> list[PromptResponse]:
    if _is_path(ref):
        rows = load_prompt_responses(ref)
    else:
        info = dataset_info(ref)
        if info.kind == "harmful":
            raise DataError(f"data set '{ref}' holds prompts only; a (prompt, response) set is needed here")
        rows = load_builtin(ref, kind=kind)
    return sample(rows, n, seed)


def benign_prompts(ref: str, n: int, seed: int) -> list[str]:
    """Prompt texts of a task's train split, or of any (prompt, response) file or built-in set."""
    if ref in TASKS:
        return [e.prompt for e in TASKS[ref].load("train", n=n, seed=seed)]
    return [p.prompt for p in prompt_response_pairs(ref, n=n, seed=seed)]


def harmful_prompt_texts(ref: str, n: int, seed: int) -> list[str]:
    """Prompt texts of a harmful-prompt set, or the prompts of a (harmful request, answer) set."""
    try:
        return [p.prompt for p in harmful_prompts(ref, n=n, seed=seed)]
    except SafegeneError:
        return [p.prompt for p in prompt_response_pairs(ref, n=n, seed=seed)]
