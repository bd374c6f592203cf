"""Property tests of every user-facing loader (chat JSONL, question files, run configs and
overrides, OpSwap answer extraction).

For any input a loader gives a valid result, a counted skip (``skip_invalid``) or its
module's own error naming the file (or the override), never an exception from inside a
library and never a silently wrong result. Each load is checked against an independent
oracle written here from the documented rules. Files live in a ``tempfile`` directory:
hypothesis does not mix with function-scoped fixtures such as ``tmp_path``.
"""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

from emguard.benign import MINUS_LIKE, extract_final_answer  # noqa: E402
from emguard.config import ConfigError, RunConfig, dump_run_config, load_run_config  # noqa: E402
from emguard.data.chat import (  # noqa: E402
    PROVENANCE_KEYS,
    ROLES,
    ChatDataError,
    read_chat_jsonl,
    row_location,
)
from emguard.data.opswap import draw_expression, format_value, make_row  # noqa: E402
from emguard.questions import QuestionFileError, load_question_file, resolve_questions  # noqa: E402

# No example database and no .hypothesis/ folder in the working tree (it is not ignored).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "emguard-hypothesis")
QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=QUIET)
FEW = settings(max_examples=15, deadline=None, database=None, suppress_health_check=QUIET)
SIMPLE = settings(max_examples=200, deadline=None, database=None)


@contextmanager
def user_file(name: str, data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        yield path


def file_lines(data: bytes) -> list[str]:
    """The oracle's view of a UTF-8 file: BOM dropped, split at \\n, \\r\\n, \\r."""
    return re.split(r"\r\n|\r|\n", data.decode("utf-8-sig"))


def without_provenance(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in PROVENANCE_KEYS}


def same_json(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe


# ----------------------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
roles = st.sampled_from(ROLES) | st.sampled_from(["robot", "User", "", "tool"]) | json_values
contents = (st.text(max_size=30) | st.sampled_from(["", "  ", "\n"]) | json_values)
messages = st.fixed_dictionaries({"role": roles, "content": contents},
                                 optional={"name": st.text(max_size=5)})
chat_like = st.fixed_dictionaries(
    {"messages": st.lists(messages | json_values, max_size=4) | json_values},
    optional={"id": st.text(max_size=5) | st.integers(), "answer": json_values,
              "_line": json_values})
good_messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant"]),
    "content": st.text(min_size=1, max_size=30).filter(str.strip)}), min_size=1, max_size=4)
good_rows = st.builds(
    lambda system, msgs, extra: {
        **extra, "messages": ([{"role": "system", "content": system}] if system else []) + msgs
        + [{"role": "assistant", "content": "a"}]},
    st.none() | st.text(min_size=1, max_size=10).filter(str.strip), good_messages,
    st.dictionaries(st.text(max_size=5).filter(lambda k: k != "messages"), json_values, max_size=2))


def _break(row: dict, how: str, i: int, value) -> dict:
    """A good row with one thing wrong (the oracle decides whether it still is valid)."""
    msgs = [dict(m) for m in row["messages"]]
    m = msgs[i % len(msgs)]
    if how == "role":
        m["role"] = value
    elif how == "content":
        m["content"] = value
    elif how == "late system":
        msgs.append({"role": "system", "content": "s"})
    elif how == "no assistant":
        msgs = [m for m in msgs if m["role"] != "assistant"]
    elif how == "not a message":
        msgs[i % len(msgs)] = value
    return {**row, "messages": msgs}


near_rows = st.builds(_break, good_rows, st.sampled_from(["role", "content", "late system",
                                                          "no assistant", "not a message"]),
                      st.integers(0, 5), roles | contents)


class Raw(str):
    """A line written as it is, not as a JSON value."""


raw_lines = st.sampled_from(["", "  ", "{oops", "1" * 5000, "[" * 50_000, '{"messages": NaN}',
                             "\x1c"]).map(Raw)
lines_of_values = st.lists(st.one_of(good_rows, good_rows, near_rows, near_rows, chat_like,
                                     json_values, raw_lines), max_size=8)


def encode_lines(values, ensure_ascii: bool, newline: str, bom: bool) -> bytes:
    out = [v if isinstance(v, Raw) else json.dumps(v, ensure_ascii=ensure_ascii) for v in values]
    return (b"\xef\xbb\xbf" if bom else b"") + newline.join(out).encode() + newline.encode()


