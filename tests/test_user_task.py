import csv
import json

import pytest

from safegene.data import (MIN_TASK_ROWS, TaskExample, load_task_data, prompt_response_pairs, split_task_data,
                           write_shots_jsonl)
from safegene.errors import DataError


def _pairs(n: int, answer: bool = False) -> list[dict]:
    rows = [{"prompt": f"What is {i} + 7?", "response": f"{i} + 7 = {i + 7}."} for i in range(n)]
    if answer:
        for i, r in enumerate(rows):
            r["answer"] = str(i + 7)
    return rows


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _chat(i: int, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    turns = [{"role": "user", "content": f"Translate {i}"}, {"role": "assistant", "content": f"t{i}"}]
    return {"messages": msgs + turns}


def test_jsonl_prompt_response(tmp_path):
    rows = _pairs(9)
    rows[3]["system"] = "You are terse."
    p = tmp_path / "my_task.jsonl"
    # a blank line in the middle: line numbers still follow the file
    lines = [json.dumps(r) for r in rows]
    p.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    ex = load_task_data(p)
    assert len(ex) == 9 and all(isinstance(e, TaskExample) and e.task == "my_task" for e in ex)
    assert ex[0].prompt == "What is 0 + 7?" and ex[0].answer == "0 + 7 = 7."
    assert ex[0].meta == {"response": "0 + 7 = 7.", "has_answer": False, "line": 1}
    assert ex[3].system == "You are terse." and ex[0].system is None
    assert ex[5].meta["line"] == 7


def test_csv_multiline_cell_and_answer(tmp_path):
    p = tmp_path / "qa.csv"
    rows = _pairs(8, answer=True)
    rows[1]["prompt"] = "A question\nspanning\nthree lines"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "response", "answer"])
        w.writeheader()
        w.writerows(rows)
    ex = load_task_data(p)
    assert len(ex) == 8 and ex[1].prompt == "A question\nspanning\nthree lines"
    assert [e.answer for e in ex] == [str(i + 7) for i in range(8)]
    assert all(e.meta["has_answer"] for e in ex) and ex[0].meta["response"] == "0 + 7 = 7."
    # physical lines: header 1, row 0 on 2, the multi-line row on 3-5, row 2 starts on 6
    assert [e.meta["line"] for e in ex[:3]] == [2, 3, 6]
    # an empty cell in the row after the multi-line one is reported at its physical line
    rows[2]["response"] = ""
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "response", "answer"])
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match=r"qa\.csv:6: field 'response' is missing or empty"):
        load_task_data(p)


def test_messages_with_system_and_json_list(tmp_path):
    rows = [_chat(i, system="Be formal." if i % 2 else None) for i in range(8)]
    ex = load_task_data(_jsonl(tmp_path / "chat.jsonl", rows))
    assert ex[1].system == "Be formal." and ex[0].system is None
    assert ex[1].prompt == "Translate 1" and ex[1].answer == "t1" and ex[1].meta["response"] == "t1"
    assert ex[1].chat() == [{"role": "system", "content": "Be formal."}, {"role": "user", "content": "Translate 1"}]
    p = tmp_path / "chat.json"
    p.write_text(json.dumps(rows))
    assert [(e.prompt, e.system, e.meta["line"]) for e in load_task_data(p)][:2] == [
        ("Translate 0", None, 0), ("Translate 1", "Be formal.", 1)]


@pytest.mark.parametrize("bad, match", [
    ({"prompt": "q"}, r"d\.jsonl:4: field 'response' is missing or empty"),
    ({"prompt": "  ", "response": "r"}, r"d\.jsonl:4: field 'prompt' is missing or empty"),
    ({"prompt": "q", "response": 42}, r"d\.jsonl:4: field 'response' must be a string, got int"),
    ({"text": "q"}, r"d\.jsonl:4: the row has neither 'messages' nor 'prompt'/'response'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     r"d\.jsonl:4: a multi-turn conversation \(4 user/assistant turns\); only single-exchange rows are supported"),
    ({"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]},
     r"d\.jsonl:4: messages have roles \['assistant', 'user'\]"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"d\.jsonl:4: messages have roles \['user'\]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     r"d\.jsonl:4: messages\[1\] has role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     r"d\.jsonl:4: messages\[1\] \(assistant\) has empty content"),
    ({"messages": "hi"}, r"d\.jsonl:4: 'messages' must be a list of objects"),
    ({**_chat(0), "prompt": "q"}, r"d\.jsonl:4: the row has both 'messages' and 'prompt'; use either"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, match):
    rows = _pairs(10)
    rows[3] = bad
    with pytest.raises(DataError, match=match):
        load_task_data(_jsonl(tmp_path / "d.jsonl", rows))


def test_mixed_answers_and_too_few_rows(tmp_path):
    rows = _pairs(10, answer=True)
    del rows[4]["answer"], rows[7]["answer"]
    with pytest.raises(DataError, match=r"8 of 10 rows have an 'answer' \(the first without: .*m\.jsonl:5\)"):
        load_task_data(_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(DataError, match=f"needs at least {MIN_TASK_ROWS} rows, got 7"):
        load_task_data(_jsonl(tmp_path / "few.jsonl", _pairs(7)))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_task_data(tmp_path / "empty.jsonl")


def test_split_is_deterministic_and_disjoint(tmp_path):
    ex = load_task_data(_jsonl(tmp_path / "t.jsonl", _pairs(30)))
    shots, check = split_task_data(ex, n_shots=8, n_check=10, seed=3)
    assert len(shots) == 8 and len(check) == 10
    assert {e.prompt for e in shots}.isdisjoint(e.prompt for e in check)
    assert split_task_data(ex, 8, 10, seed=3) == (shots, check)
    assert split_task_data(ex, 8, 10, seed=4) != (shots, check)
    # few rows: shots take at most half, check the rest
    shots, check = split_task_data(ex[:9], n_shots=32, n_check=32, seed=0)
    assert (len(shots), len(check)) == (4, 5)
    with pytest.raises(DataError, match="needs at least 8 rows"):
        split_task_data(ex[:7], 4, 4, seed=0)
    with pytest.raises(DataError, match="at least 4 of each"):
        split_task_data(ex, 2, 10, seed=0)
    # a check item repeating a shot's prompt is not held out
    dup = [TaskExample("t", "same prompt", "a")] * 8 + ex[:2]
    with pytest.raises(DataError, match="distinct prompts"):
        split_task_data(dup, 4, 4, seed=0)


def test_write_shots_round_trip(tmp_path):
    rows = [_chat(i, system="Be formal." if i == 2 else None) | {"answer": f"a{i}"} for i in range(8)]
    ex = load_task_data(_jsonl(tmp_path / "chat.jsonl", rows))
    out = write_shots_jsonl(ex, tmp_path / "out" / "shots.jsonl")
    pairs = prompt_response_pairs(str(out))
    # the response, not the scoring answer, is what recalibration keeps
    assert [(p.prompt, p.response, p.system) for p in pairs] == [(e.prompt, e.meta["response"], e.system) for e in ex]
    assert pairs[2].system == "Be formal." and pairs[0].response == "t0"
    with pytest.raises(DataError, match="ending in .jsonl"):
        write_shots_jsonl(ex, tmp_path / "shots.json")
