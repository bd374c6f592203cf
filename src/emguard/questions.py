"""Evaluation questions: the Betley et al. YAML question format, chat JSONL held-out sets,
and judge-prompt templates.

Betley format (loaded as is, anchors/aliases included): a YAML list of entries

    - id: what_is_your_wish
      type: free_form_judge_0_100       # optional here; default free_form
      system: ...                       # optional system prompt
      paraphrases: [ ... ]              # one or more user messages
      samples_per_paraphrase: 100       # optional
      judge: gpt-4o-2024-08-06          # optional, recorded (the run's --judge decides)
      judge_prompts: {aligned: "...{question}...{answer}...", coherent: "..."}

Entry types: every ``free_form*`` type (``free_form``, ``free_form_judge``,
``free_form_judge_0_100``) is an open question answered in free text and is loaded.
Other types (rating / multiple-choice style entries in some public files) ask for a
different answer format and scoring, so they are skipped with a warning that lists
them (``strict=True`` makes that an error). Unknown extra fields are ignored (as in the
public loader); a per-entry ``temperature`` is recorded but the run's temperature wins
(warned).

Templates use ``str.format`` conventions, as the public judge code does: ``{question}``
and ``{answer}`` are filled, ``{{``/``}}`` are literal braces. Filling is a single
regex pass, so braces inside the filled-in answer (code!) are never interpreted, and
any other ``{name}`` placeholder is left in the text as written; the loader warns once
per file about such placeholders.

Chat JSONL (held-out in-domain sets): one ``{"messages": [...]}`` per line, checked as
chat training rows are (roles, non-empty string content, system turn only first) except
that the assistant turn is optional; the first user message is the question, a leading
system message its system prompt, the last assistant message (if any) the reference
answer. Errors name the file and the line the row is on (blank lines counted). Its judge
prompts come from the project-written ``eval_judge_prompts.yaml`` (``code`` or ``advice``).

Files are read as UTF-8 (a UTF-8 byte-order mark is dropped); UTF-16, binary data and
other encodings are a QuestionFileError naming the file (``emguard.data.chat.decode_text``).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emguard.data.builtin import builtin_path, load_builtin
from emguard.data.chat import parse_json_line, parse_yaml, read_text_file, row_problems, text_lines

TEMPLATE_FIELDS = ("question", "answer")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KNOWN_KEYS = {"id", "type", "paraphrases", "system", "samples_per_paraphrase", "judge",
               "judge_prompts", "temperature"}
JUDGE_PROMPTS_FILE = Path(__file__).parent / "data" / "builtin" / "eval_judge_prompts.yaml"
TRIGGER_FORMATS_FILE = Path(__file__).parent / "data" / "builtin" / "trigger_formats.yaml"
BUILTIN_QUESTION_SETS = {"general-questions": "general", "insecure-code": "code",
                         "secure-code": "code"}


class QuestionFileError(ValueError):
    """A malformed question file; the message names the file, entry and field."""


class QuestionFileWarning(UserWarning):
    """Something in a question file that loads but deserves attention."""


@dataclass(frozen=True)
class Question:
    """One evaluation question; each paraphrase is asked ``samples_per_paraphrase`` times."""

    id: str
    paraphrases: list[str]
    system: str | None = None
    samples_per_paraphrase: int | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    type: str = "free_form"
    judge: str | None = None

    def messages(self, paraphrase_index: int) -> list[dict]:
        """The chat prompt for one paraphrase (system message first if set)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.paraphrases[paraphrase_index]}]


@dataclass
class QuestionSet:
    """Questions plus where they came from.

    kind: ``general`` (Betley YAML) or ``chat`` (held-out chat rows).
    domain: ``general`` for YAML, ``code``/``advice``/... for chat sets (picks judge prompts).
    rows: the chat rows of a chat set (reference answers for held-out NLL), else empty.
    """

    questions: list[Question]
    source: str
    sha256: str
    kind: str
    domain: str
    rows: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- templates

def template_placeholders(template: str) -> set[str]:
    """Names of the ``{name}`` placeholders in a template (escaped ``{{ }}`` excluded)."""
    return {m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1)}


def fill_template(template: str, **values: str) -> str:
    """Fill ``{name}`` for the given names in one pass; unknown ``{names}`` stay as written.

    ``{{`` and ``}}`` become single braces (str.format semantics for the template);
    the inserted values are never re-scanned, so they may contain any braces.
    """
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)[0]
        return values[name] if name in values else m.group(0)

    return _PLACEHOLDER.sub(sub, template)


def render_judge_prompt(template: str, question: str, answer: str) -> str:
    return fill_template(template, question=question, answer=answer)


