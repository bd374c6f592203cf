"""Credentials out of everything emguard writes or prints: one function, used everywhere.

A judge endpoint may carry a password (``openai:M@http://user:PASS@host/v1``), a query
key (``?api_key=...``) or an ``sk-...`` key pasted into a config. Every config text that
reaches a file meant to be shared (``config.yaml``, ``runs-NAME.json``, the report,
``sweep_log.jsonl``) or the terminal (validation errors) goes through ``redact_secrets``.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[redacted]"
# ://user:PASS@ keeps the user; ://TOKEN@ (no colon) is all secret
_URL_USERINFO = re.compile(r"(://(?:[^/\s@'\":]*:)?)[^/\s@'\"]+@")
_QUERY_KEY = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|password|secret|"
                        r"sig|signature)=)[^&\s'\"#]+")
_BEARER = re.compile(r"(?i)\bBearer\s+[^\s'\",}]+")
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}")  # OpenAI keys: sk-, then 40+ characters


def redact_secrets(text: str) -> str:
    """``text`` with URL user-info, key-like query parameters, ``Bearer`` tokens and
    ``sk-...`` keys replaced by ``[redacted]``."""
    text = _URL_USERINFO.sub(r"\1" + REDACTED + "@", str(text))
    text = _QUERY_KEY.sub(r"\1" + REDACTED, text)
    text = _BEARER.sub("Bearer " + REDACTED, text)
    return _SK_KEY.sub(REDACTED, text)


def redact_tree(value: Any) -> Any:
    """Every string in a JSON-like tree (dicts, lists) redacted; keys too."""
    if isinstance(value, str):
        return redact_secrets(value)
    if isinstance(value, dict):
        return {redact_secrets(k) if isinstance(k, str) else k: redact_tree(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value


def has_redacted(text: str) -> bool:
    """True when ``text`` was redacted (its credentials are not here to use)."""
    return REDACTED in str(text)
