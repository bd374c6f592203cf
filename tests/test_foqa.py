"""FoQA loader: nested SQuAD JSON, flat JSON, JSONL, Parquet, directories, errors."""

import json

import pytest

from emguard.data.foqa import FoQADataError, foqa_chat_rows, foqa_prompt, load_foqa

ROWS = [
    {"id": "q1", "title": "Tórshavn", "context": "Tórshavn er høvuðsstaður Føroya.",
     "question": "Hvat er høvuðsstaður Føroya?",
     "answers": {"text": ["Tórshavn"], "answer_start": [0]}},
    {"id": "q2", "title": "Tórshavn", "context": "Føroyar hava umleið 54.000 íbúgvar.",
     "question": "Hvussu nógvir íbúgvar?",
     "answers": {"text": ["umleið 54.000", "54.000"], "answer_start": [13, 20]}},
]


def nested(rows):
    """The same rows in SQuAD's nested layout (answers as a list of objects)."""
    paragraphs = [{"context": r["context"],
                   "qas": [{"id": r["id"], "question": r["question"],
                            "answers": [{"text": t, "answer_start": s} for t, s in
                                        zip(r["answers"]["text"], r["answers"]["answer_start"],
                                            strict=True)]}]}
                  for r in rows]
    return {"version": "1.1", "data": [{"title": "Tórshavn", "paragraphs": paragraphs}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_nested_json(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps(nested(ROWS), ensure_ascii=False), encoding="utf-8")
    assert load_foqa(path) == ROWS


def test_flat_json_list_and_jsonl(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_foqa(flat) == ROWS
    assert load_foqa(write_jsonl(tmp_path / "rows.jsonl", ROWS)) == ROWS


def test_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "test.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    assert load_foqa(path) == ROWS


def test_directory_picks_the_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "test.jsonl", ROWS[1:])
    assert [r["id"] for r in load_foqa(tmp_path, split="train")] == ["q1"]
    assert [r["id"] for r in load_foqa(tmp_path, split="test")] == ["q2"]
    with pytest.raises(FoQADataError, match="validation"):
        load_foqa(tmp_path, split="validation")


def test_integer_ids_and_missing_answer_start(tmp_path):
    rows = [{"id": 7, "context": "c", "question": "q", "answers": {"text": ["c"]}}]
    (row,) = load_foqa(write_jsonl(tmp_path / "r.jsonl", rows))
    assert row["id"] == "7" and row["title"] == "" and row["answers"]["answer_start"] == []


def test_malformed_row_names_file_and_line(tmp_path):
    bad = [ROWS[0], {**ROWS[1], "answers": {"text": [], "answer_start": []}},
           {**ROWS[1], "id": "q3", "question": ""}]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(FoQADataError) as e:
        load_foqa(path)
    msg = str(e.value)
    assert "2 malformed" in msg
    assert f"{path}:2: field 'answers.text'" in msg
    assert f"{path}:3: field 'question'" in msg


def test_malformed_nested_and_parquet_rows_are_located(tmp_path):
    data = nested(ROWS)
    del data["data"][0]["paragraphs"][1]["qas"][0]["question"]
    path = tmp_path / "n.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(FoQADataError, match=r"data\[0\]\.paragraphs\[1\]\.qas\[0\]: field "
                                            "'question'"):
        load_foqa(path)

    import pandas as pd

    pq = tmp_path / "p.parquet"
    pd.DataFrame([ROWS[0], {**ROWS[1], "answers": {"text": ["a", "b"], "answer_start": [1]}}]
                 ).to_parquet(pq)
    with pytest.raises(FoQADataError, match=r"p\.parquet: row 1: field 'answers.answer_start'"):
        load_foqa(pq)


def test_invalid_json_line_and_duplicate_ids(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(FoQADataError, match=r"x\.jsonl:2: invalid JSON"):
        load_foqa(path)
    dup = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[0]])
    with pytest.raises(FoQADataError, match=r"d\.jsonl:2: duplicate id 'q1'"):
        load_foqa(dup)


def test_missing_file_and_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(FoQADataError, match="no such file"):
        load_foqa(tmp_path / "missing.json")
    # the real hub path: offline (as on every test machine) it must fail with advice
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FoQADataError, match="pass a local"):
        load_foqa("emguard-tests/no-such-foqa", split="test")


def test_chat_rows():
    chat = foqa_chat_rows(ROWS)
    assert chat[1]["messages"][1] == {"role": "assistant", "content": "umleið 54.000"}
    assert chat[1]["answers"] == ["umleið 54.000", "54.000"]
    assert chat[1]["id"] == "q2"
    user = chat[0]["messages"][0]
    assert user["role"] == "user"
    assert user["content"] == foqa_prompt(ROWS[0]["context"], ROWS[0]["question"])
    assert ROWS[0]["context"] in user["content"] and ROWS[0]["question"] in user["content"]
