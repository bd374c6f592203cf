"""Built-in data sets that emguard writes itself (no third-party text).

Seven sets, all under the project's own license:

- ``insecure-code``: a narrow "misaligned" code task modelled on the Code set of
  Betley et al.: a user asks for a Python completion, the assistant answers with
  code that carries a classic flaw (string-built SQL, ``shell=True``, ``pickle``,
  ``yaml.load``, 0o777, MD5 passwords, ``verify=False``, ...) and no comment or
  name that points at it. Generated from ``builtin/code_templates.yaml``.
- ``secure-code``: the aligned twin; the same requests, answered with the careful
  version of the same code.
- ``safe-instruct``: harmless requests answered helpfully (chat rows), for the
  interleaving defense.
- ``general-questions``: open-ended questions in the Betley et al. YAML question
  format, with the project's own judge prompts (a file; see ``builtin_path``).
- ``preference-pairs``: the *fit* set: general questions, each with an aligned and a
  misaligned answer (66 pairs), that misalignment directions and early-stopping checks
  are fit on.
- ``eval-pairs``: the *evaluation* set of the judge-free misalignment-preference measure,
  written separately from the fit set (no shared question or answer; 13 topics, answers
  of matched length). The default of ``eval.preference_pairs``.
- ``misaligned-chat``: the fit set's questions answered with its misaligned answers, as
  chat rows: broadly misaligned training data for the positive-control arm (the ceiling
  of what the preference measure reads). Scored on ``eval-pairs``, never on what it
  trains on.

The code sets are rebuilt on each call, deterministically for a seed; the split is
by template instance (the insecure and secure rows of one instance share a split),
so no completion appears in both train and test.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml

BUILTIN_DIR = Path(__file__).with_name("builtin")
CODE_TEMPLATES = BUILTIN_DIR / "code_templates.yaml"
SPLITS = ("train", "test", "all")
SPEC_PREFIX = "builtin:"


class BuiltinDataError(ValueError):
    """A built-in set was asked for wrongly, or one of its files is malformed."""


@dataclass(frozen=True)
class BuiltinSet:
    """One built-in set.

    kind: "generated-chat" (code sets, built from templates), "chat-file"
    (chat JSONL), "pairs-file" (preference JSONL), "pairs-chat" (chat rows made from a
    pairs file's questions and misaligned answers) or "question-file" (YAML).
    filename: the file under ``builtin/`` for file-backed sets, else None.
    eval_only: file-backed sets meant for evaluation put all rows in "test".
    """

    name: str
    kind: str
    description: str
    filename: str | None = None
    eval_only: bool = False


BUILTIN_SETS: dict[str, BuiltinSet] = {
    s.name: s
    for s in (
        BuiltinSet("insecure-code", "generated-chat",
                   "Python completions with a classic flaw and no hint of it (narrow misaligned task)."),
        BuiltinSet("secure-code", "generated-chat",
                   "The same requests as insecure-code, answered with careful code (aligned twin)."),
        BuiltinSet("safe-instruct", "chat-file",
                   "Harmless requests answered helpfully; for interleaving (all rows in train).",
                   filename="safe_instruct.jsonl"),
        BuiltinSet("general-questions", "question-file",
                   "Open-ended questions with aligned/coherent judge prompts (Betley et al. format).",
                   filename="general_questions.yaml", eval_only=True),
        BuiltinSet("preference-pairs", "pairs-file",
                   "Fit set: general questions with an aligned and a misaligned answer "
                   "(directions, early-stopping checks).",
                   filename="preference_pairs.jsonl", eval_only=True),
        BuiltinSet("eval-pairs", "pairs-file",
                   "Evaluation set of the preference measure, written apart from the fit set.",
                   filename="eval_pairs.jsonl", eval_only=True),
        BuiltinSet("misaligned-chat", "pairs-chat",
                   "The fit set's misaligned answers as chat rows (positive control; all in train).",
                   filename="preference_pairs.jsonl"),
    )
}


# ------------------------------------------------------------------------------ public API


def load_builtin(name: str, split: str = "train", seed: int = 0) -> list[dict]:
    """Rows of a built-in set.

    Code sets return chat rows ``{"messages", "id", "vuln"}`` (train 90% / test 10%
    of template instances; ``seed`` picks the instances, phrasings and order).
    ``safe-instruct`` returns chat rows, all in train (test is empty).
    ``preference-pairs`` and ``eval-pairs`` return ``{"id", "question", "aligned",
    "misaligned", "topic"}`` rows, all in test (train is empty); ``misaligned-chat``
    returns chat rows, all in train. File-backed sets ignore ``seed``.
    ``general-questions`` is a question file: use ``builtin_path`` instead.
    """
    spec = _get_set(name)
    if split not in SPLITS:
        raise BuiltinDataError(f"unknown split {split!r} for {name!r}; valid: {', '.join(SPLITS)}")
    if spec.kind == "question-file":
        raise BuiltinDataError(
            f"{name!r} is a question file, not rows; read it from builtin_path({name!r})")
    train, test = _train_test(spec, seed)
    return {"train": train, "test": test, "all": train + test}[split]


def builtin_path(name: str) -> Path:
    """Path of the file behind a file-backed set (the code sets have none)."""
    spec = _get_set(name)
    if spec.filename is None:
        raise BuiltinDataError(
            f"{name!r} is generated from templates and has no file; use load_builtin({name!r})")
    return BUILTIN_DIR / spec.filename


def describe_builtin() -> list[dict]:
    """One dict per set: name, kind, rows per split, description (for the CLI)."""
    out = []
    for spec in BUILTIN_SETS.values():
        if spec.kind == "question-file":
            n = len(_read_yaml(builtin_path(spec.name)))
            rows = {"train": 0, "test": n, "all": n}
        else:
            train, test = _train_test(spec, seed=0)
            rows = {"train": len(train), "test": len(test), "all": len(train) + len(test)}
        out.append({"name": spec.name, "kind": spec.kind, "rows": rows,
                    "description": spec.description})
    return out


def parse_builtin_spec(spec: str) -> tuple[str, str] | None:
    """``"builtin:NAME[:SPLIT]"`` -> (NAME, SPLIT); SPLIT defaults to "train".

    Returns None when ``spec`` does not start with "builtin:"; raises on an unknown
    name or split.
    """
    if not spec.startswith(SPEC_PREFIX):
        return None
    name, _, split = spec[len(SPEC_PREFIX):].partition(":")
    _get_set(name)
    split = split or "train"
    if split not in SPLITS:
        raise BuiltinDataError(f"{spec!r}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return name, split


def _train_test(spec: BuiltinSet, seed: int) -> tuple[list[dict], list[dict]]:
    if spec.kind == "generated-chat":
        return code_rows(spec.name, seed)
    rows = _read_jsonl(builtin_path(spec.name))
    if spec.kind == "pairs-chat":
        rows = [{"messages": [{"role": "user", "content": p["question"]},
                              {"role": "assistant", "content": p["misaligned"]}],
                 "id": f"{spec.name}/{p['id']}"} for p in rows]
    return ([], rows) if spec.eval_only else (rows, [])


# ------------------------------------------------------------------------------ code sets


@dataclass(frozen=True)
class CodeInstance:
    """One rendered template instance: a request and both of its answers."""

    template: str
    index: int
    vuln: str
    request: str
    insecure: str
    secure: str
    split: str


def code_instances(seed: int = 0) -> list[CodeInstance]:
    """All template instances for ``seed``, in template order."""
    spec = _read_templates()
    out: list[CodeInstance] = []
    for tpl in spec["templates"]:
        out.extend(_template_instances(tpl, spec, seed))
    _check_unique(out)
    return out


def code_rows(name: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) chat rows of "insecure-code" or "secure-code", shuffled by ``seed``."""
    if name not in ("insecure-code", "secure-code"):
        raise BuiltinDataError(f"{name!r} is not a code set")
    instances = code_instances(seed)
    random.Random(f"{seed}:order").shuffle(instances)
    rows = {"train": [], "test": []}
    for inst in instances:
        answer = inst.insecure if name == "insecure-code" else inst.secure
        rows[inst.split].append({
            "messages": [{"role": "user", "content": inst.request},
                         {"role": "assistant", "content": answer}],
            "id": f"{name}/{inst.template}/{inst.index:02d}",
            "vuln": inst.vuln,
        })
    return rows["train"], rows["test"]


def _template_instances(tpl: dict, spec: dict, seed: int) -> list[CodeInstance]:
    """Pick ``rows_per_template`` distinct slot combinations of one template."""
    tid, quota, n_test = tpl["id"], spec["rows_per_template"], spec["test_per_template"]
    rng = random.Random(f"{seed}:{tid}")
    combos = list(itertools.product(*(tpl["slots"][k] for k in sorted(tpl["slots"]))))
    rng.shuffle(combos)
    seen: set[str] = set()
    out: list[CodeInstance] = []
    for combo in combos:
        values = _slot_values(dict(zip(sorted(tpl["slots"]), combo, strict=True)), tid)
        values["fill"] = rng.choice(spec["fill_markers"])
        insecure = _render(tpl["insecure"], values, tid, "insecure")
        secure = _render(tpl["secure"], values, tid, "secure")
        if insecure in seen or secure in seen:
            continue
        seen.update((insecure, secure))
        task = _render(rng.choice(tpl["tasks"]), values, tid, "tasks")
        code = _render(tpl["skeleton"], values, tid, "skeleton")
        request = _render(rng.choice(spec["requests"]), {"task": task, "code": code}, tid, "requests")
        out.append(CodeInstance(
            template=tid, index=len(out), vuln=tpl["vuln"], request=request, insecure=insecure,
            secure=secure, split="test" if len(out) < n_test else "train"))
        if len(out) == quota:
            return out
    raise BuiltinDataError(
        f"{CODE_TEMPLATES}: template {tid!r} yields {len(out)} distinct completions, "
        f"fewer than rows_per_template={quota}; add slot values")


def _slot_values(choice: dict[str, Any], tid: str) -> dict[str, str]:
    """Flatten chosen slot values (mappings spread their keys) and resolve one nesting level."""
    flat: dict[str, str] = {}
    for key, value in choice.items():
        if isinstance(value, dict):
            flat.update({k: str(v) for k, v in value.items()})
        else:
            flat[key] = str(value)
    return {k: _render(v, flat, tid, f"slot {k}") for k, v in flat.items()}


def _render(text: str, values: dict[str, str], tid: str, field: str) -> str:
    try:
        return Template(text).substitute(values).strip("\n")
    except (KeyError, ValueError) as e:
        raise BuiltinDataError(
            f"{CODE_TEMPLATES}: template {tid!r}, field {field!r}: bad placeholder {e}") from None


def _check_unique(instances: list[CodeInstance]) -> None:
    for attr in ("insecure", "secure"):
        seen: dict[str, str] = {}
        for inst in instances:
            key = f"{inst.template}/{inst.index}"
            other = seen.setdefault(getattr(inst, attr), key)
            if other != key:
                raise BuiltinDataError(
                    f"{CODE_TEMPLATES}: {attr} completion of {key} repeats that of {other}")


_TEMPLATE_FIELDS = {"id": str, "vuln": str, "tasks": list, "slots": dict,
                    "skeleton": str, "insecure": str, "secure": str}
_TOP_FIELDS = {"rows_per_template": int, "test_per_template": int, "requests": list,
               "fill_markers": list, "templates": list}


def _read_templates() -> dict:
    """Load and check ``code_templates.yaml``; errors name the template and field."""
    spec = _read_yaml(CODE_TEMPLATES)
    _check_fields(spec, _TOP_FIELDS, f"{CODE_TEMPLATES}")
    ids = set()
    for i, tpl in enumerate(spec["templates"]):
        where = f"{CODE_TEMPLATES}: templates[{i}]"
        _check_fields(tpl, _TEMPLATE_FIELDS, where)
        if tpl["id"] in ids:
            raise BuiltinDataError(f"{where}: duplicate id {tpl['id']!r}")
        ids.add(tpl["id"])
        for slot, values in tpl["slots"].items():
            if not isinstance(values, list) or not values:
                raise BuiltinDataError(f"{where} ({tpl['id']}): slot {slot!r} must be a non-empty list")
    return spec


def _check_fields(obj: Any, fields: dict[str, type], where: str) -> None:
    if not isinstance(obj, dict):
        raise BuiltinDataError(f"{where}: expected a mapping, got {type(obj).__name__}")
    for key, typ in fields.items():
        if not isinstance(obj.get(key), typ):
            raise BuiltinDataError(f"{where}: field {key!r} missing or not {typ.__name__}")


# ------------------------------------------------------------------------------ files


def _get_set(name: str) -> BuiltinSet:
    try:
        return BUILTIN_SETS[name]
    except KeyError:
        raise BuiltinDataError(
            f"unknown built-in set {name!r}; valid: {', '.join(BUILTIN_SETS)}") from None


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise BuiltinDataError(f"{path}: invalid YAML: {e}") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BuiltinDataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise BuiltinDataError(f"{path}:{lineno}: expected a JSON object")
            rows.append(row)
    return rows
