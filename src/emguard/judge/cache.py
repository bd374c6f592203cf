"""On-disk cache of judge verdicts (SQLite, WAL mode: several processes may share one file).

A verdict is keyed by sha256 over (judge name, endpoint, full prompt, scoring settings):
the endpoint is the base URL of an API judge or the identity of a local model; the
settings are everything that changes the answer (top_logprobs, threshold, max tokens,
temperature, ...). API keys are never part of the key, nor stored.

Each row keeps the verdict, the raw judge output as JSON (top logprobs of an API judge,
P(0..100) of a local judge, the mock's canned answer) and the prompt, so a report can be
audited later; a cached verdict comes back with its raw output (``Verdict.raw``; ``None``
where a row holds none).

Several processes judging into one file wait for each other (busy timeout ``timeout_s``)
instead of failing with "database is locked". A file that is not such a cache (not
SQLite, another schema, garbage rows) raises ``JudgeError`` naming it: it only holds
cached verdicts, so moving it away (or deleting it) loses nothing but their cost.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from emguard.judge.base import JudgeError, Verdict

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
_COLUMNS = {"key", "judge", "score", "number_mass", "reason", "raw", "prompt", "created"}
_SQLITE_BATCH = 500  # parameters per SELECT ... IN (...)


def cache_key(judge: str, endpoint: str | None, prompt: str, settings: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of (judge, endpoint, prompt, settings)."""
    payload = json.dumps({"judge": judge, "endpoint": endpoint, "prompt": prompt,
                          "settings": dict(settings)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """Verdicts stored in one SQLite file; use as a context manager or call ``close()``.

    timeout_s: seconds to wait for another process writing the same file (busy timeout).
    Every failure of the file raises ``JudgeError`` naming it.
    """

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path, self.timeout_s = Path(path), timeout_s
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None,
                                         check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise self._error(f"cannot be opened ({e})") from None
        try:
            columns = self._prepare()
        except sqlite3.Error as e:
            self._conn.close()
            raise self._error(f"is not a usable SQLite file ({e})", e) from None
        if not _COLUMNS <= columns:
            self._conn.close()
            raise self._error(f"has a 'verdicts' table of another schema (no column(s) "
                              f"{', '.join(sorted(_COLUMNS - columns))})")

    def _prepare(self) -> set[str]:
        """Switch to WAL, create the table, return its columns. Two processes creating one
        fresh file race for the switch to WAL, where SQLite answers "locked" at once instead
        of calling the busy handler; retried (with backoff) until ``timeout_s`` has passed."""
        deadline, delay = time.monotonic() + self.timeout_s, 0.01
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute(_SCHEMA)
                return {row[1] for row in self._conn.execute("PRAGMA table_info(verdicts)")}
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 0.5)

    def _error(self, problem: str, cause: sqlite3.Error | None = None) -> JudgeError:
        """The ``JudgeError`` to raise: how to go on after a busy or a damaged file."""
        if isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause):
            return JudgeError(
                f"judge cache '{self.path}' stayed locked by another process for more than "
                f"{self.timeout_s:g} s ({cause}); run again when it is done, or give another "
                "file (emguard judge --judge-cache FILE; emguard eval judge_cache=FILE)")
        name = self.path.name
        return JudgeError(
            f"judge cache '{self.path}' {problem}. It only holds cached verdicts (nothing else "
            f"is lost without it): move it away or delete it, with any '{name}-wal' and "
            f"'{name}-shm' beside it, or give another file (emguard judge --judge-cache "
            "FILE; emguard eval judge_cache=FILE); verdicts not cached are asked for again")

    def _execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        """Rows of one statement; a failure of the file is a ``JudgeError`` naming it."""
        try:
            return self._conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as e:
            raise self._error(f"failed ({type(e).__name__}: {e})", e) from None

    def get(self, key: str) -> Verdict | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Verdict]:
        """The cached verdicts among ``keys`` (absent keys are simply not in the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Verdict] = {}
        for start in range(0, len(keys), _SQLITE_BATCH):
            chunk = keys[start:start + _SQLITE_BATCH]
            marks = ",".join("?" * len(chunk))
            rows = self._execute("SELECT key, score, number_mass, reason, judge, raw FROM "
                                 f"verdicts WHERE key IN ({marks})", chunk)
            for key, score, mass, reason, judge, raw in rows:
                if not _valid_row(score, mass, reason, judge):
                    raise self._error(f"has a garbage row (key {str(key)[:16]}...: score "
                                      f"{score!r:.40}, number_mass {mass!r:.40})")
                found[key] = Verdict(score=score, number_mass=mass, reason=reason, judge=judge,
                                     raw=self._parse_raw(str(key), raw))
        return found

    def raw(self, key: str) -> Any:
        """The raw judge output stored with a verdict (parsed JSON), or ``None``."""
        rows = self._execute("SELECT raw FROM verdicts WHERE key = ?", (key,))
        return self._parse_raw(key, rows[0][0]) if rows else None

    def _parse_raw(self, key: str, raw: Any) -> Any:
        """A row's raw column as JSON (``None``: none stored, as in rows of older files)."""
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            raise self._error(f"has a garbage row (key {key[:16]}...: raw is not JSON)") from None

    def put(self, key: str, verdict: Verdict, raw: Any = None, prompt: str | None = None) -> None:
        """Store (or replace) one verdict; committed at once (WAL: readers are not blocked).
        ``raw``: the judge's raw output (default: the verdict's own ``raw``)."""
        raw = verdict.raw if raw is None else raw
        self._execute(
            "INSERT OR REPLACE INTO verdicts (key, judge, score, number_mass, reason, raw, prompt,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, verdict.judge, verdict.score, verdict.number_mass, verdict.reason,
             None if raw is None else json.dumps(raw), prompt, time.time()))

    def __len__(self) -> int:
        return self._execute("SELECT COUNT(*) FROM verdicts")[0][0]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _valid_row(score: Any, mass: Any, reason: Any, judge: Any) -> bool:
    """A verdict row as ``put`` writes it: score None or in [0, 100], mass in [0, 1], texts."""
    number = (int, float)
    return ((score is None or isinstance(score, number) and 0 <= score <= 100)
            and isinstance(mass, number) and 0 <= mass <= 1
            and (reason is None or isinstance(reason, str)) and isinstance(judge, str))
