"""How far each judge agrees with human labels, on labelled responses none of the judges was tuned on.

The labelled set is PyRIT's scorer evaluation data (`pyrit/datasets/scorer_evals/objective/*.csv`, MIT): 395
(request, response) pairs over 13 harm categories, each marked by a person as "objective achieved" (the response
gives the harmful help) or not. Responses are cut to their opening `window` characters before judging, because
the benchmark judges short generations (~40 tokens); the human label was given on the whole response, so a cut
can hide what made it harmful — the accuracy here is a floor for long answers, and the right figure for short ones.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from typing import Any

from ..config import opt
from ..data.builtin import package_dir
from ..errors import DataError
from ..models.placement import PlacementConfig
from .metrics import Rate, cohen_kappa, roc_auc


@dataclass
class JudgeValidationConfig:
    """Measure judges against human labels."""

    judges: list[str] = opt(["refusal-phrase"], "judge names: refusal-phrase, content-classifier, llm:<model>, "
                            "endpoint:<url>?model=<m>", positional=True)
    output: str | None = opt(None, "write the measurements as JSON here", aliases=("-o",))
    placement: PlacementConfig = opt(PlacementConfig(), "where an llm:<model> judge runs, in what dtype (--device, "
                                     "--dtype, --device-map)", added_later=True)


@dataclass(frozen=True)
class LabelledResponse:
    prompt: str
    response: str
    harmful: bool
    category: str


def human_labelled(window: int = 200) -> list[LabelledResponse]:
    root = package_dir("pyrit") / "datasets" / "scorer_evals" / "objective"
    files = sorted(root.glob("*.csv"))
    if not files:
        raise DataError(f"{root}: no labelled CSVs; reinstall pyrit (pip install --no-deps pyrit==1.1.0)")
    out = []
    for f in files:
        text = "".join(line for line in f.read_text(encoding="utf-8").splitlines(keepends=True) if not line.startswith("#"))
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in ("objective", "assistant_response", "human_score") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{f}: header lacks column(s) {', '.join(missing)}; reinstall pyrit "
                            "(pip install --no-deps --force-reinstall pyrit==1.1.0)")
        for row in reader:
            if row.get("human_score") not in ("0", "1"):
                continue
            out.append(LabelledResponse(row["objective"], row["assistant_response"][:window], row["human_score"] == "1",
                                        row.get("harm_category") or f.stem))
    return out


def validate_judge(judge: Any, items: list[LabelledResponse]) -> dict[str, Any]:
    """Accuracy, true/false positive rates, Cohen's κ with the human label, and AUC where the judge has scores.

    Items whose judge answer could not be read are left out of every figure and counted as `unparsed`."""
    t0 = time.perf_counter()
    verdicts = judge.judge_batch([x.prompt for x in items], [x.response for x in items])
    seconds_per_item = (time.perf_counter() - t0) / max(len(items), 1)
    judged = [(v, x) for v, x in zip(verdicts, items) if v.harmful is not None]
    unparsed = len(items) - len(judged)
    verdicts, items = [v for v, _ in judged], [x for _, x in judged]
    pred = [v.harmful for v in verdicts]
    gold = [x.harmful for x in items]
    tp = sum(p and g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    scores = [v.score for v in verdicts]
    auc = roc_auc(scores, gold) if all(s is not None for s in scores) and len(set(scores)) > 2 else None
    kappa = cohen_kappa(pred, gold)
    return {
        "judge": judge.name,
        "n": len(items),
        "unparsed": unparsed,
        "accuracy": Rate(tp + tn, len(items), unparsed).to_dict(),
        "true_positive_rate": Rate(tp, sum(gold)).to_dict(),
        "true_negative_rate": Rate(tn, len(gold) - sum(gold)).to_dict(),
        "kappa_vs_human": None if kappa is None else round(kappa, 4),
        "auc": None if auc is None else round(auc, 4),
        "seconds_per_item": round(seconds_per_item, 4),
        "data": "pyrit scorer_evals/objective (human labels), responses cut to their opening",
    }


def pyrit_reference_scorers() -> list[dict[str, Any]]:
    """How PyRIT's own LLM scorers did on the same human labels, as PyRIT publishes it
    (`scorer_evals/objective/objective_achieved_metrics.jsonl`, shipped in the package): the scorer's class, the
    models it called, n and accuracy. The yardstick for what a judge can reach on this set: hosted GPT-4o / GPT-5.4
    scorers, not anything run here."""
    import json
    import re

    path = package_dir("pyrit") / "datasets" / "scorer_evals" / "objective" / "objective_achieved_metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found; reinstall pyrit (pip install --no-deps pyrit==1.1.0)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        metrics = entry.get("metrics") or {}
        models = sorted(set(re.findall(r'"model_name": "([^"]+)"', json.dumps(entry.get("children") or {}))))
        out.append({"scorer": entry.get("class_name"), "models": models, "n": metrics.get("num_responses"),
                    "accuracy": round(float(metrics["accuracy"]), 4), "f1": round(float(metrics.get("f1_score", 0)), 4),
                    "pyrit_version": entry.get("pyrit_version"), "eval_hash": entry.get("eval_hash")})
    return sorted(out, key=lambda r: -r["accuracy"])
