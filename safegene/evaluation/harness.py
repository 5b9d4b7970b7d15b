"""Evaluate one model the same way as every other: harmful rate per judge and category, over-refusal, utility.

Responses are generated once per model (batched, greedy, appended to JSONL as they finish, so an interrupted run
resumes) and then read by every judge; the verdicts are kept so that judges can be compared on the same responses.
"""

from __future__ import annotations

import dataclasses

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..chat import last_user_turn
from ..generation import GenerationConfig, Responder, generate_to_jsonl
from .answer_forms import answer_forms
from ..data import harmful_prompts, shared_data_dir
from ..data.records import HarmfulPrompt
from ..io import sha256_text
from .judges import RefusalPhraseJudge
from .metrics import Rate, cohen_kappa
from .results import ResultRow
from .utility import cost_per_request, task_items_tag, task_utility


@dataclass
class EvalSets:
    harmful: list[HarmfulPrompt]
    over_refusal: list[HarmfulPrompt]
    over_refusal_source: str
    n_task: int
    seed: int = 0
    tasks: list[str] = field(default_factory=list)
    attacks: dict[str, list[HarmfulPrompt]] = field(default_factory=dict)  # adversarial variants, by attack
    over_refusal_tokens: int | None = None  # None: the harmful prompts' limit

    def over_refusal_generation(self, gen: GenerationConfig) -> GenerationConfig:
        """Decoding of the over-refusal prompts: the refusal-phrase judge reads only their opening."""
        if self.over_refusal_tokens is None:
            return gen
        return dataclasses.replace(gen, max_new_tokens=self.over_refusal_tokens)


def over_refusal_prompts(ref: str, n: int, seed: int) -> tuple[list[HarmfulPrompt], str]:
    if n == 0:
        return [], "none"
    if ref == "auto":
        ref = "shared:xstest-safe" if shared_data_dir() else "benign-sensitive"
    return harmful_prompts(ref, n=n, seed=seed), ref


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _responses(model: Any, tok: Any, prompts: Sequence[HarmfulPrompt], path: Path, gen: GenerationConfig,
               desc: str, responder: Responder | None = None) -> list[dict[str, Any]]:
    items = [{"id": p.id or str(i), "prompt": p.chat(), "category": p.category}
             | ({"request": p.request} if p.request else {}) for i, p in enumerate(prompts)]
    return generate_to_jsonl(model, tok, items, path, gen, progress=True, desc=desc, responder=responder)


#: the mark of an unparsed verdict in a row's verdict string
UNPARSED = "?"


def stored_request(item: dict[str, Any]) -> str:
    """The request judges read, from a stored generation row (plain prompt, wrapped prompt, or conversation)."""
    return item.get("request") or last_user_turn(item["prompt"])


def judge_responses(judge: Any, prompts: Sequence[str], categories: Sequence[str],
                    responses: Sequence[str]) -> tuple[dict[str, Any], str]:
    """A judge's harmful rate over responses, overall and by category, and its verdicts as a string: '1' harmful,
    '0' not, UNPARSED where the judge's answer could not be read (rates leave those out and count them apart)."""
    verdicts = [v.harmful for v in judge.judge_batch(list(prompts), list(responses))]
    by_cat: dict[str, list[bool | None]] = defaultdict(list)
    for c, v in zip(categories, verdicts):
        by_cat[c].append(v)
    summary = {"overall": Rate.of(verdicts).to_dict(),
               "by_category": {c: Rate.of(v).to_dict() for c, v in sorted(by_cat.items())}}
    return summary, "".join(UNPARSED if v is None else "1" if v else "0" for v in verdicts)


def attack_tag(prompts: Sequence[HarmfulPrompt]) -> str:
    """A hash of an attack's prompts, in the name of the file its answers are stored in: a changed attack set never
    reuses stale answers, and `rejudge` opens the very file a row was judged on (results.json's eval.attack_tags)."""
    return sha256_text("\n".join(json.dumps(p.chat()) for p in prompts))[:8]


def attack_answers_path(base: Path, attack: str, prompts: Sequence[HarmfulPrompt] | None = None,
                        tag: str | None = None) -> Path:
    """Where a row's answers to one attack's prompts are stored (`base`: the row's responses path without suffix)."""
    return base.with_suffix(f".attack-{attack}-{tag or attack_tag(prompts)}.jsonl")


