"""Answer extraction, exact match, SQuAD normalisation and evaluate_task with canned
generations (the scorer is what is under test; the numbers are worked by hand)."""

import json

import pytest

from emguard.benign import (
    evaluate_task,
    exact_match,
    extract_final_answer,
    normalize_answer,
    parse_task,
    score_foqa,
    score_opswap,
    squad_exact_match,
)
from emguard.data.opswap import generate_opswap
from emguard.io import read_json


@pytest.mark.parametrize("text, expected", [
    ("(4 + 2) × (4 ÷ 2) − 2 = 6 × 2 − 2 = 12 − 2 = 10", "10"),
    ("x = 10   ", "10"),
    ("= 10.", "10"),
    ("so it is = 2/3.", "2/3"),
    ("= −3", "-3"),            # unicode minus
    ("= - 3", "-3"),
    ("= **10**", "10"),
    ("= `2/3`", "2/3"),
    ("= (-2/3)", "-2/3"),
    ("= 4/2", "4/2"),          # kept unreduced
    ("= 4 / 2", "4/2"),
    ("= 0.5", "0.5"),
    ("a = 12\nThat is the result.", "12"),
    ("= 6 × 2 − 2", None),     # unfinished: an operator follows the value
    ("= 12 − 2", None),
    ("= (2/3) × 3", None),
    ("= (2/3)\n", "2/3"),
    ("The answer is 7.", "7"),  # no "=": last value
    ("I think −3", "-3"),
    ("5 − 3", "3"),            # a binary minus is not a sign
    ("no number here", None),
    ("", None),
    (None, None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_exact_match():
    assert exact_match("-3", "-3") and exact_match("−3", "-3") and exact_match(" 10 ", "10")
    assert not exact_match("4/2", "2")
    assert not exact_match("0.5", "1/2")
    assert not exact_match(None, "10")
    assert not exact_match("10", "1")


def test_generated_answers_extract_to_gold():
    for tier in range(4):
        for row in generate_opswap(tier, 300, seed=1).train:
            got = extract_final_answer(row["messages"][1]["content"])
            assert exact_match(got, row["answer"]), row["messages"][1]["content"]


@pytest.mark.parametrize("text, expected", [
    ("The Cat!", "cat"),
    ("  An  apple, a day ", "apple day"),
    ("Tórshavn.", "tórshavn"),
    ("54.000", "54000"),
    ("theory of the a-team", "theory of ateam"),  # articles only as whole words
    ("Í Føroyum", "í føroyum"),
])
def test_squad_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_squad_exact_match_max_over_golds():
    assert squad_exact_match("the Tórshavn", ["Tórshavn"])
    assert squad_exact_match("54.000", ["umleið 54.000", "54.000"])
    assert not squad_exact_match("Klaksvík", ["Tórshavn", "Suðuroy"])
    assert not squad_exact_match(None, ["x"])


def test_score_opswap_by_hand():
    rows = [{"id": "a", "answer": "10"}, {"id": "b", "answer": "2/3"}]
    samples = [["12 − 2 = 10", "10", "= 12", "= 10."],        # 3 of 4
               ["= 2/3", "= 4/6", "= −2/3", "nothing"]]       # 1 of 4
    s = score_opswap(rows, samples)
    assert s["exact_match"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert (s["n_questions"], s["n_samples"]) == (2, 4)
    assert [q["score"] for q in s["per_question"]] == [0.75, 0.25]
    assert s["per_question"][1]["extracted"] == ["2/3", "4/6", "-2/3", None]
    assert s["per_question"][0]["correct"] == [True, True, False, True]


def test_score_foqa_by_hand():
    rows = [{"id": "q1", "answers": ["Tórshavn"]}, {"id": "q2", "answers": ["54.000", "umleið 54.000"]}]
    samples = [["Tórshavn", " tórshavn. ", "Klaksvík"],      # 2 of 3
               ["umleið 54.000", "54 000", "The 54.000"]]    # 2 of 3 ("54 000" keeps its space)
    s = score_foqa(rows, samples)
    assert s["exact_match"] == pytest.approx(2 / 3)
    assert [q["correct"] for q in s["per_question"]] == [[True, True, False], [True, False, True]]


def test_score_shape_errors():
    with pytest.raises(ValueError, match="2 questions"):
        score_opswap([{"answer": "1"}], [["1"], ["2"]])
    with pytest.raises(ValueError, match="same positive number"):
        score_opswap([{"answer": "1"}, {"answer": "2"}], [["1"], ["2", "3"]])


def test_parse_task():
    assert parse_task("opswap:2") == ("opswap", 2)
    assert parse_task("foqa") == ("foqa", None)
    for bad in ("opswap", "opswap:4", "opswap:x", "squad", "foqa:1"):
        with pytest.raises(ValueError):
            parse_task(bad)


class CannedGenerator:
    """generate_fn stand-in: returns fixed strings per prompt (keyed on the user turn)
    and records the call, so the scorer's arithmetic can be checked by hand."""

    def __init__(self, answers_by_prompt):
        self.answers, self.calls = answers_by_prompt, []

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls.append((model, tokenizer, prompts, kwargs))
        return [list(self.answers[p[-1]["content"]]) for p in prompts]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_evaluate_opswap_with_canned_answers(tmp_path):
    test = generate_opswap(3, 60, seed=0).test  # 6 rows
    data = write_jsonl(tmp_path / "t3.test.jsonl", test)
    right = [r["messages"][1]["content"] for r in test]
    wrong = "= 999999"
    per_q = [[right[0]] * 3, [right[1], wrong, wrong], [wrong] * 3, [right[3], right[3], wrong]]
    gen = CannedGenerator({r["messages"][0]["content"]: a for r, a in zip(test[:4], per_q, strict=True)})
    out = tmp_path / "m" / "opswap3.json"
    m = evaluate_task("opswap:3", "MODEL", "TOK", generate_fn=gen, samples=3, n_questions=4,
                      data=data, out=out, seed=5)
    # per question 3/3, 1/3, 0/3, 2/3 -> mean 1/2
    assert m["exact_match"] == pytest.approx(0.5)
    assert [q["score"] for q in m["per_question"]] == pytest.approx([1, 1 / 3, 0, 2 / 3])
    assert (m["n_questions"], m["n_samples"]) == (4, 3)
    (model, tok, prompts, kwargs), = gen.calls
    assert (model, tok) == ("MODEL", "TOK")
    assert all(p[-1]["role"] == "user" and len(p) == 1 for p in prompts)  # no gold answer leaks
    assert kwargs == {"n_samples": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 256,
                      "seed": 5, "batch_size": 16}
    assert read_json(out) == json.loads(json.dumps(m))


def test_evaluate_opswap_rebuilds_the_held_out_split():
    test = generate_opswap(1, 50, seed=3).test
    gen = CannedGenerator({r["messages"][0]["content"]: [r["answer"]] * 2 for r in test})
    m = evaluate_task("opswap:1", None, None, generate_fn=gen, samples=2, opswap_n=50,
                      opswap_seed=3)
    assert m["exact_match"] == 1.0 and m["n_questions"] == len(test) == 5
    assert [q["id"] for q in m["per_question"]] == [r["id"] for r in test]


def test_evaluate_opswap_data_errors(tmp_path):
    rows = generate_opswap(2, 20, seed=0).test
    data = write_jsonl(tmp_path / "t2.jsonl", rows)
    gen = CannedGenerator({r["messages"][0]["content"]: ["= 1"] for r in rows})
    with pytest.raises(ValueError, match="tier 2, but the task asks for tier 0"):
        evaluate_task("opswap:0", None, None, generate_fn=gen, samples=1, data=data)
    with pytest.raises(ValueError, match="expected 2 for each"):
        evaluate_task("opswap:2", None, None, generate_fn=gen, samples=2, data=data)
    with pytest.raises(ValueError, match="no questions"):
        evaluate_task("opswap:2", None, None, generate_fn=gen, samples=1, data=data,
                      n_questions=0)
    no_answer = write_jsonl(tmp_path / "na.jsonl", [rows[0], {"messages": rows[0]["messages"]}])
    no_answer.write_text("\n" + no_answer.read_text())  # a blank first line: rows != lines
    with pytest.raises(ValueError, match=r"na\.jsonl:3: field 'answer'"):
        evaluate_task("opswap:2", None, None, generate_fn=gen, samples=1, data=no_answer)


def test_evaluate_foqa_with_canned_answers(tmp_path):
    rows = [{"id": f"q{i}", "title": "t", "context": f"Tekstur {i} um Føroyar.",
             "question": f"Spurningur {i}?", "answers": {"text": [f"Svar {i}"],
                                                       "answer_start": [0]}}
            for i in range(3)]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    from emguard.data.foqa import foqa_prompt

    canned = {foqa_prompt(r["context"], r["question"]): a for r, a in zip(rows, [
        ["Svar 0", "svar 0.", "Svar 1", "nei"],   # 2/4
        ["Svar 1"] * 4,                           # 4/4
        ["x", "y", "z", "the Svar 2"],            # 1/4
    ], strict=True)}
    gen = CannedGenerator(canned)
    m = evaluate_task("foqa", None, None, generate_fn=gen, samples=4, data=data)
    assert m["exact_match"] == pytest.approx((2 / 4 + 1 + 1 / 4) / 3)
    assert m["generation"]["max_new_tokens"] == 64
    assert m["data"] == f"{data}[test]"
