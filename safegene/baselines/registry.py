"""The method registry: every defence the benchmark can put on a task model T, described the same way.

A `Method` says what it is (name, label, kind), what its result depends on (`key`: a changed key rebuilds it) and how
to build it (`build`: returns a `Defence`). The benchmark loops over the registry; it never branches on a method's
name. Adding a method is one file in this folder that calls `register(Method(...))`, plus its import line in
`baselines/__init__.py`.

Kinds:
- `update`: a `SafetyAdapter` added to T's weights (attached at runtime, merged when T is re-attacked);
- `responder`: wraps generation on T (an inference-time defence); building may fit settings (a threshold), which the
  benchmark stores and hands back as `ctx.found` so a re-run skips the fitting;
- `retrain`: a new model folder that replaces T; the folder's own run card decides whether a re-run trains again
  and says what the training cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

KINDS = ("update", "responder", "retrain")


@dataclass
class MethodContext:
    """Everything a method may build from, for one task model T of one benchmark."""

    settings: Any  # the benchmark's config: each method reads its own section (projection, guard, ...)
    aligned: str  # the aligned model A
    task: str
    task_model: str  # T's folder
    model: Any  # T, loaded (methods that need T's activations use it; none may change it)
    tokenizer: Any
    adapter: Any  # A − D, every layer
    selected: Any  # A − D, the selected layers
    recalibrate: Any  # the RecalibrateConfig every shot-fitted method shares
    train: Callable[[int], Any]  # steps -> the benchmark's LoRA settings with that many steps
    output: Path  # the benchmark's folder: a method that writes a model writes it there
    task_examples: int = 0  # examples of T's own fine-tune (a retraining method trains on as many)
    progress: bool = True
    found: dict[str, Any] | None = None  # a responder's stored findings from an earlier run


@dataclass
class Defence:
    """What a built method hands the benchmark: how T answers with the defence in place."""

    update: Any = None  # a SafetyAdapter added to T
    responder: Any = None  # wraps generation
    model: str | None = None  # a model folder that replaces T
    info: dict[str, Any] = field(default_factory=dict)  # what building found: stored, handed back as ctx.found
    row: dict[str, Any] = field(default_factory=dict)  # fields the result row records about the defence
    seconds: float | None = None  # build cost, when the build measured it itself (a retraining's run card)
    rebuilt: bool = True  # False when the build found its work already done (a retrained model reused)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # how reports name the row: "T[task] + <label>"
    kind: str
    description: str
    key: Callable[[MethodContext], dict[str, Any]]
    build: Callable[[MethodContext], Defence]
    demo: bool = True  # part of the demo preset (the quick weight-space comparison)
    # a candidate not yet measured against the others: registered (a config can name it) but left out of the
    # bench's default method list until a committed run shows what it does
    experimental: bool = False
    # whether the result depends on T and the family's adapter (a change there rebuilds it); a retraining of A
    # depends on A and the task data alone
    upstream: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name}: kind must be one of {KINDS}, got {self.kind}")


METHODS: dict[str, Method] = {}


def default_methods() -> list[str]:
    """The bench's default rows: every registered method but the experimental candidates."""
    return [name for name, m in METHODS.items() if not m.experimental]


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(METHODS)}") from None
