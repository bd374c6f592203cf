"""Judge through an OpenAI-compatible chat-completions API (OpenAI, vLLM serve, ...).

Each prompt is sent as one user message; the judge answers ONE token (temperature 0,
seed 0) and we read its top-20 logprobs (Betley et al.). Requests run concurrently
(``concurrency`` at a time); 408/409/429, 5xx, timeouts and connection errors are retried
with exponential backoff and jitter, at most ``max_attempts`` attempts per prompt. The
``openai`` client's own retries are off (``max_retries=0``) so every attempt is ours
and counted. The API key is read from an environment variable when a request is about
to be made, and is never stored or logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Literal

from tqdm.auto import tqdm

from emguard.judge.base import DEFAULT_THRESHOLD, JudgeError, Verdict
from emguard.judge.cache import JudgeCache, cache_key
from emguard.judge.scoring import aggregate_logprobs

OPENAI_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 409, 429})  # plus every status >= 500
NO_KEY = "EMPTY"  # what vLLM and other local servers accept when no key is configured
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt i (1-based) failing with a retryable error waits
    min(max_delay_s, base_delay_s * 2**(i-1)) * uniform(1 - jitter, 1 + jitter) seconds,
    or at least the server's Retry-After (capped at max_delay_s)."""

    max_attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("delays must be >= 0 and jitter in [0, 1]")

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        wait = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        wait *= rng.uniform(1 - self.jitter, 1 + self.jitter)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay_s))
        return wait


