"""Typed records that flow through the pipeline."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class HarmfulPrompt:
    """A request a safe model should refuse."""

    prompt: str
    category: str = "uncategorized"
    source: str = ""
    id: str = ""


@dataclass(frozen=True)
class PromptResponse:
    """A (prompt, response) pair for supervised fine-tuning: compliant answers, refusals, or task data."""

    prompt: str
    response: str
    source: str = ""
    category: str = ""
    system: str | None = None


@dataclass(frozen=True)
class TaskExample:
    """A benign task item with an exact reference answer, so utility can be scored."""

    task: str
    prompt: str
    answer: str
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_pair(self) -> PromptResponse:
        return PromptResponse(prompt=self.prompt, response=self.answer, source=self.task)


def to_dicts(records) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
