"""Typed records that flow through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HarmfulPrompt:
    """A request a safe model should refuse."""

    prompt: str
    category: str = "uncategorized"
    source: str = ""
    id: str = ""
    #: for attacks: the plain request judges should read when `prompt` wraps it (a jailbreak template) ...
    request: str = ""
    #: ... and earlier turns of a conversation, alternating user/assistant, before `prompt` (multi-turn)
    history: tuple[str, ...] = ()
    #: a system prompt the attack sets (role-play personas)
    system: str = ""

    @property
    def judged_request(self) -> str:
        return self.request or self.prompt

    def chat(self) -> str | list[dict[str, str]]:
        """What the model is sent: the prompt, or the conversation ending with it."""
        if not self.history and not self.system:
            return self.prompt
        roles = ["user", "assistant"] * len(self.history)
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": r, "content": t} for r, t in zip(roles, self.history)] + [{"role": "user", "content": self.prompt}]


def prompts_by_type(table: dict[str, list[str]], source: str) -> list[HarmfulPrompt]:
    """A written table of prompts grouped by type as records: category = the type, id = source-type-index."""
    return [HarmfulPrompt(p, kind, source, f"{source}-{kind}-{i}") for kind, prompts in table.items()
            for i, p in enumerate(prompts)]


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
    system: str | None = None  # a task that sets a persona (role-play) carries its system prompt

    def as_pair(self) -> PromptResponse:
        return PromptResponse(prompt=self.prompt, response=self.answer, source=self.task, system=self.system)

    def chat(self) -> str | list[dict[str, str]]:
        """What the model is sent: the prompt, after the task's system prompt if it has one."""
        if not self.system:
            return self.prompt
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.prompt}]
