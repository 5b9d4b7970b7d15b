"""A fine-tuning team's own task data: load it as `TaskExample`s, split it into shots and check items, and write
shots in the prompt/response JSONL that recalibration reads as a file.

Accepted rows (JSONL, JSON list, CSV or `hf:NAME[:SPLIT]`): `prompt` + `response` (+ `system`), or a chat
`messages` list with an optional system turn, one user turn and one assistant turn; either may carry an `answer`
(an exact reference for scoring). Without `answer` the response is the reference.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DataError
from .loaders import given, read_rows
from .records import TaskExample

MIN_TASK_ROWS = 8
#: the fewest shots and the fewest check items a split may hold
MIN_SPLIT = 4

_MESSAGES_FIX = ('write messages as [{"role": "system", "content": ...} (optional), {"role": "user", "content": ...}, '
                 '{"role": "assistant", "content": ...}]')


def _is_hf(path: str | Path) -> bool:
    return str(path).startswith("hf:")


def _task_name(path: str | Path) -> str:
    s = str(path)
    if _is_hf(s):
        return s[3:].partition(":")[0].rsplit("/", 1)[-1]  # hf:org/name:split -> name
    return Path(s).stem


def _locations(path: str | Path, n_rows: int) -> list[tuple[str, int]]:
    """(where, line) of each row as the loaders returned them: the loaders drop blank lines and do not hand back
    line numbers, so they are recounted here with the same skipping rules."""
    s = str(path)
    suffix = Path(s).suffix.lower()
    if _is_hf(s):
        return [(f"{s} row {i}", i) for i in range(n_rows)]
    if suffix == ".json":
        return [(f"{s}: item {i}", i) for i in range(n_rows)]
    with open(s, encoding="utf-8", newline="" if suffix == ".csv" else None) as f:
        if suffix == ".jsonl":
            lines = [n for n, line in enumerate(f, 1) if line.strip()]
        else:
            # the line a record starts on (a quoted cell may span lines); blank lines are skipped, as DictReader does
            reader = csv.reader(f)
            next(reader, None)
            lines, prev = [], reader.line_num
            for record in reader:
                if record:
                    lines.append(prev + 1)
                prev = reader.line_num
    if len(lines) != n_rows:  # the file changed between the two reads
        raise DataError(f"{s}: changed while being read ({n_rows} rows, then {len(lines)}); read it again")
    return [(f"{s}:{n}", n) for n in lines]


def _text(row: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    v = row.get(key)
    if not given(v):
        if required:
            raise DataError(f"{where}: field '{key}' is missing or empty (fields present: {sorted(row)}); "
                            f"give every row a non-empty '{key}'")
        return None
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__} ({v!r}); quote it")
    return v


def _from_messages(msgs: Any, where: str) -> tuple[str, str, str | None]:
    """(prompt, response, system) of a single-exchange chat."""
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: 'messages' must be a list of objects, got {type(msgs).__name__}; {_MESSAGES_FIX}")
    for i, m in enumerate(msgs):
        if m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{i}] has role {m.get('role')!r}; use 'system', 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] content must be a string, got {type(m.get('content')).__name__}; "
                            f"{_MESSAGES_FIX}")
    roles = [m["role"] for m in msgs]
    turns = [r for r in roles if r != "system"]
    if len(turns) > 2:
        raise DataError(f"{where}: a multi-turn conversation ({len(turns)} user/assistant turns); only "
                        "single-exchange rows are supported: split it into rows of one user and one assistant turn")
    system = None
    if roles[:1] == ["system"]:
        system, msgs = msgs[0]["content"], msgs[1:]
    if [m["role"] for m in msgs] != ["user", "assistant"]:
        raise DataError(f"{where}: messages have roles {roles}; {_MESSAGES_FIX}")
    for i, m in enumerate(msgs, 1 if system is not None else 0):
        if not m["content"].strip():
            raise DataError(f"{where}: messages[{i}] ({m['role']}) has empty content; give it the text")
    return msgs[0]["content"], msgs[1]["content"], system if given(system) else None


def _parse(row: dict[str, Any], where: str) -> tuple[str, str, str | None]:
    if given(row.get("messages")):
        mixed = [k for k in ("prompt", "response", "system") if given(row.get(k))]
        if mixed:
            raise DataError(f"{where}: the row has both 'messages' and {', '.join(repr(k) for k in mixed)}; "
                            "use either a messages list or prompt/response fields, not both")
        return _from_messages(row["messages"], where)
    if not given(row.get("prompt")) and not given(row.get("response")):
        raise DataError(f"{where}: the row has neither 'messages' nor 'prompt'/'response' (fields present: "
                        f"{sorted(row)}); give it a prompt and a response, or a messages list")
    prompt, response = _text(row, "prompt", where), _text(row, "response", where)
    return prompt, response, _text(row, "system", where, required=False)  # type: ignore[return-value]


def load_task_data(path: str | Path) -> list[TaskExample]:
    """A team's task file as `TaskExample`s; any bad row stops the load with its file and line."""
    rows = read_rows(path)  # fields are checked here: a row may be prompt/response or messages
    task = _task_name(path)
    examples, locations = [], _locations(path, len(rows))
    for row, (where, line) in zip(rows, locations):
        prompt, response, system = _parse(row, where)
        answer = _text(row, "answer", where, required=False)
        examples.append(TaskExample(task=task, prompt=prompt, answer=answer if answer is not None else response,
                                    system=system, meta={"response": response, "has_answer": answer is not None,
                                                         "line": line}))
    n_answer = sum(e.meta["has_answer"] for e in examples)
    if 0 < n_answer < len(examples):
        first = next(where for e, (where, _) in zip(examples, locations) if not e.meta["has_answer"])
        raise DataError(f"{path}: {n_answer} of {len(examples)} rows have an 'answer' (the first without: {first}); "
                        "give every row an answer, or none (the response is then the reference)")
    if len(examples) < MIN_TASK_ROWS:
        raise DataError(f"{path}: needs at least {MIN_TASK_ROWS} rows, got {len(examples)}; add more examples")
    return examples