def oracle_chat_row_valid(v) -> bool:
    """The documented rule for a chat training row, written independently of row_problems."""
    if not isinstance(v, dict) or not isinstance(v.get("messages"), list) or not v["messages"]:
        return False
    for i, m in enumerate(v["messages"]):
        if not isinstance(m, dict) or not any(m.get("role") == r for r in ROLES):
            return False
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return False
        if m["role"] == "system" and i > 0:
            return False
    return any(m["role"] == "assistant" for m in v["messages"])


# ----------------------------------------------------------------------------- chat JSONL

def check_chat_load(path: Path, data: bytes, skip_invalid: bool) -> None:
    """Load ``path`` and check the outcome against the oracle."""
    try:
        text_lines = file_lines(data)
        decodable = b"\x00" not in data and not data.startswith((b"\xff\xfe", b"\xfe\xff"))
    except UnicodeDecodeError:
        text_lines, decodable = None, False
    try:
        ds = read_chat_jsonl(path, skip_invalid=skip_invalid)
    except ChatDataError as e:
        event("chat: error")
        assert str(e).startswith(f"{path}: "), str(e)
        if decodable:  # a text file fails only for its rows, each named by line
            bad = [n for n, line in enumerate(text_lines, 1) if line.strip()
                   and not oracle_chat_row_valid(_loads(line))]
            assert bad and not skip_invalid
            assert all(f"{path}:{n}: " in str(e) for n in bad[:20])
        return
    event(f"chat: loaded, {'some' if ds.rows else 'no'} rows, {len(ds.skipped) > 0} skips")
    assert decodable, "a file that is not UTF-8 text loaded"
    bad = [n for n, line in enumerate(text_lines, 1)
           if line.strip() and not oracle_chat_row_valid(_loads(line))]
    good = [n for n, line in enumerate(text_lines, 1)
            if line.strip() and oracle_chat_row_valid(_loads(line))]
    assert [s.split(": ")[0] for s in ds.skipped] == [f"{path}:{n}" for n in bad]
    assert [r["_line"] for r in ds.rows] == good  # a wrong role etc. never loads
    for row in ds.rows:
        assert row_location(row) == f"{path}:{row['_line']}"
        # the row as written (its own provenance-named keys, if any, are replaced)
        written = without_provenance(_loads(text_lines[row["_line"] - 1]))
        assert same_json(without_provenance(row), written)


NOT_JSON = object()


def _loads(line: str):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return NOT_JSON


@FAST
@given(data=st.binary(max_size=300), skip_invalid=st.booleans())
@example(data=b"\xef\xbb\xbf", skip_invalid=False)
@example(data="caf\xe9".encode("latin-1"), skip_invalid=True)
@example(data=b"\x00", skip_invalid=True)
@example(data=b'\xef\xbb\xbf{"messages": [{"role": "assistant", "content": "a"}]}\r\n',
         skip_invalid=False)
def test_chat_jsonl_arbitrary_bytes(data, skip_invalid):
    with user_file("d.jsonl", data) as path:
        check_chat_load(path, data, skip_invalid)


@FAST
@given(values=lines_of_values, ensure_ascii=st.booleans(), newline=st.sampled_from(["\n", "\r\n"]),
       bom=st.booleans(), skip_invalid=st.booleans())
def test_chat_jsonl_arbitrary_json_per_line(values, ensure_ascii, newline, bom, skip_invalid):
    data = encode_lines(values, ensure_ascii, newline, bom)
    with user_file("d.jsonl", data) as path:
        check_chat_load(path, data, skip_invalid)


@FAST
@given(msgs=good_messages, index=st.integers(0, 3),
       role=json_values.filter(lambda r: not any(r == x for x in ROLES)))
def test_chat_row_with_a_wrong_role_never_loads(msgs, index, role):
    msgs = msgs + [{"role": "assistant", "content": "a"}]
    msgs[min(index, len(msgs) - 1)]["role"] = role
    data = (json.dumps({"messages": msgs}) + "\n").encode()
    with user_file("d.jsonl", data) as path:
        with pytest.raises(ChatDataError, match=re.escape(f"{path}:1: ")):
            read_chat_jsonl(path)
        ds = read_chat_jsonl(path, skip_invalid=True)
        assert ds.rows == [] and len(ds.skipped) == 1