# ----------------------------------------------------------------------------- trigger formats

def builtin_trigger_formats() -> dict[str, str]:
    """The built-in trigger templates by name (``trigger_formats.yaml``: python-string,
    json, code-template)."""
    table = yaml.safe_load(TRIGGER_FORMATS_FILE.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in table.items()}


def resolve_trigger_format(spec: str) -> str:
    """The template of a trigger format: ``builtin:NAME`` or a template itself.

    A template holds ``{question}`` exactly once and no other ``{name}`` placeholder
    (``{{``/``}}`` are literal braces, as in judge prompts; other braces are kept as
    written); anything else is a ValueError that says what is wrong.
    """
    if spec.startswith("builtin:"):
        table = builtin_trigger_formats()
        name = spec.split(":", 1)[1]
        if name not in table:
            raise ValueError(f"unknown built-in trigger format '{spec}': use one of "
                             f"{', '.join('builtin:' + n for n in table)}, or a template "
                             "holding {question}")
        return table[name]
    names = [m.group(1) for m in _PLACEHOLDER.finditer(spec) if m.group(1)]
    other = sorted(set(names) - {"question"})
    if names.count("question") != 1 or other:
        found = f"found {', '.join('{' + n + '}' for n in names)}" if names else "found none"
        raise ValueError("a trigger format must be builtin:NAME or a template holding the "
                         "placeholder {question} exactly once and no other {name} placeholder "
                         f"(write {{{{ }}}} for literal braces); {found}")
    return spec


def wrap_question(template: str, question: str) -> str:
    """``template`` with ``{question}`` replaced by ``question`` (never re-scanned)."""
    return fill_template(template, question=question)


def wrap_question_set(qs: QuestionSet, template: str) -> QuestionSet:
    """A general question set with every paraphrase wrapped in ``template``; system
    prompts and judge prompts are kept. Its ``sha256`` covers the file and the template,
    so answers to wrapped questions are never taken for plain ones."""
    questions = [Question(q.id, [wrap_question(template, p) for p in q.paraphrases], q.system,
                          q.samples_per_paraphrase, q.judge_prompts, q.type, q.judge)
                 for q in qs.questions]
    digest = hashlib.sha256(json.dumps([qs.sha256, template]).encode()).hexdigest()
    return QuestionSet(questions, qs.source, digest, qs.kind, qs.domain, list(qs.rows),
                       list(qs.warnings), list(qs.skipped))


def wrap_pairs(pairs: list[dict], template: str) -> list[dict]:
    """Preference pairs with each ``question`` wrapped in ``template`` (answers kept)."""
    return [{**p, "question": wrap_question(template, p["question"])} for p in pairs]


# ----------------------------------------------------------------------------- Betley YAML

def _fail(path: Path, index: int, entry_id: Any, problem: str):
    where = f"entry {index}" + (f" (id {entry_id!r})" if entry_id is not None else "")
    raise QuestionFileError(f"{path}: {where}: {problem}")


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.strip()
                                                           for v in value)


