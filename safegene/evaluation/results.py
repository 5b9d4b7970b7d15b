"""Typed results: what the harness measures, what reports print and what `rejudge` reads back, as dataclasses.

They serialise to exactly the JSON that `results.json` has always held (`rows[]` with `name`, `method`, `harmful.
<judge>.overall/by_category`, `over_refusal`, `utility`, ...), and `from_dict` reads any results.json written
before, keeping fields it does not know (older or newer keys survive a read-modify-write by `rejudge`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .metrics import Rate


def rate_from_dict(d: dict[str, Any]) -> Rate:
    return Rate(int(d["k"]), int(d["n"]), int(d.get("unparsed", 0)))


@dataclass
class JudgedRate:
    """One judge's harmful rate over a prompt set, overall and per harm category."""

    overall: Rate
    by_category: dict[str, Rate] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"overall": self.overall.to_dict(), "by_category": {c: r.to_dict() for c, r in self.by_category.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JudgedRate":
        return cls(rate_from_dict(d["overall"]), {c: rate_from_dict(r) for c, r in d.get("by_category", {}).items()})


@dataclass
class ResultRow:
    """One evaluated model (A, D, T, or T with a defence): the same measurements for every row."""

    name: str
    harmful: dict[str, JudgedRate] = field(default_factory=dict)  # judge -> rate
    verdicts: dict[str, str] = field(default_factory=dict)  # judge -> '1'/'0'/'?' per harmful prompt, in order
    utility: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> accuracy (a Rate's dict)
    cost: dict[str, dict[str, Any]] = field(default_factory=dict)  # prompt set -> tokens and seconds per request
    over_refusal: dict[str, Any] | None = None  # a Rate's dict plus its source and judge
    attacks: dict[str, dict[str, JudgedRate]] | None = None  # attack -> judge -> rate
    # attack -> judge -> '1'/'0'/'?' per attack prompt, in order: for paired tests under attack
    attack_verdicts: dict[str, dict[str, str]] | None = None
    answer_forms: dict[str, Any] | None = None  # canned refusals, structured compliance (evaluation.answer_forms)
    samples: list[dict[str, str]] = field(default_factory=list)
    eval_seconds: float = 0.0
    task: str | None = None
    method: str | None = None  # aligned, degraded, undefended, or a registered method's name
    build_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the defence recorded: layers, coefficients, ...

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "harmful": {j: r.to_dict() for j, r in self.harmful.items()},
            "verdicts": dict(self.verdicts), "utility": dict(self.utility), "cost": dict(self.cost)}
        if self.over_refusal is not None:
            out["over_refusal"] = self.over_refusal
        if self.attacks is not None:
            out["attacks"] = {a: {j: r.to_dict() for j, r in by_judge.items()} for a, by_judge in self.attacks.items()}
        if self.attack_verdicts is not None:
            out["attack_verdicts"] = {a: dict(by_judge) for a, by_judge in self.attack_verdicts.items()}
        if self.answer_forms is not None:
            out["answer_forms"] = self.answer_forms
        out.update(samples=self.samples, eval_seconds=self.eval_seconds, task=self.task, method=self.method)
        if self.build_seconds is not None:
            out["build_seconds"] = self.build_seconds
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResultRow":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            name=d["name"], harmful={j: JudgedRate.from_dict(r) for j, r in d.get("harmful", {}).items()},
            verdicts=dict(d.get("verdicts", {})), utility=dict(d.get("utility", {})), cost=dict(d.get("cost", {})),
            over_refusal=d.get("over_refusal"),
            attacks=None if d.get("attacks") is None else {
                a: {j: JudgedRate.from_dict(r) for j, r in by_judge.items()} for a, by_judge in d["attacks"].items()},
            attack_verdicts=None if d.get("attack_verdicts") is None else {
                a: dict(by_judge) for a, by_judge in d["attack_verdicts"].items()},
            answer_forms=d.get("answer_forms"),
            samples=list(d.get("samples", [])), eval_seconds=float(d.get("eval_seconds", 0.0)), task=d.get("task"),
            method=d.get("method"), build_seconds=d.get("build_seconds"),
            extra={k: v for k, v in d.items() if k not in known})


@dataclass
class BenchResults:
    """A whole benchmark: its config, the rows, the re-attacked rows and their re-protections, judge checks and
    timings."""

    model: str
    config: dict[str, Any]
    rows: list[ResultRow] = field(default_factory=list)
    reattack: list[ResultRow] = field(default_factory=list)
    # re-attacked models with a defence applied again (a results.json from before they existed reads as none)
    reprotect: list[ResultRow] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    judges: dict[str, Any] = field(default_factory=lambda: {"validation": {}, "agreement": {}})
    timings: dict[str, float] = field(default_factory=dict)
    selected_layers: list[int] = field(default_factory=list)
    method_labels: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # config_yaml, paths, and keys of other versions

    def row(self, name: str) -> ResultRow | None:
        return next((r for r in self.rows if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "config": self.config, **{k: v for k, v in self.extra.items()},
                "versions": self.versions, "selected_layers": self.selected_layers, "eval": self.eval,
                "rows": [r.to_dict() for r in self.rows], "reattack": [r.to_dict() for r in self.reattack],
                "reprotect": [r.to_dict() for r in self.reprotect],
                "judges": self.judges, "timings": self.timings, "method_labels": self.method_labels}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchResults":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(model=d["model"], config=d["config"], rows=[ResultRow.from_dict(r) for r in d.get("rows", [])],
                   reattack=[ResultRow.from_dict(r) for r in d.get("reattack", [])],
                   reprotect=[ResultRow.from_dict(r) for r in d.get("reprotect", [])], eval=d.get("eval", {}),
                   judges=d.get("judges", {"validation": {}, "agreement": {}}), timings=d.get("timings", {}),
                   selected_layers=d.get("selected_layers", []), method_labels=d.get("method_labels", {}),
                   versions=d.get("versions", {}), extra={k: v for k, v in d.items() if k not in known})
