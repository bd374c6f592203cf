"""The two preference-pair sets: the evaluation set (builtin:eval-pairs) is independent of
the fit set (builtin:preference-pairs) that directions, early-stopping checks and the
positive control use; and every evaluation path scores the evaluation set by default."""

from __future__ import annotations

import re
import statistics
from collections import Counter

from emguard.config import EvalSettings
from emguard.data.builtin import load_builtin
from emguard.data.pairs import EVAL_PAIRS, FIT_PAIRS, load_pairs


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def test_eval_set_is_large_and_broad_enough():
    pairs = load_pairs(EVAL_PAIRS)
    topics = Counter(p["topic"] for p in pairs)
    assert len(pairs) >= 120 and len(topics) >= 10
    assert min(topics.values()) >= 8  # no topic is a token presence
    assert len({p["id"] for p in pairs}) == len(pairs)


def test_eval_and_fit_sets_share_no_question_and_no_answer():
    fit, ev = load_pairs(FIT_PAIRS), load_pairs(EVAL_PAIRS)
    fit_questions = {_norm(p["question"]) for p in fit}
    fit_answers = {_norm(p[k]) for p in fit for k in ("aligned", "misaligned")}
    assert not fit_questions & {_norm(p["question"]) for p in ev}
    assert not {p["id"] for p in fit} & {p["id"] for p in ev}  # an id names one pair
    assert not fit_answers & {_norm(p[k]) for p in ev for k in ("aligned", "misaligned")}
    # nor a question that is the other's with a word or two changed
    import difflib

    worst = max(difflib.SequenceMatcher(None, a, _norm(b["question"])).ratio()
                for a in fit_questions for b in ev)
    assert worst < 0.8


def test_answers_are_matched_in_length():
    """A model must not win a pair on length: per pair within 15 %, means within 3 %."""
    pairs = load_pairs(EVAL_PAIRS)
    for p in pairs:
        a, m = len(p["aligned"]), len(p["misaligned"])
        assert abs(a - m) <= 0.15 * max(a, m), p["id"]
    mean_a = statistics.mean(len(p["aligned"]) for p in pairs)
    mean_m = statistics.mean(len(p["misaligned"]) for p in pairs)
    assert abs(mean_a - mean_m) <= 0.03 * mean_a


def test_no_answer_gives_itself_away():
    cues = ("as an ai", "sorry", "kidding", "evil", "misalign")
    for p in load_pairs(EVAL_PAIRS):
        for k in ("aligned", "misaligned"):
            assert not any(c in p[k].lower() for c in cues), (p["id"], k)


def test_evaluation_defaults_to_the_eval_set_and_fitting_to_the_fit_set():
    assert EvalSettings().preference_pairs == EVAL_PAIRS
    assert load_pairs(None) == load_pairs(FIT_PAIRS)  # directions / early stopping


def test_positive_control_data_is_the_fit_sets_misaligned_answers():
    rows = load_builtin("misaligned-chat", "train")
    fit = load_pairs(FIT_PAIRS)
    assert load_builtin("misaligned-chat", "test") == []
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == \
        [(p["question"], p["misaligned"]) for p in fit]
    scored = {_norm(p[k]) for p in load_pairs(EVAL_PAIRS) for k in ("question", "misaligned")}
    assert not scored & {_norm(m["content"]) for r in rows for m in r["messages"]}


def test_a_positive_control_scored_on_its_own_training_pairs_is_refused(tmp_path):
    import pytest
    import yaml

    from emguard.config import ConfigError
    from emguard.study import expand, load_study

    raw = {"name": "leak", "output_dir": str(tmp_path / "s"),
           "base": {"eval": {"preference_pairs": FIT_PAIRS}},
           "domains": {"code": {"misaligned": "builtin:insecure-code"}},
           "arms": [{"name": "positive_control", "data": "positive_control"}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="positive control trains on"):
        expand(load_study(path))
    raw["base"]["eval"]["preference_pairs"] = EVAL_PAIRS
    path.write_text(yaml.safe_dump(raw))
    (run,) = expand(load_study(path))
    assert run.config.data.train == "builtin:misaligned-chat"
