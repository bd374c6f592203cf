"""Judge through an OpenAI-compatible chat-completions API (OpenAI, vLLM serve, ...).

Each prompt is sent as one user message; the judge answers ONE token (temperature 0,
seed 0) and we read its top-20 logprobs (Betley et al.). Requests run concurrently
(``concurrency`` at a time); 408/409/429, 5xx, timeouts and connection errors are retried
with exponential backoff and jitter, at most ``max_attempts`` attempts per prompt. The
``openai`` client's own retries are off (``max_retries=0``) so every attempt is ours
and counted. The API key is read from an environment variable when a request is about
to be made, and is never stored or logged; server error texts are shown only with
``Bearer`` tokens and the key removed (``redact``).

What goes wrong with ONE prompt gives that prompt a missing verdict, never cached (a
rerun asks again) and counted in ``judge.failures``: a non-retryable 400/413/422 (e.g. a
prompt too long for the judge), an answer without logprobs, an unreadable answer. What
no prompt can survive raises ``JudgeError`` naming the endpoint: a rejected key (401),
an unknown model or path (404, other 4xx), retries exhausted, or an endpoint whose first
``UNUSABLE_AFTER`` answers all failed (e.g. a server without logprobs support).
``judge.check()`` tests key and endpoint before any paid request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from emguard.judge.base import DEFAULT_THRESHOLD, JudgeError, Verdict
from emguard.judge.cache import JudgeCache, cache_key
from emguard.judge.scoring import aggregate_logprobs
from emguard.redact import redact_secrets

OPENAI_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 409, 429})  # plus every status >= 500
PROMPT_STATUS = frozenset({400, 413, 422})  # not retried; this prompt only (e.g. too long)
NO_KEY = "EMPTY"  # what vLLM and other local servers accept when no key is configured
UNUSABLE_AFTER = 8  # this many failed answers and not one verdict: the endpoint is unusable
REASON_CHARS = 200  # a failed prompt's reason is cut to this many characters
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


class AnswerError(Exception):
    """One prompt got no usable answer; ``reason`` (short, redacted) goes into its Verdict."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OpenAIJudge:
    """Logprob judge over an OpenAI-compatible endpoint; ``score(prompts) -> [Verdict]``.

    model: model name on the endpoint. base_url: ``None`` = ``$OPENAI_BASE_URL`` or the OpenAI API.
    api_key_env: environment variable holding the key; ``None`` = no key needed. The OpenAI
      API needs the key; any other endpoint is sent ``"EMPTY"`` when the variable is unset
      (a local ``vllm serve`` without ``--api-key``).
    token_param: ``"max_tokens"`` (OpenAI-compatible servers, older OpenAI models) or
      ``"max_completion_tokens"`` (newer OpenAI models reject ``max_tokens``).
    on_error: ``"raise"`` (default): a failure no prompt can survive raises ``JudgeError``
      (module doc); ``"missing"``: those too give ``Verdict(None, reason="api_error: ...")``.
      Failed prompts are never cached.
    timeout_s: seconds per request.
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
        if not 0.0 <= threshold <= 1.0:
            raise JudgeError(f"threshold must be in [0, 1], got {threshold}")
        self.model, self.api_key_env = model, api_key_env
        # Resolved here (as the openai client would) so the cache key names the real endpoint.
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        self.name = f"openai:{model}"
        check_base_url(self.base_url, self.name)
        self.cache, self.threshold, self.top_logprobs = cache, threshold, top_logprobs
        self.max_tokens, self.token_param = max_tokens, token_param
        self.temperature, self.seed = temperature, seed
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.retry = retry or RetryPolicy()
        self.on_error, self.progress = on_error, progress
        self._rng = random.Random(jitter_seed)
        self.attempts = 0  # API requests sent by this judge (all attempts, for accounting)
        self.failures: Counter[str] = Counter()  # missing verdicts by reason kind ("no_logprobs")

    # -- public API -------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that changes a verdict; part of the cache key (never the API key)."""
        return {"top_logprobs": self.top_logprobs, "threshold": self.threshold,
                "max_tokens": self.max_tokens, "token_param": self.token_param,
                "temperature": self.temperature, "seed": self.seed}

    def key(self, prompt: str) -> str:
        return cache_key(self.name, self.base_url, prompt, self.settings())

    def check(self, *, reach: bool = True, timeout_s: float = 10.0) -> None:
        """Raise ``JudgeError`` unless this judge can work; sends no paid request.

        Checks that the API key is set where one is needed (the base URL was checked when
        the judge was made) and, with ``reach``, one ``GET {base_url}/models`` (``timeout_s``
        seconds, no retry): the endpoint answers, accepts the key and, when it lists
        models, lists ``model``. A listing it refuses (403, 404, ...) is only logged.
        """
        api_key = self._api_key()
        if reach:
            self._check_models(api_key, timeout_s)

    def score(self, prompts: list[str]) -> list[Verdict]:
        """Verdicts for ``prompts`` (in order); cached ones are not requested again."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no running loop: the usual case
            pass
        else:
            raise JudgeError("OpenAIJudge.score() was called inside a running event loop; "
                             "use 'await judge.ascore(prompts)' there")
        # Outside the except block, so errors do not carry that RuntimeError as their context.
        return asyncio.run(self.ascore(prompts))

    async def ascore(self, prompts: list[str]) -> list[Verdict]:
        keys = [self.key(p) for p in prompts]
        done: dict[str, Verdict] = self.cache.get_many(keys) if self.cache else {}
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in done}
        if todo:
            done.update(await self._score_uncached(todo))
        return [done[k] for k in keys]

    # -- internals --------------------------------------------------------------------
    def _where(self) -> str:
        return f"judge {self.name} at {redact(self.base_url)}"

    def _needs_key(self) -> bool:
        return urlsplit(self.base_url).hostname == urlsplit(OPENAI_URL).hostname

    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            return key
        if self.api_key_env is None or not self._needs_key():
            return NO_KEY
        raise JudgeError(
            f"judge {self.name}: environment variable {self.api_key_env} is not set; export "
            f"your OpenAI API key there ({self.api_key_env}=sk-...), or judge with an "
            "OpenAI-compatible server that needs no key: --judge openai:MODEL@http://HOST:PORT/v1")

    def _redact(self, text: str) -> str:
        return redact(text, os.environ.get(self.api_key_env) if self.api_key_env else None)

    def _check_models(self, api_key: str, timeout_s: float) -> None:
        import openai

        client = openai.OpenAI(api_key=api_key, base_url=self.base_url, max_retries=0,
                               timeout=timeout_s)
        try:
            listed = [getattr(m, "id", None) for m in (client.models.list().data or [])]
        except openai.APIConnectionError as e:  # also timeouts
            raise JudgeError(f"{self._where()}: cannot reach the endpoint ({self._failure(e)}); "
                             "is the server running at that URL?") from None
        except openai.APIStatusError as e:
            if e.status_code == 401:
                raise JudgeError(self._rejected_key(e)) from None
            log.warning("%s: GET /models answered HTTP %s; the model list was not checked",
                        self._where(), e.status_code)
            return
        except (openai.APIError, ValueError, TypeError, AttributeError) as e:
            log.warning("%s: unreadable answer to GET /models (%s); the model list was not "
                        "checked", self._where(), type(e).__name__)
            return
        finally:
            client.close()
        if listed and self.model not in listed:
            shown = ", ".join(str(m) for m in listed[:10]) + (", ..." if len(listed) > 10 else "")
            raise JudgeError(f"{self._where()}: the endpoint does not serve model "
                             f"'{self.model}'; it lists: {self._redact(shown)}")

    def _failure(self, error: BaseException) -> str:
        """``"APIConnectionError: ... ([Errno 111] Connection refused)"``, redacted."""
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        return self._redact(f"{type(error).__name__}: {error}{cause}")

    def _rejected_key(self, error: Any) -> str:
        if self.api_key_env and os.environ.get(self.api_key_env):
            hint = f"check the API key in ${self.api_key_env}"
        else:
            hint = f"the server needs an API key: export it in ${self.api_key_env or 'OPENAI_API_KEY'}"
        message = error.message.removeprefix(f"Error code: {error.status_code} - ")
        return (f"{self._where()}: HTTP {error.status_code}, the key was rejected ({hint}): "
                f"{self._redact(message)}")

    async def _score_uncached(self, todo: dict[str, str]) -> dict[str, Verdict]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(api_key=self._api_key(), base_url=self.base_url, max_retries=0,
                             timeout=self.timeout_s)
        limit = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(todo), desc=f"judge {self.name}", unit="prompt",
                   disable=not self.progress)
        tally: Counter[str] = Counter()  # this run's verdicts: "ok" or the failure's kind

        async def one(key: str, prompt: str) -> tuple[str, Verdict]:
            async with limit:
                verdict = await self._score_one(client, key, prompt)
            bar.update(1)
            self._count(verdict, tally)
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
        failed = {k: n for k, n in tally.items() if k != "ok"}
        if failed:
            log.warning("%s: %d of %d answers have no verdict (%s); they are not cached and are "
                        "asked again next time", self._where(), sum(failed.values()), len(todo),
                        ", ".join(f"{k}: {n}" for k, n in failed.items()))
        return dict(results)

    def _count(self, verdict: Verdict, tally: Counter) -> None:
        """Tally one verdict of this run; raise once the endpoint has proved unusable."""
        scored = verdict.score is not None or verdict.reason == "low_number_mass"
        kind = "ok" if scored else str(verdict.reason).split(":", 1)[0]
        tally[kind] += 1
        if scored:
            return
        self.failures[kind] += 1
        if self.on_error == "raise" and not tally["ok"] and tally.total() >= UNUSABLE_AFTER:
            hint = ("the server must support logprobs and top_logprobs in chat completions "
                    "(reasoning models that answer nothing within "
                    f"{self.max_tokens} token(s) cannot be logprob judges)"
                    if verdict.reason == "no_logprobs" else "fix the endpoint or the settings")
            raise JudgeError(f"{self._where()}: none of the first {tally.total()} answers "
                             f"could be used (last: {verdict.reason}); {hint}")

    async def _score_one(self, client: Any, key: str, prompt: str) -> Verdict:
        try:
            top, score, mass = self._read(await self._request(client, prompt))
        except AnswerError as e:
            log.warning("%s: %s (scored as missing, not cached)", self._where(), e.reason)
            return self._missing(e.reason)
        except JudgeError as e:
            if self.on_error == "raise":
                raise
            log.warning("%s (scored as missing, not cached)", e)
            return self._missing(f"api_error: {e}")
        verdict = Verdict(score=score, number_mass=mass,
                          reason=None if score is not None else "low_number_mass", judge=self.name,
                          raw=[[t, lp] for t, lp in top])
        if self.cache is not None:
            self.cache.put(key, verdict, prompt=prompt)
        return verdict

    def _missing(self, reason: str) -> Verdict:
        return Verdict(score=None, number_mass=0.0, reason=_short(reason, REASON_CHARS),
                       judge=self.name)

    async def _request(self, client: Any, prompt: str) -> Any:
        """The endpoint's answer to ``prompt``, with retries; ``AnswerError`` when this prompt
        cannot be answered, ``JudgeError`` when no prompt can (or retries ran out)."""
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
                return await client.chat.completions.create(**params)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                last, retry_after = self._failure(e), None
            except openai.APIStatusError as e:
                status = e.status_code
                message = self._redact(e.message.removeprefix(f"Error code: {status} - "))
                if status in (401, 403):
                    raise JudgeError(self._rejected_key(e)) from None
                if status in PROMPT_STATUS:
                    raise AnswerError(f"api_error: HTTP {status}: {message}") from None
                if status not in RETRY_STATUS and status < 500:
                    hint = (f" (is the model name '{self.model}' right, and does the base URL end "
                            "in /v1?)" if status == 404 else "")
                    raise JudgeError(f"{self._where()}: HTTP {status} (not retried){hint}: "
                                     f"{message}") from None
                last, retry_after = f"HTTP {status}: {message}", _retry_after(e)
            except (openai.APIError, ValueError, TypeError, AttributeError, KeyError) as e:
                raise AnswerError(f"bad_response: unreadable answer ({type(e).__name__}: "
                                  f"{self._redact(str(e))})") from None
            if attempt < self.retry.max_attempts:
                await asyncio.sleep(self.retry.delay(attempt, self._rng, retry_after))
        raise JudgeError(f"{self._where()}: gave up after {self.retry.max_attempts} attempts; "
                         f"last error: {last}")

    def _read(self, response: Any) -> tuple[list[tuple[Any, Any]], float | None, float]:
        """(top logprobs [(token, logprob)] of the first answer token, score, number mass);
        ``AnswerError`` when the answer has none or they are not valid."""
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise AnswerError("bad_response: the answer has no choices")
        content = getattr(getattr(choices[0], "logprobs", None), "content", None)
        top = getattr(content[0], "top_logprobs", None) if isinstance(content, list) and content \
            else None
        if not isinstance(top, list) or not top:
            raise AnswerError("no_logprobs")
        top = [(getattr(t, "token", None), getattr(t, "logprob", None)) for t in top]
        try:
            return top, *aggregate_logprobs(top, self.threshold)
        except JudgeError as e:
            raise AnswerError(f"bad_response: {self._redact(str(e))}") from None


def check_base_url(url: str, name: str) -> None:
    """``JudgeError`` unless ``url`` is an http(s) URL with a host (and a valid port)."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # e.g. a port that is not a number or above 65535
        ok = False
    if not ok:
        raise JudgeError(f"judge {name}: base URL '{redact(url)}' is not a valid http(s) URL; "
                         "write it like http://localhost:8000/v1")


def redact(text: str, key: str | None = None, limit: int = 300) -> str:
    """``text`` fit to show: ``Bearer`` tokens, ``key``, ``sk-...`` keys and URL passwords
    replaced by ``[redacted]``, then cut to ``limit`` characters."""
    text = str(text)
    if key:
        text = text.replace(key, "[redacted]")
    return _short(redact_secrets(text), limit)


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + "..."


def _retry_after(error: Any) -> float | None:
    value = error.response.headers.get("retry-after") if error.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
