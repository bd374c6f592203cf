"""FoQA (Faroese extractive QA, SQuAD schema) loading and conversion to chat rows.

Sources: a local SQuAD-nested JSON (``{"data": [{"title", "paragraphs": [{"context",
"qas": [...]}]}]}``), a flat JSON list, JSONL or Parquet of rows ``{id, title, context,
question, answers: {text: [...], answer_start: [...]}}``; a directory holding
``<split>.jsonl`` / ``<split>.json`` / ``<split>.parquet``; or a Hugging Face hub id
(default ``alexandrainst/foqa``, gated: needs network, accepted terms and a token).

Validated row: ``{"id": str, "title": str, "context": str, "question": str,
"answers": {"text": [str, ...], "answer_start": [int, ...]}}`` with at least one
non-empty answer. Chat row: the user turn asks for a short span copied from the text,
the assistant turn is the first gold answer, ``answers`` keeps every gold text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

FOQA_HUB_ID = "alexandrainst/foqa"
SUFFIXES = (".jsonl", ".json", ".parquet")
PROMPT = ("Answer the question with a short span copied exactly from the text.\n\n"
          "Text:\n{context}\n\nQuestion: {question}")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class FoQADataError(ValueError):
    """Malformed or unloadable FoQA data; the message names the file and row of each problem."""


def load_foqa(source: str | Path = FOQA_HUB_ID, split: str = "test") -> list[dict]:
    """Validated SQuAD-schema rows from a local file/directory or a hub id.

    ``split`` picks ``<split>.*`` in a directory and the hub split; a single file is
    taken as it is."""
    path = Path(source)
    if path.is_dir():
        path = _split_file(path, split)
    if path.is_file():
        return _validate(_read_file(path), str(path))
    if not is_hub_id(source):
        raise FoQADataError(f"{source}: no such file or directory")
    return _load_hub(str(source), split)


def is_hub_id(source: str | Path) -> bool:
    """True when ``load_foqa`` reads ``source`` from the hub: not an existing path, no data
    file suffix, and shaped ``org/name`` (``data/foqa`` is a hub id, ``./data/foqa`` a path)."""
    path = Path(source)
    return (not path.exists() and path.suffix not in SUFFIXES
            and _HUB_ID.match(str(source)) is not None)


def foqa_prompt(context: str, question: str) -> str:
    return PROMPT.format(context=context.strip(), question=question.strip())


def foqa_chat_rows(rows: Iterable[dict]) -> list[dict]:
    """Chat rows ``{"messages": [user, assistant], "id", "answers": [gold texts]}``."""
    return [{"messages": [{"role": "user", "content": foqa_prompt(r["context"], r["question"])},
                          {"role": "assistant", "content": r["answers"]["text"][0]}],
             "id": r["id"], "answers": list(r["answers"]["text"])} for r in rows]


# --------------------------------------------------------------------------- sources


def _split_file(directory: Path, split: str) -> Path:
    for suffix in SUFFIXES:
        if (directory / f"{split}{suffix}").is_file():
            return directory / f"{split}{suffix}"
    names = ", ".join(f"{split}{s}" for s in SUFFIXES)
    raise FoQADataError(f"{directory}: no file for split {split!r} (looked for {names})")


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, raw record) pairs; location names the file and the row."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".json":
        return _read_json(path)
    raise FoQADataError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise FoQADataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column "
                                    f"{e.colno})") from e


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    frame = pd.read_parquet(path)
    for i, record in enumerate(frame.to_dict(orient="records")):
        yield f"{path}: row {i}", record


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise FoQADataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column "
                            f"{e.colno})") from e
    if isinstance(obj, list):
        return ((f"{path}: item {i}", r) for i, r in enumerate(obj))
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        return _flatten_squad(obj["data"], path)
    raise FoQADataError(f"{path}: expected a SQuAD object with a 'data' list or a list of rows")


def _flatten_squad(articles: list, path: Path) -> Iterator[tuple[str, Any]]:
    """Nested SQuAD articles -> flat rows (malformed nesting is reported per location)."""
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise FoQADataError(f"{path}: data[{a}]: field 'paragraphs' must be a list")
        for p, para in enumerate(paragraphs):
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(qas, list):
                raise FoQADataError(f"{path}: data[{a}].paragraphs[{p}]: field 'qas' "
                                    "must be a list")
            for q, qa in enumerate(qas):
                row = dict(qa) if isinstance(qa, dict) else qa
                if isinstance(row, dict):
                    row.setdefault("title", article.get("title", ""))
                    row.setdefault("context", para.get("context"))
                yield f"{path}: data[{a}].paragraphs[{p}].qas[{q}]", row


def _load_hub(hub_id: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # datasets raises many types: offline, gated, missing split
        raise FoQADataError(
            f"{hub_id}: not a local file or directory, and loading it from the Hugging Face "
            f"hub failed ({type(e).__name__}: {e}). FoQA is gated and needs network access, "
            "accepted terms and HF_TOKEN; otherwise download it once and pass a local "
            "JSON / JSONL / Parquet file or a directory with <split>.* files.") from e
    return _validate(((f"{hub_id}[{split}] row {i}", r) for i, r in enumerate(ds)),
                     f"{hub_id}[{split}]")


# --------------------------------------------------------------------------- validation


def _validate(records: Iterable[tuple[str, Any]], source: str) -> list[dict]:
    rows, problems, seen = [], [], {}
    for where, raw in records:
        row, issues = _normalise(raw)
        if issues:
            problems.append(f"{where}: " + "; ".join(issues))
        elif row["id"] in seen:
            problems.append(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
        else:
            seen[row["id"]] = where
            rows.append(row)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise FoQADataError(f"{source}: {len(problems)} malformed row(s):\n{shown}{more}")
    if not rows:
        raise FoQADataError(f"{source}: no rows")
    return rows


def _normalise(raw: Any) -> tuple[dict, list[str]]:
    """(clean row, problems); problems name each bad field."""
    if not isinstance(raw, dict):
        return {}, [f"expected an object, got {type(raw).__name__}"]
    issues = []
    row_id = raw.get("id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or str(row_id) == "":
        issues.append("field 'id' must be a non-empty string or integer")
    for key in ("context", "question"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            issues.append(f"field '{key}' must be a non-empty string")
    title = raw.get("title") or ""
    if not isinstance(title, str):
        issues.append("field 'title' must be a string")
    texts, starts, answer_issues = _answers(raw.get("answers"))
    issues += answer_issues
    row = {"id": str(row_id), "title": title, "context": raw.get("context"),
           "question": raw.get("question"), "answers": {"text": texts, "answer_start": starts}}
    return row, issues


def _answers(raw: Any) -> tuple[list[str], list[int], list[str]]:
    """Accept ``{text: [...], answer_start: [...]}`` (arrays allowed) or SQuAD's list of
    ``{text, answer_start}`` objects."""
    if isinstance(raw, list) and all(isinstance(a, dict) for a in raw):
        raw = {"text": [a.get("text") for a in raw],
               "answer_start": [a.get("answer_start") for a in raw]}
    if not isinstance(raw, dict):
        return [], [], ["field 'answers' must be {text: [...], answer_start: [...]}"]
    texts, starts = _as_list(raw.get("text")), _as_list(raw.get("answer_start", []))
    if texts is None or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        return [], [], ["field 'answers.text' must be a non-empty list of non-empty strings"]
    if starts is None or (starts and len(starts) != len(texts)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in starts):
        return [], [], ["field 'answers.answer_start' must be a list of integers, one per text"]
    return list(texts), list(starts), []


def _as_list(value: Any) -> list | None:
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else None
