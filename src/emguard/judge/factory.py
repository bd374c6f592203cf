"""Judges from specs: ``make_judge(spec)``, and the spec parsing a sweep needs without
building one (``judge_name_of``).

Judge specs:
  * ``openai:MODEL``            OpenAI API (key from ``$OPENAI_API_KEY``)
  * ``openai:MODEL@BASE_URL``   any OpenAI-compatible server, e.g. ``vllm serve``
                                (``openai:Qwen/Qwen2.5-32B-Instruct@http://localhost:8000/v1``;
                                the URL needs ``http://``; a server without a key needs
                                no ``$OPENAI_API_KEY``)
  * ``local:MODEL_SPEC``        a Hugging Face causal LM loaded by ``emguard.models.load_model``
  * ``mock`` / ``mock:SCORE``   canned verdicts for tests and dry runs (``emguard.judge.mock``):
                                every prompt scores SCORE (default 50); no model, no network

The local judge (torch) is imported only when a local judge is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from emguard.judge.base import Judge, JudgeError
from emguard.judge.cache import JudgeCache
from emguard.judge.mock import MockJudge
from emguard.judge.openai_judge import OpenAIJudge
from emguard.redact import has_redacted


def parse_openai_spec(rest: str) -> tuple[str, str | None]:
    """``"MODEL[@BASE_URL]"`` -> (model, base_url or None). The URL must start with http(s)://.

    Model names hold no ``'@'``, so the first ``'@'`` starts the URL (which may itself hold
    ``user:password@``). A part after ``'@'`` that looks like a server address without a
    scheme (``localhost``, a dot or ``:PORT`` in its host part) is an error, never a model name.
    """
    model, sep, url = rest.partition("@")
    if sep and "://" in url:
        if not url.lower().startswith(("http://", "https://")):
            raise JudgeError(f"judge spec 'openai:{rest}': the base URL '{url}' must start with "
                             "http:// or https://")
        if not model:
            raise JudgeError(f"judge spec 'openai:{rest}' has no model name before '@'")
        return model, url
    if sep and (not url or _looks_like_host(url)):
        example = f"http://{url or 'localhost:8000'}" + ("" if "/" in url else "/v1")
        raise JudgeError(f"judge spec 'openai:{rest}': the base URL after '@' has no http:// or "
                         f"https://; write it in full, e.g. 'openai:{model or 'MODEL'}@{example}'")
    if not rest:
        raise JudgeError("judge spec 'openai:' has no model name (e.g. 'openai:gpt-4o-mini')")
    return rest, None


def _looks_like_host(text: str) -> bool:
    """``host[:port][/path]``: 'localhost', a dot or ':digits' in the part before any '/'."""
    host = text.split("/", 1)[0].lower()
    return "." in host or host.split(":")[0] == "localhost" or re.search(r":\d+$", host) is not None


def judge_name_of(spec: str) -> str:
    """The name a judge built from ``spec`` records with its verdicts (``openai:MODEL``
    without the URL, ``local:MODEL_SPEC``), known without building it."""
    kind, _, rest = spec.partition(":")
    return f"openai:{parse_openai_spec(rest)[0]}" if kind == "openai" else spec


def make_judge(spec: str, cache_path: str | Path | None = None, **kw: Any) -> Judge:
    """Build a judge from ``"openai:MODEL[@base_url]"``, ``"local:MODEL_SPEC"`` or ``"mock[:SCORE]"``.

    ``cache_path``: SQLite file of cached verdicts (created if absent); ``None`` = no cache.
    Other keyword arguments go to ``OpenAIJudge`` / ``LocalJudge`` / ``MockJudge``.
    """
    if has_redacted(spec):
        raise JudgeError(f"judge spec '{spec}' lost its credentials: emguard redacts them in "
                         "the files it writes (config.yaml, runs-NAME.json). Give the judge "
                         "again (--judge openai:MODEL@URL), or put the URL in OPENAI_BASE_URL")
    kind, sep, rest = spec.partition(":")
    if kind == "mock":
        return MockJudge.from_spec(spec, cache_path=cache_path, **kw)
    if not sep or kind not in ("openai", "local"):
        raise JudgeError(f"judge spec '{spec}' must be 'openai:MODEL[@BASE_URL]', "
                         "'local:MODEL_SPEC' or 'mock[:SCORE]'")
    cache = None
    if cache_path is not None:
        cache = JudgeCache(cache_path)
    if kind == "openai":
        model, base_url = parse_openai_spec(rest)
        return OpenAIJudge(model, base_url=base_url, cache=cache, **kw)
    if not rest:
        raise JudgeError("judge spec 'local:' has no model spec "
                         "(e.g. 'local:Qwen/Qwen2.5-7B-Instruct')")
    from emguard.judge.local_judge import LocalJudge  # torch: only for a local judge

    return LocalJudge(rest, cache=cache, **kw)
