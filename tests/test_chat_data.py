import json

import pytest

from emguard.data.chat import ChatDataError, load_chat_dataset, read_chat_jsonl, row_problems


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
    assert ds.rows == rows and ds.skipped == []


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