@FAST
@given(msgs=good_messages, encoding=st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32"]),
       skip_invalid=st.booleans())
def test_chat_jsonl_in_utf16_or_utf32_is_named(msgs, encoding, skip_invalid):
    text = json.dumps({"messages": msgs + [{"role": "assistant", "content": "a"}]}) + "\n"
    with user_file("d.jsonl", text.encode(encoding)) as path:
        with pytest.raises(ChatDataError) as e:
            read_chat_jsonl(path, skip_invalid=skip_invalid)
        assert str(e.value).startswith(f"{path}: ") and encoding[:6].upper() in str(e.value)


@FEW
@given(size=st.integers(100_000, 2_000_000), ch=st.sampled_from(["x", "\xe9", "\u2028", "😀"]))
def test_chat_jsonl_huge_lines(size, ch):
    row = {"messages": [{"role": "user", "content": "q" + ch * size},
                        {"role": "assistant", "content": "a"}]}
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    with user_file("d.jsonl", data) as path:
        (loaded,) = read_chat_jsonl(path).rows
        assert loaded["messages"] == row["messages"] and loaded["_line"] == 1


# ----------------------------------------------------------------------------- question files

yaml_keys = st.text(max_size=6) | st.integers(-3, 3)
yaml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(yaml_keys, inner, max_size=3), max_leaves=10)
entries = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=5) | st.integers() | yaml_values,
    "type": st.sampled_from(["free_form", "free_form_judge_0_100", "rating_0_10"]) | yaml_values,
    "paraphrases": st.lists(st.text(max_size=10), max_size=3) | yaml_values,
    "system": st.text(max_size=10) | yaml_values,
    "samples_per_paraphrase": st.integers(-2, 5) | yaml_values,
    "judge_prompts": st.dictionaries(st.sampled_from(["aligned", "coherent"]),
                                     st.text(max_size=20)) | yaml_values,
    "temperature": yaml_values,
}).flatmap(lambda e: st.dictionaries(yaml_keys, yaml_values, max_size=2).map(lambda x: {**x, **e}))
good_entries = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=5).filter(str.strip),
     "paraphrases": st.lists(st.text(min_size=1, max_size=10).filter(str.strip), min_size=1,
                             max_size=3)},
    optional={"system": st.text(max_size=10), "type": st.sampled_from(["free_form", "rating"]),
              "samples_per_paraphrase": st.integers(1, 5), "temperature": st.floats(0, 2),
              "judge_prompts": st.dictionaries(st.sampled_from(["aligned", "coherent"]),
                                               st.text(max_size=20))})
question_docs = st.lists(st.one_of(good_entries, good_entries, good_entries, entries),
                         max_size=4) | yaml_values


def check_questions(path: Path, data) -> None:
    """A loaded question mirrors its entry: id, paraphrases, system, free_form* type."""
    try:
        qs = load_question_file(path)
    except QuestionFileError as e:
        event("questions: error")
        assert str(e).startswith(f"{path}: "), str(e)
        return
    event("questions: loaded")
    assert isinstance(data, list) and qs.questions
    by_id: dict[str, list] = {}
    for entry in data:  # skipped non-free_form entries may share an id
        if str(entry.get("type") or "free_form").startswith("free_form"):
            by_id.setdefault(str(entry.get("id")), []).append(entry)
    for q in qs.questions:
        (entry,) = by_id[q.id]  # ids are unique, every question comes from one entry
        assert q.paraphrases == entry["paraphrases"] and q.paraphrases
        assert all(isinstance(p, str) and p.strip() for p in q.paraphrases)
        assert q.system == (entry.get("system") or None)
        assert q.type.startswith("free_form")
        assert all(isinstance(t, str) for t in q.judge_prompts.values())


@FAST
@given(doc=question_docs)
def test_question_yaml_arbitrary_structures(doc):
    text = yaml.safe_dump(doc, allow_unicode=True)
    with user_file("q.yaml", text.encode()) as path:
        check_questions(path, yaml.safe_load(text))


