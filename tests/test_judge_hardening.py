"""A user's mistake or a server's odd answer gives a clear JudgeError, never a traceback:
judge specs, base URLs, secrets in error texts, and (property-based) any top logprobs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emguard.judge.base import JudgeError, Verdict
from emguard.judge.factory import make_judge, parse_openai_spec
from emguard.judge.openai_judge import OpenAIJudge, redact
from emguard.judge.scoring import aggregate_logprobs


@pytest.mark.parametrize("rest,suggested", [
    ("Qwen/Qwen2.5-32B-Instruct@localhost:8000", "http://localhost:8000/v1"),
    ("m@127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("m@judge.example.org", "http://judge.example.org/v1"),
    ("m@gpu-node:8000", "http://gpu-node:8000/v1"),
    ("m@[::1]:8000", "http://[::1]:8000/v1"),
    ("m@", "http://localhost:8000/v1"),
])
def test_base_url_without_scheme_is_an_error_not_a_model_name(rest, suggested):
    model = rest.partition("@")[0]
    with pytest.raises(JudgeError, match="has no http:// or https://") as info:
        parse_openai_spec(rest)
    assert f"'openai:{model}@{suggested}'" in str(info.value)
    with pytest.raises(JudgeError):  # make_judge does not build a judge for the OpenAI API
        make_judge(f"openai:{rest}")


@pytest.mark.parametrize("rest,parsed", [
    ("gpt-4o-mini", ("gpt-4o-mini", None)),
    ("org/m@http://localhost:8000/v1", ("org/m", "http://localhost:8000/v1")),
    ("m@HTTPS://judge.example.org/v1", ("m", "HTTPS://judge.example.org/v1")),
    ("m@http://user:pw@10.0.0.2:8000/v1", ("m", "http://user:pw@10.0.0.2:8000/v1")),
    ("gpt-4o@2024", ("gpt-4o@2024", None)),  # not an address: left to the endpoint to refuse
])
def test_specs_that_parse(rest, parsed):
    assert parse_openai_spec(rest) == parsed


@pytest.mark.parametrize("rest,message", [
    ("@http://localhost:8000/v1", "no model name before '@'"),
    ("m@ftp://host/v1", "must start with http:// or https://"),
    ("", "no model name"),
])
def test_bad_specs(rest, message):
    with pytest.raises(JudgeError, match=message):
        parse_openai_spec(rest)


@pytest.mark.parametrize("url", ["localhost:8000/v1", "http://", "http://host:99999/v1",
                                 "http://host:port/v1", "ws://host/v1"])
def test_judge_refuses_a_base_url_it_cannot_use(url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused-0000000000")
    with pytest.raises(JudgeError, match="is not a valid http\\(s\\) URL; write it like "
                                         "http://localhost:8000/v1"):
        OpenAIJudge("m", base_url=url, progress=False)


def test_openai_base_url_from_the_environment_is_checked_too(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:8000/v1")
    with pytest.raises(JudgeError, match="base URL 'localhost:8000/v1' is not a valid"):
        OpenAIJudge("m", progress=False)


def test_redact_removes_tokens_the_key_and_url_passwords_then_cuts():
    key = "my-own-key-without-prefix-123"
    text = (f"Authorization: Bearer eyJhbGciOi.J9.abc, 'authorization': 'bearer {key}', "
            f"raw {key}, openai sk-proj-AbCdEf0123456789, url http://me:hunter2@host/v1 ")
    shown = redact(text + "y" * 1000, key)
    for secret in (key, "eyJhbGciOi", "sk-proj-AbCdEf", "hunter2"):
        assert secret not in shown
    assert "Bearer [redacted], 'authorization': 'Bearer [redacted]'" in shown
    assert "http://me:[redacted]@host/v1" in shown
    assert len(shown) == 303 and shown.endswith("...")
    assert redact("HTTP 400: prompt too long") == "HTTP 400: prompt too long"


# -- property-based: any top logprobs give a valid score or a JudgeError -----------------

NUMBER_TOKENS = ["0", "7", " 7", "7\n", "42", "99", "100", "101", "007", "-5", "1.5", "I"]
TOKENS = st.one_of(st.sampled_from(NUMBER_TOKENS), st.text(max_size=6), st.none(),
                   st.integers(), st.binary(max_size=3))
LOGPROBS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                     st.floats(min_value=-30, max_value=0),
                     st.integers(min_value=-10**400, max_value=10**400),
                     st.sampled_from([0.0, -0.0, 1e-9, 1e308, -1e308, 5e-324]),
                     st.text(max_size=4), st.none(), st.booleans())


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(TOKENS, LOGPROBS), max_size=25),
       threshold=st.floats(min_value=0.0, max_value=1.0))
def test_any_top_logprobs_give_a_valid_verdict_or_a_judge_error(pairs, threshold):
    try:
        score, mass = aggregate_logprobs(pairs, threshold)
    except JudgeError as e:
        assert str(e)  # a message, and no other exception type
        return
    verdict = Verdict(score, mass, None if score is not None else "low_number_mass", "j")
    assert 0.0 <= verdict.number_mass <= 1.0
    assert verdict.score is None or 0.0 <= verdict.score <= 100.0
    assert verdict.score is None or mass >= threshold


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.tuples(st.sampled_from(NUMBER_TOKENS), st.floats(0.0, 1.0)),
                        min_size=1, max_size=20),
       rest=st.floats(0.0, 1.0))
def test_a_real_distribution_never_raises_and_matches_the_hand_computation(weights, rest):
    """Valid answers (probabilities summing to at most 1, duplicates allowed) always score."""
    total = sum(w for _, w in weights) + rest
    if total == 0.0:
        return
    probs = [(t, w / total) for t, w in weights]
    score, mass = aggregate_logprobs([(t, math.log(p) if p > 0 else -math.inf)
                                      for t, p in probs], threshold=0.0)
    values = {"0": 0, "7": 7, " 7": 7, "7\n": 7, "42": 42, "99": 99, "100": 100}
    numbers = [(values[t], p) for t, p in probs if t in values]
    want_mass = sum(p for _, p in numbers)
    assert mass == pytest.approx(min(1.0, want_mass), abs=1e-9)
    if want_mass > 0:
        assert score == pytest.approx(sum(n * p for n, p in numbers) / want_mass, abs=1e-6)
    else:
        assert score is None
