"""On-disk cache of judge verdicts (SQLite, WAL mode: several processes may share one file).

A verdict is keyed by sha256 over (judge name, endpoint, full prompt, scoring settings):
the endpoint is the base URL of an API judge or the identity of a local model; the
settings are everything that changes the answer (top_logprobs, threshold, max tokens,
temperature, ...). API keys are never part of the key, nor stored.

Each row keeps the verdict, the raw judge output as JSON (top logprobs of an API judge,
P(0..100) of a local judge) and the prompt, so a report can be audited later.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from emguard.judge.base import Verdict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    score REAL,
    number_mass REAL NOT NULL,
    reason TEXT,
    raw TEXT,
    prompt TEXT,
    created REAL NOT NULL
)
"""
_SQLITE_BATCH = 500  # parameters per SELECT ... IN (...)


def cache_key(judge: str, endpoint: str | None, prompt: str, settings: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of (judge, endpoint, prompt, settings)."""
    payload = json.dumps({"judge": judge, "endpoint": endpoint, "prompt": prompt,
                          "settings": dict(settings)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """Verdicts stored in one SQLite file; use as a context manager or call ``close()``."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise RuntimeError(f"judge cache '{self.path}' is not a usable SQLite file: {e}") from e

    def get(self, key: str) -> Verdict | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Verdict]:
        """The cached verdicts among ``keys`` (absent keys are simply not in the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Verdict] = {}
        for start in range(0, len(keys), _SQLITE_BATCH):
            chunk = keys[start:start + _SQLITE_BATCH]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                "SELECT key, score, number_mass, reason, judge FROM verdicts "
                f"WHERE key IN ({marks})", chunk).fetchall()
            for key, score, mass, reason, judge in rows:
                found[key] = Verdict(score=score, number_mass=mass, reason=reason, judge=judge)
        return found

    def raw(self, key: str) -> Any:
        """The raw judge output stored with a verdict (parsed JSON), or ``None``."""
        row = self._conn.execute("SELECT raw FROM verdicts WHERE key = ?", (key,)).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    def put(self, key: str, verdict: Verdict, raw: Any = None, prompt: str | None = None) -> None:
        """Store (or replace) one verdict; committed at once (WAL: readers are not blocked)."""
        self._conn.execute(
            "INSERT OR REPLACE INTO verdicts (key, judge, score, number_mass, reason, raw, prompt,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, verdict.judge, verdict.score, verdict.number_mass, verdict.reason,
             None if raw is None else json.dumps(raw), prompt, time.time()))

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