def evaluate_model(name: str, model: Any, tok: Any, sets: EvalSets, judges: Sequence[Any], gen: GenerationConfig,
                   responses_dir: Path, tasks: Sequence[str] = (), over_refusal: bool = True,
                   attacks: bool = False, responder: Responder | None = None) -> ResultRow:
    """One result row: per-judge harmful rate (overall and by category), over-refusal, task utility, what answering
    cost per request (tokens, seconds), seconds; with `attacks`, the harmful rate under each adversarial variant in
    `sets.attacks` too. `responder` replaces plain generation (an inference-time defence) everywhere."""
    t0 = time.perf_counter()
    base = responses_dir / slug(name)
    prompts = sets.harmful
    stored = _responses(model, tok, prompts, base.with_suffix(".harmful.jsonl"), gen, f"[{name}] harmful", responder)
    responses = [r["response"] for r in stored]
    row: dict[str, Any] = {"name": name, "harmful": {}, "verdicts": {}, "utility": {},
                           "cost": {"harmful": cost_per_request(stored)}, "answer_forms": answer_forms(responses)}
    for judge in judges:
        row["harmful"][judge.name], row["verdicts"][judge.name] = judge_responses(
            judge, [p.judged_request for p in prompts], [p.category for p in prompts], responses)
    if attacks:
        row["attacks"], row["attack_verdicts"] = {}, {}
        for attack, adv in sets.attacks.items():
            adv_resp = [r["response"] for r in _responses(model, tok, adv, attack_answers_path(base, attack, adv),
                                                          gen, f"[{name}] {attack}", responder)]
            judged = {j.name: judge_responses(j, [p.judged_request for p in adv], [p.category for p in adv], adv_resp)
                      for j in judges}
            row["attacks"][attack] = {j: rate for j, (rate, _) in judged.items()}
            row["attack_verdicts"][attack] = {j: verdicts for j, (_, verdicts) in judged.items()}
    if over_refusal and sets.over_refusal:
        benign_rows = _responses(model, tok, sets.over_refusal, base.with_suffix(".over_refusal.jsonl"),
                                 sets.over_refusal_generation(gen),
                                 f"[{name}] over-refusal", responder)
        phrase = RefusalPhraseJudge()
        refusals = [phrase.is_refusal(r["response"]) for r in benign_rows]
        row["over_refusal"] = {**Rate(sum(refusals), len(refusals)).to_dict(), "source": sets.over_refusal_source,
                               "judge": "refusal-phrase",
                               # per prompt, in order ('1' refused): for paired tests between rows
                               "verdicts": "".join("1" if r else "0" for r in refusals)}
        row["cost"]["over_refusal"] = cost_per_request(benign_rows)
    for task in tasks:
        tag = task_items_tag(task, sets.n_task, sets.seed)
        u = task_utility(model, tok, task, n=sets.n_task, seed=sets.seed, batch_size=gen.batch_size, progress=True,
                         responder=responder, responses_path=base.with_suffix(f".task-{task}-{tag}.jsonl"))
        row["utility"][task] = u["accuracy"]
        row["cost"][f"task:{task}"] = u["cost"]
    row["samples"] = [{"prompt": p.prompt, "response": r} for p, r in list(zip(prompts, responses))[:3]]
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    msg = f"[{name}] " + ", ".join(f"harmful ({j}) {h['overall']['rate']:.3f}"
                                  + (f" ({h['overall']['unparsed']} unparsed)" if h["overall"]["unparsed"] else "")
                                  for j, h in row["harmful"].items())
    if "over_refusal" in row:
        msg += f", over-refusal {row['over_refusal']['rate']:.3f}"
    msg += "".join(f", {t} {u['rate']:.3f}" for t, u in row["utility"].items())
    for attack, by_judge in row.get("attacks", {}).items():
        msg += f", {attack} " + "/".join(f"{h['overall']['rate']:.3f}" for h in by_judge.values())
    print(f"{msg} (n={len(prompts)}, {row['eval_seconds']:.0f} s)")
    return ResultRow.from_dict(row)


def judge_agreement(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pairwise Cohen's κ and raw agreement of the judges over every judged response of every row; a response
    either judge could not read is left out of that pair."""
    pooled: dict[str, str] = defaultdict(str)
    for r in rows:
        for j, bits in r.get("verdicts", {}).items():
            pooled[j] += bits
    names = sorted(pooled)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if len(pooled[a]) != len(pooled[b]):
                continue
            both = [(x == "1", y == "1") for x, y in zip(pooled[a], pooled[b]) if UNPARSED not in (x, y)]
            k = cohen_kappa([x for x, _ in both], [y for _, y in both])
            agree = sum(x == y for x, y in both)
            out[f"{a} vs {b}"] = {"kappa": None if k is None else round(k, 4),
                                  "agreement": Rate(agree, len(both), len(pooled[a]) - len(both)).to_dict()}
    return out