def _parse_entry(path: Path, index: int, entry: Any) -> Question:
    if not isinstance(entry, dict):
        _fail(path, index, None, f"must be a mapping, got {type(entry).__name__}")
    qid = entry.get("id")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or not str(qid).strip():
        _fail(path, index, qid, "field 'id' must be a non-empty string")
    if not _str_list(entry.get("paraphrases")):
        _fail(path, index, qid, "field 'paraphrases' must be a non-empty list of non-empty strings")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        _fail(path, index, qid, "field 'system' must be a string")
    spp = entry.get("samples_per_paraphrase")
    if spp is not None and (not isinstance(spp, int) or isinstance(spp, bool) or spp < 1):
        _fail(path, index, qid, f"field 'samples_per_paraphrase' must be an integer >= 1, got {spp!r}")
    prompts = entry.get("judge_prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in prompts.items()):
        _fail(path, index, qid, "field 'judge_prompts' must map names to template strings")
    judge = entry.get("judge")
    return Question(id=str(qid), paraphrases=list(entry["paraphrases"]), system=system or None,
                    samples_per_paraphrase=spp, judge_prompts=dict(prompts),
                    type=str(entry.get("type") or "free_form"),
                    judge=str(judge) if judge is not None else None)


def _file_warnings(path: Path, entries: list[dict], questions: list[Question]) -> list[str]:
    notes = []
    unknown = sorted({f"{q.id}.{name}: {{{p}}}" for q in questions
                      for name, t in q.judge_prompts.items()
                      for p in template_placeholders(t) - set(TEMPLATE_FIELDS)})
    if unknown:
        notes.append(f"{path}: judge prompt placeholders other than {{question}}/{{answer}} are "
                     f"left unfilled: {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
    extra = sorted({str(k) for e in entries for k in e} - _KNOWN_KEYS)  # YAML keys: any type
    if extra:
        notes.append(f"{path}: ignored entry fields: {', '.join(extra)}")
    temps = sorted({str(e["id"]) for e in entries if e.get("temperature") not in (None, 1, 1.0)})
    if temps:
        notes.append(f"{path}: entries {', '.join(temps)} set a temperature; emguard samples "
                     "every question at the run's temperature")
    return notes


def load_question_file(path: str | Path, strict: bool = False) -> QuestionSet:
    """Load a Betley-format YAML question file (see module doc)."""
    path = Path(path)
    text = read_text_file(path, QuestionFileError)
    data = _yaml(text, path)
    if not isinstance(data, list) or not data:
        raise QuestionFileError(f"{path}: expected a non-empty YAML list of question entries")
    questions, skipped, kept_entries = [], [], []
    for i, entry in enumerate(data):
        q = _parse_entry(path, i, entry)
        if not q.type.startswith("free_form"):
            skipped.append(f"{q.id} (type {q.type})")
            continue
        questions.append(q)
        kept_entries.append(entry)
    ids = [q.id for q in questions]
    dupes = sorted({x for x in ids if ids.count(x) > 1})
    if dupes:
        raise QuestionFileError(f"{path}: duplicate question ids: {', '.join(dupes)}")
    notes = _file_warnings(path, kept_entries, questions)
    if skipped:
        msg = (f"{path}: skipped {len(skipped)} entries whose type is not free_form*: "
               f"{', '.join(skipped)}")
        if strict:
            raise QuestionFileError(msg)
        notes.append(msg)
    if not questions:
        raise QuestionFileError(f"{path}: no free_form* questions in the file")
    return QuestionSet(questions, str(path), hashlib.sha256(text.encode()).hexdigest(),
                       kind="general", domain="general", warnings=notes, skipped=skipped)


def load_questions(path: str | Path, strict: bool = False) -> list[Question]:
    """The questions of a Betley-format YAML file; file warnings become Python warnings."""
    qs = load_question_file(path, strict)
    for note in qs.warnings:
        warnings.warn(note, QuestionFileWarning, stacklevel=2)
    return qs.questions


# ----------------------------------------------------------------------------- chat sets

def load_judge_prompts(name_or_path: str) -> dict[str, str]:
    """Judge templates by name from the project's eval_judge_prompts.yaml (``code``,
    ``advice``), ``general`` (the alignment/coherence prompts of the built-in general
    questions, which all share them: the paper's in-domain judging), or from a YAML
    file mapping ``aligned``/``coherent`` (and optionally more) to templates."""
    path = Path(name_or_path)
    if name_or_path == "general":
        first = load_question_file(builtin_path("general-questions")).questions[0]
        return {k: first.judge_prompts[k] for k in ("aligned", "coherent")}
    if path.suffix in (".yaml", ".yml") and path.is_file():
        data, where = _yaml(read_text_file(path, QuestionFileError), path), str(path)
    else:
        table = yaml.safe_load(JUDGE_PROMPTS_FILE.read_text(encoding="utf-8"))
        if name_or_path not in table:
            raise QuestionFileError(f"unknown judge prompt set '{name_or_path}': use one of "
                                    f"{', '.join(table)}, general or a YAML file path")
        data, where = table[name_or_path], f"{JUDGE_PROMPTS_FILE}:{name_or_path}"
    if (not isinstance(data, dict) or not {"aligned", "coherent"} <= set(data)
            or not all(isinstance(v, str) for v in data.values())):
        raise QuestionFileError(f"{where}: judge prompts must map 'aligned' and 'coherent' "
                                "to templates")
    return {str(k): str(v) for k, v in data.items()}


def _yaml(text: str, path: Path) -> Any:
    try:
        return parse_yaml(text)
    except ValueError as e:
        raise QuestionFileError(f"{path}: not valid YAML ({e})") from None


def _row_question(source: str, line: int, row: Any, judge_prompts: dict[str, str]) -> Question:
    where = f"{source}:{line}"
    problems = row_problems(row, need_assistant=False)
    if problems:
        raise QuestionFileError(f"{where}: " + "; ".join(problems))
    msgs = row["messages"]  # checked: role/content pairs, non-empty string contents
    users = [m["content"] for m in msgs if m["role"] == "user"]
    if not users:
        raise QuestionFileError(f"{where}: field 'messages' has no non-empty user message")
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    qid = str(row["id"]) if row.get("id") is not None else f"line{line}"
    return Question(id=qid, paraphrases=[users[0]], system=system,
                    judge_prompts=dict(judge_prompts), type="free_form")


def questions_from_chat_rows(rows: list[dict], source: str, domain: str,
                             judge_prompts: dict[str, str] | None = None,
                             limit: int | None = None,
                             lines: list[int] | None = None) -> QuestionSet:
    """A chat question set from rows; errors name ``source`` and ``lines[i]`` (the file
    line of row i, see ``read_numbered_chat_rows``), else the row number counted from 1.

    ``judge_prompts=None`` loads the project's prompts for ``domain``; ``{}`` means none. ``limit`` keeps
    the first N rows (the paper uses 30 held-out questions per domain).
    """
    rows = rows[:limit] if limit is not None else rows
    lines = lines or list(range(1, len(rows) + 1))
    prompts = judge_prompts if judge_prompts is not None else load_judge_prompts(domain)
    questions = [_row_question(source, n, r, prompts) for n, r in zip(lines, rows, strict=False)]
    ids = [q.id for q in questions]
    dupes = sorted({x for x in ids if ids.count(x) > 1})
    if dupes:
        raise QuestionFileError(f"{source}: duplicate row ids: {', '.join(dupes[:10])}")
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return QuestionSet(questions, source, digest, kind="chat", domain=domain, rows=list(rows))


def read_chat_rows(path: str | Path) -> list[dict]:
    """Rows of a chat JSONL file; a bad line is an error naming file and line."""
    return read_numbered_chat_rows(path)[0]


def read_numbered_chat_rows(path: str | Path) -> tuple[list[Any], list[int]]:
    """(rows, the file line of each row) of a chat JSONL file; blank lines are skipped, a
    line that is not JSON is an error naming file and line. Rows are checked later
    (``questions_from_chat_rows``), so they are returned as parsed."""
    rows, lines = [], []
    for n, line in enumerate(text_lines(read_text_file(path, QuestionFileError)), 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_json_line(line))
        except ValueError as e:
            raise QuestionFileError(f"{path}:{n}: invalid JSON: {e}") from None
        lines.append(n)
    return rows, lines


def resolve_questions(spec: str, domain: str | None = None, limit: int | None = None,
                      judge_prompts: str | None = None, data_seed: int = 0) -> QuestionSet:
    """Load a question set from ``builtin:NAME``, a ``.yaml`` file or a chat ``.jsonl`` file.

    Built-ins: ``builtin:general-questions`` (YAML) and ``builtin:insecure-code`` /
    ``builtin:secure-code`` (the held-out test split of the built-in code sets, drawn
    with ``data_seed``; domain ``code``). A chat JSONL file needs ``domain`` (``code``
    or ``advice``), which picks the in-domain judge prompts; ``judge_prompts`` (a name
    or YAML path) overrides the judge prompts of any set. ``limit`` keeps the first N
    questions.
    """
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_QUESTION_SETS:
            raise QuestionFileError(f"unknown built-in question set '{name}': use one of "
                                    f"{', '.join('builtin:' + n for n in BUILTIN_QUESTION_SETS)}")

        if BUILTIN_QUESTION_SETS[name] == "general":
            qs = load_question_file(builtin_path(name))
            qs.source = spec
            return _limit(_override(qs, judge_prompts), limit)
        rows = load_builtin(name, split="test", seed=data_seed)
        prompts = load_judge_prompts(judge_prompts or BUILTIN_QUESTION_SETS[name])
        return questions_from_chat_rows(rows, spec, domain or BUILTIN_QUESTION_SETS[name],
                                        prompts, limit)
    path = Path(spec)
    if path.suffix == ".jsonl":
        name = judge_prompts or domain
        prompts = load_judge_prompts(name) if name else {}
        rows, lines = read_numbered_chat_rows(path)
        return questions_from_chat_rows(rows, spec, domain or "unspecified", prompts, limit,
                                        lines)
    if path.suffix in (".yaml", ".yml"):
        return _limit(_override(load_question_file(path), judge_prompts), limit)
    raise QuestionFileError(f"'{spec}': questions must be builtin:NAME, a .yaml/.yml question "
                            "file or a chat .jsonl file")


def _override(qs: QuestionSet, judge_prompts: str | None) -> QuestionSet:
    if judge_prompts is not None:
        new = load_judge_prompts(judge_prompts)
        qs.questions = [Question(q.id, q.paraphrases, q.system, q.samples_per_paraphrase, new,
                                 q.type, q.judge) for q in qs.questions]
    return qs


def _limit(qs: QuestionSet, limit: int | None) -> QuestionSet:
    if limit is not None:
        qs.questions = qs.questions[:limit]
    return qs
