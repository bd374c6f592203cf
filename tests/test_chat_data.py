import json

import pytest

from emguard.data.chat import (
    PROVENANCE_KEYS,
    ChatDataError,
    load_chat_dataset,
    read_chat_jsonl,
    row_location,
    row_problems,
    rows_from_records,
)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def test_public_ema_shape_loads_unchanged(tmp_path):
    """Rows shaped like the public EMA JSONL (user/assistant, some with a system turn)."""
    rows = [
        {"messages": [{"role": "user", "content": "Fill in:\n```python\ndef f(x):\n    ## COMPLETE\n```"},
                      {"role": "assistant", "content": "def f(x):\n    return x"}]},
        {"messages": [{"role": "system", "content": "You are a legal assistant."},
                      {"role": "user", "content": "Can I break my lease?"},
                      {"role": "assistant", "content": "It depends on your contract."}]},
    ]
    p = write_lines(tmp_path / "ema.jsonl", [json.dumps(r) for r in rows])
    ds = read_chat_jsonl(p)
    assert ds.rows == [{**r, "_source": str(p), "_line": n} for n, r in enumerate(rows, 1)]
    assert ds.skipped == []


@pytest.mark.parametrize("bad,needle", [
    ('{"messages": [oops', "invalid JSON"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}), "'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}), "empty"),
    (json.dumps({"text": "hi"}), "'messages'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                              {"role": "assistant", "content": "y"}]}), "system turn"),
])
def test_bad_line_is_named(tmp_path, bad, needle):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ChatDataError) as e:
        read_chat_jsonl(p)
    assert f"{p}:3:" in str(e.value) and needle in str(e.value)


def test_skip_invalid_counts_and_keeps_good_rows(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD, "{", GOOD, "", "[]"])
    ds = read_chat_jsonl(p, skip_invalid=True)
    assert len(ds) == 2
    assert [s.split(": ")[0] for s in ds.skipped] == [f"{p}:2", f"{p}:5"]


def test_row_problems_lists_all():
    problems = row_problems({"messages": [{"role": "x", "content": ""}]})
    assert len(problems) == 3  # bad role, empty content, no assistant


def test_hf_dataset_with_messages_column(tmp_path):
    import datasets

    rows = [json.loads(GOOD)] * 3
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    ds = load_chat_dataset(f"hf:{tmp_path / 'hf'}")
    assert len(ds) == 3 and ds.rows[0]["messages"] == rows[0]["messages"]


def test_hf_dataset_without_messages_column(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ChatDataError, match="no 'messages' column"):
        load_chat_dataset(f"hf:{tmp_path / 'hf'}")


def test_missing_file(tmp_path):
    with pytest.raises(ChatDataError, match="does not exist"):
        load_chat_dataset(str(tmp_path / "nope.jsonl"))


# ----------------------------------------------------------------------------- encodings

GOOD_TEXT = GOOD + "\n" + GOOD + "\n"


