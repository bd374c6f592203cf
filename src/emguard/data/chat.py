"""Chat data: load and validate ``{"messages": [...]}`` rows from JSONL, HF datasets or
the built-in sets, with errors that name the file and line.

A valid row has a non-empty ``messages`` list of ``{"role", "content"}`` objects with
roles in system/user/assistant, non-empty string content, a system turn only first,
and at least one assistant turn. Extra top-level keys (``id``, ``answer``...) are kept.

Provenance: every loaded row also carries where it came from, so an error about it
after shuffling or interleaving still names its file and line: ``_source`` (the file
path or the spec) plus ``_line`` (1-based line of a JSONL file) or ``_row`` (0-based
index of a built-in / HF record). ``row_location(row)`` formats it. Consumers read
``messages`` (and their own fields) and ignore these keys.

Files must be UTF-8 text (``read_text_file``, shared with the question and config
loaders). A UTF-8 byte-order mark is accepted and dropped: it is harmless and some
Windows editors add it. UTF-16/UTF-32, binary data (NUL bytes) and other 8-bit
encodings (Latin-1, Windows-1252) are an error that names the file and the problem,
whatever ``skip_invalid`` says: a wrongly saved file is not a few bad rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emguard.data.builtin import load_builtin, parse_builtin_spec

ROLES = ("system", "user", "assistant")
PROVENANCE_KEYS = ("_source", "_line", "_row")
UTF8_BOM = b"\xef\xbb\xbf"
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\x00\x00\xfe\xff", "UTF-32-BE"),
         (b"\xff\xfe", "UTF-16-LE"), (b"\xfe\xff", "UTF-16-BE"))
_NEWLINE = re.compile(r"\r\n|\r|\n")  # as text-mode files; not str.splitlines (U+2028 is JSON text)
_NEWLINE_BYTES = re.compile(rb"\r\n|\r|\n")


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


def row_problems(obj: Any, need_assistant: bool = True) -> list[str]:
    """Every reason ``obj`` is not a valid chat row (empty list = valid).

    ``need_assistant=False`` accepts rows without an assistant turn (question sets)."""
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
            problems.append(f"messages[{i}].role {_short(role)} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            problems.append(f"messages[{i}].content must be a string")
        elif not content.strip():
            problems.append(f"messages[{i}].content is empty")
        elif not _encodable(content):
            problems.append(f"messages[{i}].content holds an unpaired surrogate (a lone "
                            "\\ud800-\\udfff escape), which no tokenizer accepts")
        if role == "system" and i != 0:
            problems.append(f"messages[{i}] is a system turn that is not the first message")
    if need_assistant and not any(isinstance(m, dict) and m.get("role") == "assistant"
                                  for m in messages):
        problems.append("no assistant turn (nothing to train on)")
    return problems


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def row_location(row: dict, source: str = "<rows>", index: int | None = None) -> str:
    """Where a loaded row came from, for messages: ``path:line`` (JSONL file) or
    ``SOURCE row N (id 'ID')`` (built-in / HF / WildGuardMix record). A row without
    provenance (built in memory) gives ``source row ID-or-index``."""
    where = row.get("_source")
    if where is not None and "_line" in row:
        return f"{where}:{row['_line']}"
    if where is not None and "_row" in row:
        rid = row.get("id")
        return f"{where} row {row['_row']}" + (f" (id {rid!r})" if rid is not None else "")
    return f"{source} row {row.get('id', index)}"


# ----------------------------------------------------------------------------- user files

def read_text_file(path: str | Path, error: type[Exception] = ChatDataError) -> str:
    """The text of a user's file (see ``decode_text``); unreadable is ``error`` too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the file ({e.strerror or e})") from None
    return decode_text(data, str(path), error)


def decode_text(data: bytes, where: str, error: type[Exception] = ChatDataError) -> str:
    """``data`` as UTF-8 text, a leading UTF-8 byte-order mark dropped. Anything else is
    ``error`` naming ``where``: UTF-16/UTF-32 (by byte-order mark, or ASCII text with
    every other byte NUL), binary data (a NUL byte) or bytes that are not UTF-8 (Latin-1,
    Windows-1252...), with the byte offset and line."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise error(f"{where}: the file is {name} encoded (byte-order mark); save it as UTF-8")
    skip = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    nul = data.find(b"\x00", skip)
    if nul >= 0:
        guess = _utf16_guess(data[skip:skip + 4096])
        if guess:
            raise error(f"{where}: the file looks {guess} encoded (every other byte is NUL); "
                        "save it as UTF-8")
        raise error(f"{where}: not a text file (binary data: NUL byte at offset {nul}, line "
                    f"{_line_of(data, nul)}); expected UTF-8 text")
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        raise error(f"{where}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}, line "
                    f"{_line_of(data, at)}); if it is Latin-1 or Windows-1252 text, save it "
                    "as UTF-8") from None


def _utf16_guess(head: bytes) -> str | None:
    """UTF-16 without a byte-order mark: mostly-ASCII text has NUL in every other byte."""
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if even == 0 and odd >= max(2, len(head) // 4):
        return "UTF-16-LE"
    if odd == 0 and even >= max(2, len(head) // 4):
        return "UTF-16-BE"
    return None


def _line_of(data: bytes, offset: int) -> int:
    return len(_NEWLINE_BYTES.findall(data, 0, offset)) + 1


def text_lines(text: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r (line numbers as editors show them)."""
    return _NEWLINE.split(text)


