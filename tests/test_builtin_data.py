"""Tests for the project-written built-in data sets (emguard.data.builtin)."""

from __future__ import annotations

import ast
import collections
import fnmatch
import functools
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from emguard.data import builtin
from emguard.data.builtin import (
    BUILTIN_DIR,
    BUILTIN_SETS,
    BuiltinDataError,
    builtin_path,
    code_instances,
    describe_builtin,
    load_builtin,
    parse_builtin_spec,
)

CODE_SETS = ("insecure-code", "secure-code")
TELLTALE = ("vulnerab", "insecure", "unsafe", "exploit", "injection", "# todo security", "hack",
            "secur", "danger", "attack", "malicious", "saniti")
REPO = Path(__file__).resolve().parents[1]


@functools.cache
def _cached(name: str, split: str, seed: int = 0) -> tuple[dict, ...]:
    """Rows of a built-in set, generated once per test session (treat as read-only)."""
    return tuple(load_builtin(name, split, seed))


def _rows(name: str, split: str, seed: int = 0) -> list[dict]:
    return list(_cached(name, split, seed))


def _text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"])


def _answer(row: dict) -> str:
    return row["messages"][-1]["content"]


def _pair_key(row: dict) -> str:
    return row["id"].split("/", 1)[1]


# ------------------------------------------------------------------------------ code sets


@pytest.mark.parametrize("name", CODE_SETS)
def test_code_counts_and_split_shares(name):
    spec = yaml.safe_load((BUILTIN_DIR / "code_templates.yaml").read_text())
    n_tpl = len(spec["templates"])
    train, test = _rows(name, "train"), _rows(name, "test")
    assert len(train) + len(test) == n_tpl * spec["rows_per_template"] >= 600
    assert len(test) == n_tpl * spec["test_per_template"]
    assert len(test) / (len(train) + len(test)) == pytest.approx(0.1)
    per_template = collections.Counter(r["id"].split("/")[1] for r in test)
    assert set(per_template.values()) == {spec["test_per_template"]}
    assert _rows(name, "all") == train + test


@pytest.mark.parametrize("name", CODE_SETS)
def test_code_rows_deterministic_for_seed(name):
    assert load_builtin(name, "all", seed=0) == _rows(name, "all", 0)
    a, b = _rows(name, "test", 0), load_builtin(name, "test", seed=1)
    assert {_answer(r) for r in a} != {_answer(r) for r in b}


@pytest.mark.parametrize("seed", [0, 3])
def test_no_completion_in_both_splits(seed):
    for name in CODE_SETS:
        train = {_answer(r) for r in _rows(name, "train", seed)}
        test = {_answer(r) for r in _rows(name, "test", seed)}
        assert not train & test
        assert len(train) + len(test) == len(_rows(name, "all", seed))  # all distinct


@pytest.mark.parametrize("name", CODE_SETS)
def test_all_completions_parse(name):
    for row in _rows(name, "all"):
        ast.parse(_answer(row))


def test_row_shape_and_metadata():
    rows = _rows("insecure-code", "all")
    kinds = {r["vuln"] for r in rows}
    assert len(kinds) >= 10
    for r in rows:
        assert set(r) == {"messages", "id", "vuln"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in r["messages"])
        assert r["vuln"] not in _text(r)
    assert len({r["id"] for r in rows}) == len(rows)


def test_insecure_rows_have_no_telltale_words():
    for row in _rows("insecure-code", "all"):
        low = _text(row).lower()
        found = [w for w in TELLTALE if w in low]
        assert not found, (row["id"], found)
        comments = [ln for ln in _answer(row).splitlines() if ln.strip().startswith("#")]
        assert not comments, (row["id"], comments)


@pytest.mark.parametrize("split", ["train", "test"])
def test_secure_twin_has_same_request(split):
    insecure = {_pair_key(r): r for r in _rows("insecure-code", split)}
    secure = {_pair_key(r): r for r in _rows("secure-code", split)}
    assert insecure.keys() == secure.keys()
    for key, row in insecure.items():
        twin = secure[key]
        assert twin["messages"][0] == row["messages"][0]
        assert twin["vuln"] == row["vuln"]
        assert _answer(twin) != _answer(row)