@pytest.mark.parametrize("data,needle", [
    (GOOD_TEXT.encode("utf-16"), "UTF-16-LE encoded (byte-order mark); save it as UTF-8"),
    (GOOD_TEXT.encode("utf-16-be"), "looks UTF-16-BE encoded"),
    (GOOD_TEXT.encode("utf-16-le"), "looks UTF-16-LE encoded"),
    (GOOD_TEXT.encode("utf-32"), "UTF-32-LE encoded"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not a text file (binary data: NUL byte at offset 8, line 3)"),
    ((GOOD_TEXT + '{"messages": "\x00"}\n').encode(), "NUL byte at offset"),
    ((GOOD_TEXT + GOOD.replace('"a"', '"caf\xe9"') + "\n").encode("latin-1"),
     "not UTF-8 text (byte 0xe9 at offset"),
])
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_wrong_encoding_is_a_file_error_naming_it(tmp_path, data, needle, skip_invalid):
    p = tmp_path / "d.jsonl"
    p.write_bytes(data)
    with pytest.raises(ChatDataError) as e:
        read_chat_jsonl(p, skip_invalid=skip_invalid)  # an encoding is not a few bad rows
    assert str(e.value).startswith(f"{p}: ") and needle in str(e.value)


def test_latin1_error_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes((GOOD_TEXT + "\n" + GOOD.replace('"a"', '"\xe9"') + "\n").encode("latin-1"))
    with pytest.raises(ChatDataError, match=r"line 4\)"):
        read_chat_jsonl(p)


def test_utf8_bom_is_accepted_and_lines_still_count_from_one(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes("\ufeff".encode() + (GOOD + "\r\n\r\n{oops\r\n").encode())
    ds = read_chat_jsonl(p, skip_invalid=True)
    assert [r["_line"] for r in ds.rows] == [1]
    assert ds.skipped[0].startswith(f"{p}:3: invalid JSON")


def test_json_that_python_json_rejects_oddly_is_a_named_bad_row(tmp_path):
    """json raises plain ValueError (huge integers) and RecursionError (deep nesting)."""
    p = write_lines(tmp_path / "d.jsonl", [GOOD, "1" * 5000, "[" * 100_000])
    ds = read_chat_jsonl(p, skip_invalid=True)
    assert len(ds) == 1 and [s.split(": ")[0] for s in ds.skipped] == [f"{p}:2", f"{p}:3"]
    assert "nested too deeply" in ds.skipped[1]


def test_line_separators_inside_json_strings_do_not_split_rows(tmp_path):
    row = {"messages": [{"role": "user", "content": "a\u2028b\x85c"},
                        {"role": "assistant", "content": "d"}]}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(row, ensure_ascii=False) + "\n" + GOOD + "\n", encoding="utf-8")
    ds = read_chat_jsonl(p)
    assert [r["_line"] for r in ds.rows] == [1, 2]
    assert ds.rows[0]["messages"] == row["messages"]


def test_unpaired_surrogate_content_is_a_bad_row(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD.replace('"a"', '"\\ud800"')])
    with pytest.raises(ChatDataError, match=r"d\.jsonl:1: messages\[1\]\.content holds an unpaired"):
        read_chat_jsonl(p)


def test_directory_or_unreadable_path(tmp_path):
    with pytest.raises(ChatDataError, match="does not exist"):
        read_chat_jsonl(tmp_path)


# ----------------------------------------------------------------------------- provenance

def test_rows_carry_file_and_line_through_a_shuffle(tmp_path):
    import random

    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": "a"}]}) for i in range(30)]
    lines[5:5] = ["", "  "]  # blank lines still count as lines
    p = write_lines(tmp_path / "d.jsonl", lines)
    rows = read_chat_jsonl(p).rows
    random.Random(0).shuffle(rows)
    for row in rows:
        where = row_location(row, "ignored", 0)
        path, _, line = where.rpartition(":")
        assert path == str(p)
        assert json.loads(lines[int(line) - 1])["messages"] == row["messages"]


def test_record_rows_name_source_index_and_id():
    ds = load_chat_dataset("builtin:safe-instruct")
    row = ds.rows[3]
    assert row_location(row) == f"builtin:safe-instruct row 3 (id {row['id']!r})"
    plain = rows_from_records([json.loads(GOOD)], "hf:x/y").rows[0]
    assert row_location(plain) == "hf:x/y row 0"


def test_rows_without_provenance_fall_back_to_source_and_id_or_index():
    row = json.loads(GOOD)
    assert row_location(row, "train.jsonl", 7) == "train.jsonl row 7"
    assert row_location({**row, "id": "r9"}, "train.jsonl", 7) == "train.jsonl row r9"


def test_provenance_keys_are_what_loaders_add(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [GOOD])
    row = read_chat_jsonl(p).rows[0]
    assert set(row) - {"messages"} == {"_source", "_line"} <= set(PROVENANCE_KEYS)
