"""Readers for JSONL, JSON, CSV and (optionally) Hugging Face `datasets`, with errors that name file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DataError
from .records import HarmfulPrompt, PromptResponse


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file; every non-blank line must be a JSON object holding the `required` fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            _check_fields(obj, required, f"{path}:{lineno}")
            rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def read_json_list(path: str | Path, required: Sequence[str] = (), key: str | None = None) -> list[dict[str, Any]]:
    """Read a JSON file holding a list of objects (or an object whose `key` holds that list)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: expected an object with a '{key}' list")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    if not data:
        raise DataError(f"{path}: no rows (the list is empty)")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item {i} is a {type(obj).__name__}, expected an object")
        _check_fields(obj, required, f"{path}: item {i}")
    return data


def read_csv(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in required if k not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)} (has {reader.fieldnames})")
        rows = []
        for row in reader:
            # DictReader's line_num is the physical line just read (multi-line quoted cells included)
            _check_fields(row, required, f"{path}:{reader.line_num}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (the file has a header only, or is empty)")
    return rows


def given(v: Any) -> bool:
    """A field counts as given unless absent, null or blank (a CSV's empty cell)."""
    return v is not None and not (isinstance(v, str) and not v.strip())


def _check_fields(obj: dict[str, Any], required: Iterable[str], where: str) -> None:
    for k in required:
        if not given(obj.get(k)):
            raise DataError(f"{where}: field '{k}' is missing or empty (fields present: {sorted(obj)})")


def read_rows(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read rows by file extension (.jsonl, .json, .csv) or `hf:NAME[:SPLIT]` from HF datasets."""
    s = str(path)
    if s.startswith("hf:"):
        return _read_hf(s[3:], required)
    suffix = Path(s).suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(s, required)
    if suffix == ".json":
        return read_json_list(s, required)
    if suffix == ".csv":
        return read_csv(s, required)
    raise DataError(f"{s}: unsupported file type '{suffix}'; use .jsonl, .json, .csv or hf:NAME[:SPLIT]")


def _read_hf(spec: str, required: Sequence[str]) -> list[dict[str, Any]]:
    try:
        import datasets  # type: ignore
    except ImportError:
        raise DataError("hf: data sources need the 'datasets' package: pip install datasets") from None
    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    rows = [dict(r) for r in ds]
    for i, r in enumerate(rows):
        _check_fields(r, required, f"hf:{spec} row {i}")
    if not rows:
        raise DataError(f"hf:{spec}: no rows")
    return rows


def load_prompt_responses(
    path: str | Path, prompt_field: str = "prompt", response_field: str = "response", source: str | None = None
) -> list[PromptResponse]:
    rows = read_rows(path, (prompt_field, response_field))
    src = source or Path(str(path)).stem
    return [
        PromptResponse(prompt=r[prompt_field], response=r[response_field], source=src, system=r.get("system"))
        for r in rows
    ]


def load_harmful_prompts(
    path: str | Path, prompt_field: str = "prompt", category_field: str | None = "category", source: str | None = None
) -> list[HarmfulPrompt]:
    rows = read_rows(path, (prompt_field,))
    src = source or Path(str(path)).stem
    return [
        HarmfulPrompt(
            prompt=r[prompt_field],
            category=str(r.get(category_field) or "uncategorized") if category_field else "uncategorized",
            source=src,
            id=str(r.get("id", i)),
        )
        for i, r in enumerate(rows)
    ]

