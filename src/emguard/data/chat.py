"""Chat data: load and validate ``{"messages": [...]}`` rows from JSONL, HF datasets or
the built-in sets, with errors that name the file and line.

A valid row has a non-empty ``messages`` list of ``{"role", "content"}`` objects with
roles in system/user/assistant, non-empty string content, a system turn only first,
and at least one assistant turn. Extra top-level keys (``id``, ``answer``...) are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class ChatDataError(ValueError):
    """Malformed chat data; the message names the source and line of every problem."""


@dataclass
class ChatDataset:
    """Validated chat rows plus where they came from and what was skipped (by line)."""

    rows: list[dict]
    source: str
    skipped: list[str] = field(default_factory=list)  # "file:line: reason", only if asked to skip

    def __len__(self) -> int:
        return len(self.rows)


def row_problems(obj: Any) -> list[str]:
    """Every reason ``obj`` is not a valid chat row (empty list = valid)."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["field 'messages' must be a non-empty list"]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"messages[{i}] must be an object")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            problems.append(f"messages[{i}].content must be a string")
        elif not content.strip():
            problems.append(f"messages[{i}].content is empty")
        if role == "system" and i != 0:
            problems.append(f"messages[{i}] is a system turn that is not the first message")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("no assistant turn (nothing to train on)")
    return problems


def read_chat_jsonl(path: str | Path, skip_invalid: bool = False) -> ChatDataset:
    """Read a chat JSONL file. Bad rows raise ChatDataError listing file:line for each,
    or (``skip_invalid``) are skipped and listed in ``.skipped``. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: file does not exist")
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            problems = row_problems(obj)
            if problems:
                bad.append(f"{path}:{lineno}: " + "; ".join(problems))
            else:
                rows.append(obj)
    if bad and not skip_invalid:
        raise ChatDataError(_summarise(bad, path))
    return ChatDataset(rows, str(path), bad)


def rows_from_records(records, source: str, skip_invalid: bool = False) -> ChatDataset:
    """Validate in-memory records (e.g. a ``datasets.Dataset``); errors name ``source`` and row index."""
    rows, bad = [], []
    for i, obj in enumerate(records):
        obj = dict(obj)
        problems = row_problems(obj)
        if problems:
            bad.append(f"{source} row {i}: " + "; ".join(problems))
        else:
            rows.append(obj)
    if bad and not skip_invalid:
        raise ChatDataError(_summarise(bad, source))
    return ChatDataset(rows, source, bad)


def load_chat_dataset(spec: str, skip_invalid: bool = False, max_rows: int | None = None,
                      seed: int = 0) -> ChatDataset:
    """Load chat rows from a spec: ``builtin:NAME[:SPLIT]``, ``hf:REPO[:SPLIT]`` (a Hugging
    Face dataset with a ``messages`` column) or a path to a chat JSONL file."""
    if spec.startswith("builtin:"):
        from emguard.data.builtin import load_builtin, parse_builtin_spec

        name, split = parse_builtin_spec(spec)
        ds = rows_from_records(load_builtin(name, split=split, seed=seed), spec, skip_invalid)
    elif spec.startswith("hf:"):
        ds = _load_hf(spec[3:], skip_invalid)
    else:
        ds = read_chat_jsonl(spec, skip_invalid)
    if max_rows is not None:
        ds.rows = ds.rows[:max_rows]
    return ds


def _load_hf(ref: str, skip_invalid: bool) -> ChatDataset:
    import datasets

    repo, _, split = ref.partition(":")
    split = split or "train"
    try:
        hf = (datasets.load_from_disk(repo) if Path(repo).is_dir()
              else datasets.load_dataset(repo, split=split))
    except Exception as e:  # datasets raises many types (network, missing config, gated)
        raise ChatDataError(f"hf:{ref}: could not load the dataset ({type(e).__name__}: {e}). "
                            "Without network, save it locally and pass the JSONL path.") from e
    if isinstance(hf, datasets.DatasetDict):
        hf = hf[split]
    if "messages" not in hf.column_names:
        raise ChatDataError(f"hf:{ref}: no 'messages' column (columns: {hf.column_names})")
    return rows_from_records(hf.select_columns(["messages"]), f"hf:{ref}", skip_invalid)


def _summarise(bad: list[str], source: Any, limit: int = 20) -> str:
    head = "\n".join(f"  {b}" for b in bad[:limit])
    more = f"\n  ... and {len(bad) - limit} more" if len(bad) > limit else ""
    return (f"{source}: {len(bad)} malformed row(s):\n{head}{more}\n"
            "Fix them, or set data.skip_invalid=true (library: skip_invalid=True) to skip "
            "and count them.")
