"""LLM judges: a prompt in, a 0..100 score out (Betley et al. logprob scoring), cached.

``make_judge("openai:gpt-4o-mini", cache_path=...)`` or ``make_judge("local:MODEL")``;
then ``judge.score(prompts) -> list[Verdict]`` (emguard.judge.factory; the local backend,
which needs torch, imports lazily). An API judge's ``judge.check()`` tests key and
endpoint before anything is paid for.
"""

from emguard.judge.base import DEFAULT_THRESHOLD, Judge, JudgeError, Verdict
from emguard.judge.cache import JudgeCache, cache_key
from emguard.judge.factory import judge_name_of, make_judge
from emguard.judge.scoring import aggregate_logprobs, aggregate_probabilities, number_value

__all__ = [
    "DEFAULT_THRESHOLD", "Judge", "JudgeCache", "JudgeError", "Verdict", "aggregate_logprobs",
    "aggregate_probabilities", "cache_key", "judge_name_of", "make_judge", "number_value",
]