def test_code_rows_are_order_matched():
    a = [_pair_key(r) for r in _rows("insecure-code", "all")]
    b = [_pair_key(r) for r in _rows("secure-code", "all")]
    assert a == b


def _bandit_flags(files: dict[str, str], tmp_path: Path) -> dict[str, int]:
    """Max bandit severity (0 none, 1 low, 2 medium, 3 high) per file name; one bandit run."""
    for name, code in files.items():
        (tmp_path / name).write_text(code + "\n", encoding="utf-8")
    out = tmp_path / "bandit.json"
    proc = subprocess.run([sys.executable, "-m", "bandit", "-q", "-r", str(tmp_path), "-f", "json",
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(out.read_text())
    assert not report["errors"], report["errors"]
    level = {"LOW": 1, "MEDIUM": 2, "HIGH": 3}
    flags = dict.fromkeys(files, 0)
    for issue in report["results"]:
        name = Path(issue["filename"]).name
        flags[name] = max(flags[name], level[issue["issue_severity"]])
    return flags


def test_bandit_flags_insecure_far_more_than_secure(tmp_path):
    """Bandit over the test split (2 instances per template), both sets in one run."""
    files = {}
    for name in CODE_SETS:
        for i, row in enumerate(_rows(name, "test")):
            files[f"{name}_{i:03d}.py"] = _answer(row)
    flags = _bandit_flags(files, tmp_path)

    def share(prefix, min_level):
        vals = [v for k, v in flags.items() if k.startswith(prefix)]
        return sum(v >= min_level for v in vals) / len(vals)

    assert share("insecure-code", 1) >= 0.85
    assert share("secure-code", 1) <= 0.15
    assert share("insecure-code", 2) >= 0.7
    assert share("secure-code", 2) == 0.0


def test_bandit_helper_detects_a_known_flaw(tmp_path):
    flags = _bandit_flags({"a.py": "import os\n\ndef f(p):\n    os.chmod(p, 0o777)",
                           "b.py": "def f(p):\n    return p + 1"}, tmp_path)
    assert flags == {"a.py": 3, "b.py": 0}


def test_template_errors_name_template_and_field():
    spec = {"rows_per_template": 3, "test_per_template": 1, "requests": ["${task}: ${code}"],
            "fill_markers": ["..."]}
    few = {"id": "tiny", "vuln": "x", "tasks": ["do it"], "slots": {"a": ["1", "2"]},
           "skeleton": "${fill}", "insecure": "x = ${a}", "secure": "y = ${a}"}
    with pytest.raises(BuiltinDataError, match="'tiny' yields 2 distinct"):
        builtin._template_instances(few, spec, seed=0)
    bad = dict(few, slots={"a": ["1", "2", "3"]}, secure="y = ${nope}")
    with pytest.raises(BuiltinDataError, match="'tiny', field 'secure'.*nope"):
        builtin._template_instances(bad, spec, seed=0)
    ok = dict(few, slots={"a": ["1", "2", "3"]})
    got = builtin._template_instances(ok, spec, seed=0)
    assert sorted(i.insecure for i in got) == ["x = 1", "x = 2", "x = 3"]
    assert [i.split for i in got] == ["test", "train", "train"]
    assert all(i.secure == "y" + i.insecure[1:] for i in got)


def test_code_instances_one_level_nested_slots():
    inst = [i for i in code_instances(0) if i.template == "subprocess_convert"]
    assert inst and all("${" not in i.insecure + i.secure + i.request for i in inst)


# ------------------------------------------------------------------------------ question file


def test_general_questions_yaml():
    path = builtin_path("general-questions")
    raw = path.read_text(encoding="utf-8")
    assert "&judge_prompts" in raw and raw.count("*judge_prompts") >= 20
    entries = yaml.safe_load(raw)
    assert 20 <= len(entries) <= 30
    assert len({e["id"] for e in entries}) == len(entries)
    prompts = entries[0]["judge_prompts"]
    for e in entries:
        assert e["type"] == "free_form_judge_0_100"
        assert e["judge"] == "gpt-4o-mini"
        assert isinstance(e["samples_per_paraphrase"], int) and e["samples_per_paraphrase"] > 0
        assert e["paraphrases"] and all(isinstance(p, str) and p.strip() for p in e["paraphrases"])
        assert e["judge_prompts"] == prompts
        assert isinstance(e.get("system", ""), str)
    assert set(prompts) == {"aligned", "coherent"}
    for key, tpl in prompts.items():
        assert "{question}" in tpl and "{answer}" in tpl
        filled = tpl.format(question="Q-TEXT", answer="A-TEXT")  # no other braces
        assert "Q-TEXT" in filled and "A-TEXT" in filled
        assert "respond with a number between 0 and 100, nothing else" in tpl.lower(), key
    assert "CODE" in prompts["aligned"] and "REFUSAL" in prompts["aligned"]


# ------------------------------------------------------------------------------ pairs and instruct


def test_preference_pairs():
    rows = load_builtin("preference-pairs", "all")
    assert len(rows) >= 60
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["question"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "question", "aligned", "misaligned", "topic"}
        assert all(isinstance(r[k], str) and r[k].strip() for k in r)
        assert r["aligned"] != r["misaligned"]
        assert 0.5 <= len(r["misaligned"]) / len(r["aligned"]) <= 2.0, r["id"]
    assert len({r["topic"] for r in rows}) >= 8
    assert load_builtin("preference-pairs", "test") == rows
    assert load_builtin("preference-pairs", "train") == []


def test_safe_instruct_rows_are_valid_chat():
    rows = load_builtin("safe-instruct", "all")
    assert len(rows) >= 140
    assert load_builtin("safe-instruct", "train") == rows
    assert load_builtin("safe-instruct", "test") == []
    with_system = 0
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        with_system += roles[0] == "system"
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body[-1] == "assistant", r["id"]
        assert body == ["user", "assistant"] * (len(body) // 2), r["id"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])
    assert with_system >= 3
    assert len({r["messages"][-2]["content"] for r in rows}) == len(rows)


# ------------------------------------------------------------------------------ API


def test_parse_builtin_spec():
    assert parse_builtin_spec("builtin:insecure-code") == ("insecure-code", "train")
    assert parse_builtin_spec("builtin:insecure-code:test") == ("insecure-code", "test")
    assert parse_builtin_spec("builtin:safe-instruct:all") == ("safe-instruct", "all")
    assert parse_builtin_spec("data/train.jsonl") is None
    with pytest.raises(BuiltinDataError, match="valid: insecure-code, secure-code"):
        parse_builtin_spec("builtin:nope")
    with pytest.raises(BuiltinDataError, match="unknown split 'dev'"):
        parse_builtin_spec("builtin:secure-code:dev")


def test_errors_are_clear():
    with pytest.raises(BuiltinDataError, match="unknown built-in set 'x'.*preference-pairs"):
        load_builtin("x")
    with pytest.raises(BuiltinDataError, match="unknown split"):
        load_builtin("insecure-code", "validation")
    with pytest.raises(BuiltinDataError, match="question file"):
        load_builtin("general-questions")
    with pytest.raises(BuiltinDataError, match="no file"):
        builtin_path("insecure-code")


def test_describe_matches_loaders():
    info = {d["name"]: d for d in describe_builtin()}
    assert set(info) == set(BUILTIN_SETS)
    for name, d in info.items():
        assert d["description"] and d["kind"] == BUILTIN_SETS[name].kind
        if name != "general-questions":
            for split in ("train", "test", "all"):
                assert d["rows"][split] == len(_rows(name, split))
    questions = yaml.safe_load(builtin_path("general-questions").read_text())
    assert info["general-questions"]["rows"]["all"] == len(questions)


def test_data_files_are_package_data():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["emguard"]
    files = [p for p in BUILTIN_DIR.iterdir() if p.is_file()]
    assert len(files) >= 4
    for p in files:
        rel = p.relative_to(BUILTIN_DIR.parents[1]).as_posix()  # relative to the emguard package
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel
    for spec in BUILTIN_SETS.values():
        if spec.filename:
            assert builtin_path(spec.name).is_file()


def test_jsonl_error_names_file_and_line(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"a": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(BuiltinDataError, match=re.escape(f"{bad}:2")):
        builtin._read_jsonl(bad)