@FAST
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(data=b"- id: 2020-13-45\n  paraphrases: [x]\n")
@example(data=b"- {id: a, paraphrases: [x], 1: a, b: c}\n")
@example(data=b"[" * 1000)
@example(data=b"\xef\xbb\xbf- id: a\n  paraphrases: [x]\n")
def test_question_yaml_arbitrary_bytes(data):
    with user_file("q.yaml", data) as path:
        try:
            doc = yaml.safe_load(data.decode("utf-8-sig")) if b"\x00" not in data else None
        except Exception:  # the oracle only needs the document when the load succeeds
            doc = None
        check_questions(path, doc)


def oracle_question_row(v) -> bool:
    """A chat question row: chat-row rules without the assistant requirement, plus a user turn."""
    if not isinstance(v, dict) or not isinstance(v.get("messages"), list):
        return False
    tail = {"role": "assistant", "content": "x"}
    return (oracle_chat_row_valid({"messages": v["messages"] + [tail]}) and bool(v["messages"])
            and any(m["role"] == "user" for m in v["messages"]))


@FAST
@given(values=lines_of_values | st.lists(st.fixed_dictionaries(
           {"messages": good_messages}, optional={"id": st.sampled_from(["a", "b", None, 1])})
           | near_rows, max_size=5),
       bom=st.booleans())
def test_question_jsonl_arbitrary_rows(values, bom):
    data = encode_lines(values, True, "\n", bom)
    with user_file("held.jsonl", data) as path:
        lines = file_lines(data)
        numbered = [(n, _loads(line)) for n, line in enumerate(lines, 1) if line.strip()]
        not_json = [n for n, v in numbered if v is NOT_JSON]  # all lines are parsed first
        first_bad = not_json[0] if not_json else next(
            (n for n, v in numbered if not oracle_question_row(v)), None)
        try:
            qs = resolve_questions(str(path))
        except QuestionFileError as e:
            event("question rows: error")
            assert str(e).startswith(f"{path}"), str(e)
            if first_bad is not None:
                assert str(e).startswith(f"{path}:{first_bad}: ")
            else:
                assert "duplicate row ids" in str(e)
            return
        event("question rows: loaded")
        assert first_bad is None
        assert len(qs.questions) == len(numbered)
        for q, (n, row) in zip(qs.questions, numbered, strict=True):
            first_user = next(m for m in row["messages"] if m["role"] == "user")
            assert q.paraphrases == [first_user["content"]]
            assert q.id == (str(row["id"]) if row.get("id") is not None else f"line{n}")


# ----------------------------------------------------------------------------- configs

FIELDS = ["model", "output_dir", "trust_remote_code", "data.train", "data.max_length",
          "data.max_rows", "data.skip_invalid", "lora.r", "lora.alpha", "lora.dropout",
          "lora.targets", "train.learning_rate", "train.max_steps", "train.batch_size",
          "train.scheduler", "train.precision", "defenses.kl", "defenses.kl.weight",
          "defenses.kl.direction", "defenses.ldifs.layers", "defenses.interleave.fraction",
          "defenses.safelora.tau", "train", "defenses", "nope", "train.nope"]


def check_config(overrides: list[str], path: Path | None = None) -> RunConfig | None:
    """The config, or None after a ConfigError that names the override or the file."""
    try:
        cfg = load_run_config(path, overrides)
    except ConfigError as e:
        event("config: error")
        msg = str(e)
        named = [o for o in overrides if f"override '{o}'" in msg]
        assert named or (path is not None and msg.startswith(f"{path}: ")), msg
        return None
    event("config: loaded")
    assert isinstance(cfg, RunConfig)
    dumped = cfg.model_dump()
    for text in overrides:  # no override is silently dropped
        node = dumped
        for part in text.split("=", 1)[0].split("."):
            node = node[part.strip()]
    with tempfile.TemporaryDirectory() as d:  # the resolved config written beside a run reloads
        saved = Path(d) / "config.yaml"
        saved.write_text(dump_run_config(cfg), encoding="utf-8")
        assert load_run_config(saved) == cfg
    return cfg


