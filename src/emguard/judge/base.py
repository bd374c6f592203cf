"""The judge interface: a prompt in, a 0..100 score (or a reason it is missing) out.

A judge answers each prompt with ONE number. Its score is the probability-weighted
mean over the integers 0..100 it could answer (Betley et al.); when the total
probability on those integers (``number_mass``) is below a threshold (default 0.25:
refusals, code answers) the score is missing (``None``) and ``reason`` says why.

Judges are built from specs by ``emguard.judge.factory.make_judge``; this module knows no
implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

DEFAULT_THRESHOLD = 0.25  # Betley et al.: less number mass than this = missing score


class JudgeError(RuntimeError):
    """A judge could not produce verdicts (bad spec, missing key, exhausted retries, ...)."""


@dataclass(frozen=True)
class Verdict:
    """One judgment.

    score: probability-weighted mean over integers 0..100, ``None`` = missing.
    number_mass: total probability on the integers 0..100 (in [0, 1]).
    reason: ``None`` when scored; else why not: ``"low_number_mass"`` (a real answer, cached),
      or a failure, never cached: ``"api_error: HTTP 400: ..."``, ``"no_logprobs"``,
      ``"bad_response: ..."``.
    judge: the judge's name, e.g. ``"openai:gpt-4o-mini"``.
    raw: what the judge answered, as JSON, which score and mass were read from: the top
      logprobs ``[[token, logprob], ...]`` of an API judge, P(0..100) of a local judge,
      the canned answer of the mock; ``None`` for a failure or a verdict cached before
      raw answers were kept. Not part of equality.
    """

    score: float | None
    number_mass: float
    reason: str | None
    judge: str
    raw: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "number_mass": self.number_mass, "reason": self.reason,
                "judge": self.judge}


@runtime_checkable
class Judge(Protocol):
    """Anything that scores user-message prompts; one ``Verdict`` per prompt, in order."""

    name: str

    def score(self, prompts: list[str]) -> list[Verdict]: ...