def split_task_data(examples: Sequence[TaskExample], n_shots: int, n_check: int,
                    seed: int) -> tuple[list[TaskExample], list[TaskExample]]:
    """Deterministic (shots, check) split of a loaded file: shuffled with `seed`, shots are the first
    min(n_shots, len // 2), check items the next min(n_check, remaining); the two never share a prompt."""
    if n_shots < MIN_SPLIT or n_check < MIN_SPLIT:
        raise DataError(f"asked for {n_shots} shots and {n_check} check items; ask for at least {MIN_SPLIT} of each")
    rows = list(examples)
    random.Random(seed).shuffle(rows)
    shots = rows[:min(n_shots, len(rows) // 2)]
    # a check item repeating a shot's prompt would be seen in recalibration, so it is not held out
    seen = {(e.system, e.prompt) for e in shots}
    check = [e for e in rows[len(shots):] if (e.system, e.prompt) not in seen][:n_check]
    if len(shots) < MIN_SPLIT or len(check) < MIN_SPLIT:
        raise DataError(f"{len(rows)} rows give {len(shots)} shots and {len(check)} check items (prompts repeating "
                        f"a shot excluded); the split needs at least {2 * MIN_SPLIT} rows with distinct prompts")
    return shots, check


def write_shots_jsonl(examples: Iterable[TaskExample], path: str | Path) -> Path:
    """Write examples as prompt/response(/system) JSONL, readable by `prompt_response_pairs(path)`: how a
    messages file or a loaded split becomes `RecalibrateConfig.task`. The response is the team's own response
    (`meta["response"]`), the target the recalibration keeps, not the short scoring answer."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"{path}: shots are written as JSONL; give a path ending in .jsonl")
    lines = []
    for e in examples:
        row = {"prompt": e.prompt, "response": e.meta.get("response", e.answer)}
        if e.system:
            row["system"] = e.system
        lines.append(json.dumps(row, ensure_ascii=False))
    if not lines:
        raise DataError(f"{path}: no examples to write; pass at least one")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