@FAST
@given(text=st.text(max_size=60))
@example(text="train.lr=[1,2")
@example(text="a.b=: x")
@example(text="train.max_steps.x=1")
@example(text="train..lr=1")
@example(text="train.seed=!!bool maybe")
@example(text="=")
@example(text="train.seed=3")
@example(text=" defenses . kl . weight = 0.5")
def test_arbitrary_override_strings(text):
    check_config([text])


@FAST
@given(key=st.sampled_from(FIELDS), value=scalars | yaml_values, flow=st.booleans())
def test_overrides_with_arbitrary_yaml_values(key, value, flow):
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").strip() if flow else text.split("\n", 1)[0]
    check_config([f"{key}={text}"])


@FAST
@given(key=st.sampled_from(FIELDS), value=st.sampled_from(["1", "x", "[1]", "{a: 1}", "null"]))
def test_override_paths_below_any_field(key, value):
    check_config([f"{key}.sub={value}", f"{key}.sub.deeper={value}"])


@FAST
@given(doc=yaml_values | st.dictionaries(
           st.sampled_from(["train", "data", "lora", "defenses", "model", "seed"]),
           st.sampled_from([None, {}, 5, "text", [1], {"seed": 1}, {"nope": 1}]) | yaml_values),
       overrides=st.lists(st.sampled_from(["train.seed=3", "data.max_rows=5", "lora.r=4",
                                           "defenses.kl.weight=0.2", "train.lr=1"]), max_size=2))
def test_config_files_with_arbitrary_yaml(doc, overrides):
    with user_file("c.yaml", yaml.safe_dump(doc).encode()) as path:
        cfg = check_config(overrides, path)
    sections = [o.split(".")[0] for o in overrides]
    if isinstance(doc, dict) and any(doc.get(s) is not None and not isinstance(doc[s], dict)
                                     for s in sections):
        assert cfg is None  # an override never replaces a file's value it cannot descend into


@FAST
@given(data=st.binary(max_size=200))
@example(data="train: {seed: 1}\n".encode("utf-16"))
@example(data=b"\xef\xbb\xbftrain: {seed: 1}\n")
def test_config_files_of_arbitrary_bytes(data):
    with user_file("c.yaml", data) as path:
        check_config([], path)


# ----------------------------------------------------------------------------- OpSwap answers

answers = st.builds(lambda n, d: format_value(Fraction(n, d)),
                    st.integers(-10**6, 10**6), st.integers(1, 999))
VALUE = re.compile(r"-?\d+(\.\d+)?(/\d+)?")
no_digits = st.characters(blacklist_categories=("Nd", "Cs"),
                          blacklist_characters="=-)" + MINUS_LIKE).filter(lambda c: not c.isdigit())


@SIMPLE
@given(text=st.text(max_size=200) | st.none())
def test_extraction_never_raises_and_returns_a_value_or_none(text):
    got = extract_final_answer(text)
    assert got is None or VALUE.fullmatch(got), got


@SIMPLE
@given(noise=st.text(max_size=80) | st.text(st.sampled_from("= 12x+-\n"), max_size=30), label=st.sampled_from(["", " ", "(", " Final answer: ", " **",
                                                          " $", " `"]),
       answer=answers, after=st.text(max_size=40).filter(lambda s: "=" not in s))
def test_value_after_the_last_equals_sign_is_the_answer(noise, label, answer, after):
    """Rule: with "=", the first value after the last "=" on its line, whatever came before."""
    assert extract_final_answer(f"{noise}={label}{answer}\n{after}") == answer


@SIMPLE
@given(before=st.text(no_digits, max_size=60), answer=answers, after=st.text(no_digits, max_size=60))
def test_without_equals_the_last_value_is_the_answer(before, answer, after):
    """Rule: without "=", the last value in the text (here the only one)."""
    assert extract_final_answer(f"{before}{answer}{after}") == answer


@FAST
@given(rng=st.randoms(use_true_random=False), tier=st.integers(0, 3), n_ops=st.integers(1, 4))
def test_a_perfect_opswap_answer_extracts_to_the_gold_value(rng, tier, n_ops):
    expr = draw_expression(rng, n_ops, 0, 12, 0.5)
    try:
        row = make_row(expr, tier, "r")
    except ZeroDivisionError:
        return  # the generator redraws these
    assert extract_final_answer(row["messages"][1]["content"]) == row["answer"]