def parse_json_line(line: str) -> Any:
    """``json.loads``, raising only ValueError with a short reason (json also raises plain
    ValueError for integers over 4300 digits and RecursionError for deep nesting)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load``, raising only ValueError with a short reason ("while parsing a flow
    sequence at line 2, column 14, expected ',' or ']' ... at line 3, column 1"). PyYAML also
    raises ValueError, KeyError or AttributeError for some bad scalars (``2020-13-45``,
    ``!!int x``, ``!!bool x``) and RecursionError for deep nesting."""
    try:
        value = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        parts = [(what, mark) for what, mark in ((e.context, e.context_mark),
                                                 (e.problem, e.problem_mark)) if what]
        raise ValueError(", ".join(what + (f" at line {mark.line + 1}, column {mark.column + 1}"
                                           if mark else "") for what, mark in parts)) from None
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"a value YAML cannot construct ({type(e).__name__}: {e})") from None
    expanded_size(value)
    return value


MAX_YAML_NODES = 1_000_000  # values after aliases are expanded; a study grid is far below


def expanded_size(value: Any, limit: int = MAX_YAML_NODES) -> int:
    """The number of values ``value`` holds once every YAML alias is expanded (a list or
    mapping counts its items, recursively); ValueError above ``limit`` or for a value that
    contains itself. Aliases load as shared references, so a few lines (``a: &a [*b, *b,
    ...]``, the "billion laughs") expand to billions of values when copied or dumped; this
    counts them without expanding, by memoising each shared value once."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(v: Any) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        key = id(v)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ValueError("a YAML alias refers to a value that contains it (a cycle)")
        active.add(key)
        items = list(v.values()) + list(v.keys()) if isinstance(v, dict) else v
        total = 1
        for item in items:
            total += size(item)
            if total > limit:
                raise ValueError(f"the YAML expands to more than {limit:,} values once its "
                                 "aliases (*name) are expanded; write the values out, or use "
                                 "fewer nested aliases")
        active.discard(key)
        sizes[key] = total
        return total

    return size(value)


def read_chat_jsonl(path: str | Path, skip_invalid: bool = False) -> ChatDataset:
    """Read a chat JSONL file. Bad rows raise ChatDataError listing file:line for each,
    or (``skip_invalid``) are skipped and listed in ``.skipped``. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: file does not exist")
    rows, bad = [], []
    for lineno, line in enumerate(text_lines(read_text_file(path)), start=1):
        if not line.strip():
            continue
        try:
            obj = parse_json_line(line)
        except ValueError as e:
            bad.append(f"{path}:{lineno}: invalid JSON ({e})")
            continue
        problems = row_problems(obj)
        if problems:
            bad.append(f"{path}:{lineno}: " + "; ".join(problems))
        else:
            rows.append({**obj, "_source": str(path), "_line": lineno})
    if bad and not skip_invalid:
        raise ChatDataError(_summarise(bad, path))
    return ChatDataset(rows, str(path), bad)


def rows_from_records(records, source: str, skip_invalid: bool = False) -> ChatDataset:
    """Validate in-memory records (e.g. a ``datasets.Dataset``); errors name ``source`` and row index."""
    rows, bad = [], []
    for i, obj in enumerate(records):
        obj = dict(obj) if isinstance(obj, Mapping) else obj
        problems = row_problems(obj)
        if problems:
            bad.append(f"{source} row {i}: " + "; ".join(problems))
        else:
            rows.append({**obj, "_source": source, "_row": i})
    if bad and not skip_invalid:
        raise ChatDataError(_summarise(bad, source))
    return ChatDataset(rows, source, bad)


def load_chat_dataset(spec: str, skip_invalid: bool = False, max_rows: int | None = None,
                      seed: int = 0) -> ChatDataset:
    """Load chat rows from a spec: ``builtin:NAME[:SPLIT]``, ``hf:REPO[:SPLIT]`` (a Hugging
    Face dataset with a ``messages`` column) or a path to a chat JSONL file."""
    if spec.startswith("builtin:"):
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
