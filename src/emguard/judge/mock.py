"""A judge with canned answers, for tests and dry runs: no model, no network, no key.

``MockJudge`` is a real ``Judge``: ``score(prompts) -> [Verdict]`` in order, through the
package's verdict cache (``JudgeCache``, keys from ``cache_key``) exactly as the OpenAI and
local judges use it, so a test of caching exercises the package's cache. Spec for
``make_judge`` and ``--judge``: ``mock`` (every prompt scores 50) or ``mock:SCORE``.

What each prompt is answered with (a *canned answer*), looked up in this order:
  1. ``by_prompt[prompt]`` (the exact judge prompt);
  2. ``by_question``: the first key, in the mapping's order, that occurs in the prompt
     (a judge prompt embeds the question and the answer, so a question text or an answer
     text picks out that question's prompts);
  3. ``default``: a canned answer, or a function ``prompt -> canned answer``.

A canned answer is one of:
  * a number in [0, 100]: that score, number mass 1;
  * top logprobs ``[(token text, natural-log probability), ...]``: read as an API judge's
    reply, by ``aggregate_logprobs`` with the judge's ``threshold`` (Betley et al.); an
    answer that is not a probability distribution (a logprob > 0, a token listed twice)
    gives a ``"bad_response: ..."`` failure, as the OpenAI judge does;
  * ``None``: no number at all (a refusal): score missing, ``"low_number_mass"``, mass 0;
  * a text: a failure with that reason (``"api_error: HTTP 400: too long"``,
    ``"no_logprobs"``).
Scored and ``low_number_mass`` verdicts are cached; failures never are (a rerun asks
again) and are counted in ``failures`` by kind, as with the OpenAI judge.

What was asked is recorded: ``prompts`` (every prompt given to ``score``, in order, cached
or not), ``asked`` (the prompts answered by the underlying call ``ask``: not in the cache,
each once per ``score`` call), ``score_calls`` and ``checks``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from emguard.judge.base import DEFAULT_THRESHOLD, JudgeError, Verdict
from emguard.judge.cache import JudgeCache, cache_key
from emguard.judge.scoring import aggregate_logprobs

# A number in [0, 100] | top logprobs [(token, logprob)] | None (refusal) | a failure reason.
Canned = float | Sequence[tuple[str, float]] | None | str
DEFAULT_SCORE = 50.0  # neither misaligned (alignment < 30) nor incoherent (coherence < 50)
REASON_CHARS = 200  # a failure's reason is cut to this many characters (as the OpenAI judge)


class MockJudge:
    """Canned verdicts through the real cache; ``score(prompts) -> [Verdict]``.

    default: the canned answer for prompts no table names, or ``prompt -> canned answer``.
    by_prompt: exact judge prompt -> canned answer. by_question: text -> canned answer for
      every prompt containing the text (first match in order). See the module docstring.
    name: the name its verdicts carry (``make_judge`` uses the spec, e.g. ``"mock:30"``).
    cache: verdict cache (``None``: none); keyed on name, ``identity``, prompt, settings.
    threshold: number mass below which a score from top logprobs is missing.
    identity: what the cache key's endpoint part is; default a fingerprint of the canned
      answers (a function counts by its module and qualified name only: give ``identity``
      to tell two functions of one name apart when they share a cache file).
    check_error: ``check()`` raises ``JudgeError(check_error)`` while it is set (a judge
      whose key or endpoint is wrong); ``None``: ``check()`` passes.
    """

    def __init__(self, default: Canned | Callable[[str], Canned] = DEFAULT_SCORE, *,
                 by_prompt: Mapping[str, Canned] | None = None,
                 by_question: Mapping[str, Canned] | None = None, name: str = "mock",
                 cache: JudgeCache | None = None, threshold: float = DEFAULT_THRESHOLD,
                 identity: str | None = None, check_error: str | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise JudgeError(f"threshold must be in [0, 1], got {threshold}")
        self.by_prompt, self.by_question = dict(by_prompt or {}), dict(by_question or {})
        self.default = default
        if any(not isinstance(k, str) or not k for k in [*self.by_prompt, *self.by_question]):
            raise JudgeError("mock judge: by_prompt and by_question keys must be non-empty texts")
        if not callable(default):
            _check_canned(default, "default")
        for table, answers in (("by_prompt", self.by_prompt), ("by_question", self.by_question)):
            for text, answer in answers.items():
                _check_canned(answer, f"{table}[{_short(text, 60)!r}]")
        self.name, self.cache, self.threshold = name, cache, threshold
        self.identity = identity or self._fingerprint()
        self.check_error = check_error
        self.prompts: list[str] = []  # every prompt given to score(), in order
        self.asked: list[str] = []  # prompts answered by ask() (not from the cache)
        self.score_calls = 0
        self.checks = 0
        self.failures: Counter[str] = Counter()  # failed verdicts by reason kind

    @classmethod
    def from_spec(cls, spec: str, cache_path: str | Path | None = None, **kw: Any) -> MockJudge:
        """``"mock"`` (every prompt scores 50) or ``"mock:SCORE"`` (0..100); named ``spec``.
        ``cache_path``: SQLite verdict cache (``JudgeCache``); other arguments as ``__init__``."""
        kind, sep, rest = spec.partition(":")
        if kind != "mock":
            raise JudgeError(f"judge spec '{spec}' is not 'mock' or 'mock:SCORE'")
        score = DEFAULT_SCORE
        if sep:
            try:
                score = float(rest)
            except ValueError:
                score = math.nan
            if not 0.0 <= score <= 100.0:  # also NaN and an empty SCORE
                raise JudgeError(f"judge spec '{spec}': SCORE must be a number in 0..100 "
                                 "(e.g. 'mock:50'), or write just 'mock'")
        cache = JudgeCache(cache_path) if cache_path is not None else None
        return cls(score, name=spec, cache=cache, **kw)

    # -- the judge interface (as OpenAIJudge and LocalJudge) ---------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that changes a verdict besides the answers; part of the cache key."""
        return {"threshold": self.threshold, "answer": "canned"}

    def key(self, prompt: str) -> str:
        return cache_key(self.name, self.identity, prompt, self.settings())

    def check(self, *, reach: bool = True, timeout_s: float = 10.0) -> None:
        """Raise ``JudgeError(check_error)`` when set; counts calls in ``checks``."""
        self.checks += 1
        if self.check_error:
            raise JudgeError(self.check_error)

    def score(self, prompts: list[str]) -> list[Verdict]:
        """Verdicts for ``prompts`` (in order); cached ones are not asked again, and a
        prompt given twice in one call is asked once."""
        self.score_calls += 1
        self.prompts += prompts
        keys = [self.key(p) for p in prompts]
        done: dict[str, Verdict] = self.cache.get_many(keys) if self.cache else {}
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in done}
        for key, prompt in todo.items():
            verdict, raw = self.ask(prompt)
            if self.cache is not None and _cacheable(verdict):
                self.cache.put(key, verdict, raw=raw, prompt=prompt)
            done[key] = verdict
        return [done[k] for k in keys]

    # -- the underlying call -------------------------------------------------------------
    def answer(self, prompt: str) -> Canned:
        """The canned answer for ``prompt`` (by_prompt, then by_question, then default)."""
        if prompt in self.by_prompt:
            return self.by_prompt[prompt]
        for text, answer in self.by_question.items():
            if text in prompt:
                return answer
        if callable(self.default):
            answer = self.default(prompt)
            _check_canned(answer, f"default({_short(prompt, 60)!r})")
            return answer
        return self.default

    def ask(self, prompt: str) -> tuple[Verdict, Any]:
        """One underlying judge call (what an API request is to the OpenAI judge): the
        verdict for ``prompt`` and the raw answer the cache stores beside it."""
        self.asked.append(prompt)
        answer = self.answer(prompt)
        if answer is None:
            return Verdict(None, 0.0, "low_number_mass", self.name), None
        if isinstance(answer, str):
            return self._failed(answer), None
        if isinstance(answer, (int, float)):
            return Verdict(float(answer), 1.0, None, self.name, raw=answer), answer
        top = [tuple(pair) for pair in answer]
        try:
            score, mass = aggregate_logprobs(top, self.threshold)
        except JudgeError as e:
            return self._failed(f"bad_response: {e}"), None
        reason = None if score is not None else "low_number_mass"
        raw = [list(pair) for pair in top]
        return Verdict(score, mass, reason, self.name, raw=raw), raw

    # -- internals ---------------------------------------------------------------------
    def _failed(self, reason: str) -> Verdict:
        self.failures[reason.split(":", 1)[0]] += 1
        return Verdict(None, 0.0, _short(reason, REASON_CHARS), self.name)

    def _fingerprint(self) -> str:
        def plain(answer: Any) -> Any:
            if callable(answer):
                return f"function {getattr(answer, '__module__', '?')}." \
                       f"{getattr(answer, '__qualname__', type(answer).__qualname__)}"
            if isinstance(answer, (str, int, float)) or answer is None:
                return answer
            return [list(pair) for pair in answer]

        tables = {"default": plain(self.default),
                  "by_prompt": {k: plain(a) for k, a in self.by_prompt.items()},
                  "by_question": [[k, plain(a)] for k, a in self.by_question.items()]}
        text = json.dumps(tables, sort_keys=True, ensure_ascii=False, default=repr)
        return "mock:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_canned(answer: Any, where: str) -> None:
    """``JudgeError`` unless ``answer`` is one of the canned-answer forms (module doc)."""
    if answer is None or isinstance(answer, str):
        return
    if isinstance(answer, bool):
        raise JudgeError(f"mock judge: {where} is {answer!r}; give a score 0..100, top "
                         "logprobs, None or a failure reason")
    if isinstance(answer, (int, float)):
        if not 0.0 <= answer <= 100.0:
            raise JudgeError(f"mock judge: {where} is the score {answer!r}, not in 0..100")
        return
    if isinstance(answer, Sequence) and all(
            isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2
            for pair in answer):
        return  # tokens and logprobs are read like an API reply: broken ones = bad_response
    raise JudgeError(f"mock judge: {where} is {_short(repr(answer), 80)}; give a score 0..100, "
                     "top logprobs [(token, logprob), ...], None or a failure reason")


def _cacheable(verdict: Verdict) -> bool:
    """Scored or low number mass: a real answer. Failures are asked again next time."""
    return verdict.score is not None or verdict.reason == "low_number_mass"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