class OpenAIJudge:
    """Logprob judge over an OpenAI-compatible endpoint; ``score(prompts) -> [Verdict]``.

    model: model name on the endpoint. base_url: ``None`` = ``$OPENAI_BASE_URL`` or the OpenAI API.
    api_key_env: environment variable holding the key; ``None`` = no key needed (local
      servers; the client sends ``"EMPTY"``).
    token_param: ``"max_tokens"`` (OpenAI-compatible servers, older OpenAI models) or
      ``"max_completion_tokens"`` (newer OpenAI models reject ``max_tokens``).
    on_error: ``"raise"`` (default) raises ``JudgeError`` when a prompt fails for good;
      ``"missing"`` returns a ``Verdict(None, reason="api_error")`` for it instead.
      Failed prompts are never cached.
    """

    def __init__(self, model: str, base_url: str | None = None, *,
                 api_key_env: str | None = "OPENAI_API_KEY",
                 cache: JudgeCache | None = None, threshold: float = DEFAULT_THRESHOLD,
                 top_logprobs: int = 20, max_tokens: int = 1,
                 token_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
                 temperature: float = 0.0, seed: int | None = 0, concurrency: int = 16,
                 timeout_s: float = 60.0, retry: RetryPolicy | None = None,
                 on_error: Literal["raise", "missing"] = "raise", progress: bool = True,
                 jitter_seed: int | None = None):
        if token_param not in ("max_tokens", "max_completion_tokens"):
            raise JudgeError(f"token_param must be 'max_tokens' or 'max_completion_tokens', "
                             f"got {token_param!r}")
        if on_error not in ("raise", "missing"):
            raise JudgeError(f"on_error must be 'raise' or 'missing', got {on_error!r}")
        if concurrency < 1:
            raise JudgeError(f"concurrency must be >= 1, got {concurrency}")
        if not 1 <= top_logprobs <= 20:
            raise JudgeError(f"top_logprobs must be in 1..20, got {top_logprobs}")
        self.model, self.api_key_env = model, api_key_env
        # Resolved here (as the openai client would) so the cache key names the real endpoint.
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        self.name = f"openai:{model}"
        self.cache, self.threshold, self.top_logprobs = cache, threshold, top_logprobs
        self.max_tokens, self.token_param = max_tokens, token_param
        self.temperature, self.seed = temperature, seed
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.retry = retry or RetryPolicy()
        self.on_error, self.progress = on_error, progress
        self._rng = random.Random(jitter_seed)
        self.attempts = 0  # API requests sent by this judge (all attempts, for accounting)

    # -- public API -------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that changes a verdict; part of the cache key (never the API key)."""
        return {"top_logprobs": self.top_logprobs, "threshold": self.threshold,
                "max_tokens": self.max_tokens, "token_param": self.token_param,
                "temperature": self.temperature, "seed": self.seed}

    def key(self, prompt: str) -> str:
        return cache_key(self.name, self.base_url, prompt, self.settings())

    def score(self, prompts: list[str]) -> list[Verdict]:
        """Verdicts for ``prompts`` (in order); cached ones are not requested again."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ascore(prompts))
        raise JudgeError("OpenAIJudge.score() was called inside a running event loop; "
                         "use 'await judge.ascore(prompts)' there")

    async def ascore(self, prompts: list[str]) -> list[Verdict]:
        keys = [self.key(p) for p in prompts]
        done: dict[str, Verdict] = self.cache.get_many(keys) if self.cache else {}
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in done}
        if todo:
            done.update(await self._score_uncached(todo))
        return [done[k] for k in keys]

    # -- internals --------------------------------------------------------------------
    def _api_key(self) -> str:
        if self.api_key_env is None:
            return NO_KEY
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(
                f"judge {self.name}: environment variable {self.api_key_env} is not set "
                "(export the API key there; for a local server without a key pass "
                "api_key_env=None)")
        return key

    async def _score_uncached(self, todo: dict[str, str]) -> dict[str, Verdict]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(api_key=self._api_key(), base_url=self.base_url, max_retries=0,
                             timeout=self.timeout_s)
        limit = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(todo), desc=f"judge {self.name}", unit="prompt",
                   disable=not self.progress)

        async def one(key: str, prompt: str) -> tuple[str, Verdict]:
            async with limit:
                verdict = await self._score_one(client, key, prompt)
            bar.update(1)
            return key, verdict

        tasks = [asyncio.ensure_future(one(k, p)) for k, p in todo.items()]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one prompt failed for good: stop the others before closing
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()
            await client.close()
        return dict(results)

    async def _score_one(self, client: Any, key: str, prompt: str) -> Verdict:
        try:
            top = await self._request(client, prompt)
        except JudgeError as e:
            if self.on_error == "raise":
                raise
            log.warning("%s (scored as missing, not cached)", e)
            return Verdict(score=None, number_mass=0.0, reason="api_error", judge=self.name)
        score, mass = aggregate_logprobs(top, self.threshold)
        verdict = Verdict(score=score, number_mass=mass,
                          reason=None if score is not None else "low_number_mass", judge=self.name)
        if self.cache is not None:
            self.cache.put(key, verdict, raw=[[t, lp] for t, lp in top], prompt=prompt)
        return verdict

    async def _request(self, client: Any, prompt: str) -> list[tuple[str, float]]:
        """Top logprobs [(token, logprob)] of the first answer token, with retries."""
        import openai

        params: dict[str, Any] = {
            "model": self.model, "messages": [{"role": "user", "content": prompt}],
            self.token_param: self.max_tokens, "temperature": self.temperature,
            "logprobs": True, "top_logprobs": self.top_logprobs}
        if self.seed is not None:
            params["seed"] = self.seed
        last = "no attempt made"
        for attempt in range(1, self.retry.max_attempts + 1):
            self.attempts += 1
            try:
                response = await client.chat.completions.create(**params)
                return self._top_logprobs(response)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                last, retry_after = f"{type(e).__name__}: {e}", None
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    raise JudgeError(f"judge {self.name}: HTTP {e.status_code} (not retried): "
                                     f"{_short(e.message)}") from e
                last, retry_after = f"HTTP {e.status_code}: {_short(e.message)}", _retry_after(e)
            if attempt < self.retry.max_attempts:
                await asyncio.sleep(self.retry.delay(attempt, self._rng, retry_after))
        raise JudgeError(f"judge {self.name}: gave up after {self.retry.max_attempts} attempts; "
                         f"last error: {last}")

    def _top_logprobs(self, response: Any) -> list[tuple[str, float]]:
        choice = response.choices[0] if response.choices else None
        content = choice.logprobs.content if choice is not None and choice.logprobs else None
        if not content:
            raise JudgeError(
                f"judge {self.name}: the endpoint returned no logprobs (does it support "
                "logprobs/top_logprobs? reasoning models that answer nothing within "
                f"{self.max_tokens} token(s) cannot be used as logprob judges)")
        return [(t.token, float(t.logprob)) for t in content[0].top_logprobs]


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + "..."


def _retry_after(error: Any) -> float | None:
    value = error.response.headers.get("retry-after") if error.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
