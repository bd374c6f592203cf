"""SQLite verdict cache: keys, round trips, no secrets, and concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

from emguard.judge.base import Verdict
from emguard.judge.cache import JudgeCache, cache_key

SETTINGS = {"top_logprobs": 20, "threshold": 0.25, "max_tokens": 1, "temperature": 0.0}


class CountingJudge:
    """A real (if trivial) judge: score = len(prompt) % 101; counts what it computes."""

    name = "count:judge"

    def __init__(self, cache: JudgeCache):
        self.cache, self.calls = cache, 0

    def score(self, prompts: list[str]) -> list[Verdict]:
        out = []
        for p in prompts:
            key = cache_key(self.name, "local", p, SETTINGS)
            verdict = self.cache.get(key)
            if verdict is None:
                self.calls += 1
                verdict = Verdict(float(len(p) % 101), 1.0, None, self.name)
                self.cache.put(key, verdict, raw=[["x", -0.1]], prompt=p)
            out.append(verdict)
        return out


def test_same_prompt_twice_is_one_underlying_call(tmp_path):
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        judge = CountingJudge(cache)
        a = judge.score(["hello"])
        b = judge.score(["hello"])
        assert a == b and judge.calls == 1 and len(cache) == 1


def test_round_trip_keeps_missing_scores_and_raw(tmp_path):
    path = tmp_path / "c.sqlite"
    missing = Verdict(None, 0.1, "low_number_mass", "openai:m")
    scored = Verdict(41.25, 0.75, None, "openai:m")
    with JudgeCache(path) as cache:
        cache.put("k1", missing, raw=[["I", -0.2]], prompt="p1")
        cache.put("k2", scored)
    with JudgeCache(path) as cache:
        assert cache.get_many(["k1", "k2", "k3"]) == {"k1": missing, "k2": scored}
        assert cache.raw("k1") == [["I", -0.2]] and cache.raw("k2") is None


def test_key_changes_with_every_field():
    base = cache_key("openai:gpt-4o-mini", "https://api.openai.com/v1", "prompt", SETTINGS)
    assert base == cache_key("openai:gpt-4o-mini", "https://api.openai.com/v1", "prompt",
                             dict(reversed(list(SETTINGS.items()))))  # order-free
    variants = [
        cache_key("openai:gpt-4o", "https://api.openai.com/v1", "prompt", SETTINGS),
        cache_key("openai:gpt-4o-mini", "http://localhost:8000/v1", "prompt", SETTINGS),
        cache_key("openai:gpt-4o-mini", "https://api.openai.com/v1", "prompt ", SETTINGS),
        cache_key("openai:gpt-4o-mini", "https://api.openai.com/v1", "prompt",
                  {**SETTINGS, "top_logprobs": 5}),
        cache_key("openai:gpt-4o-mini", "https://api.openai.com/v1", "prompt",
                  {**SETTINGS, "threshold": 0.3}),
        cache_key("openai:gpt-4o-mini", "https://api.openai.com/v1", "prompt",
                  {**SETTINGS, "temperature": 1.0}),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_openai_judge_keys_depend_on_settings_not_on_the_api_key(monkeypatch, tmp_path):
    from emguard.judge.openai_judge import OpenAIJudge

    secret = "sk-never-on-disk-987654321"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    plain = OpenAIJudge("gpt-4o-mini", progress=False)
    assert plain.key("p") != OpenAIJudge("gpt-4o-mini", top_logprobs=10, progress=False).key("p")
    assert plain.key("p") != OpenAIJudge("gpt-4o-mini", threshold=0.3, progress=False).key("p")
    assert plain.key("p") != OpenAIJudge("gpt-4o-mini", base_url="http://h:1/v1",
                                         progress=False).key("p")
    monkeypatch.setenv("OPENAI_API_KEY", "another-key")
    assert plain.key("p") == OpenAIJudge("gpt-4o-mini", progress=False).key("p")
    path = tmp_path / "c.sqlite"
    with JudgeCache(path) as cache:
        cache.put(plain.key("p"), Verdict(1.0, 1.0, None, plain.name), raw=[], prompt="p")
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert all(secret.encode() not in p.read_bytes() for p in files)


def test_wal_mode(tmp_path):
    JudgeCache(tmp_path / "c.sqlite").close()
    with sqlite3.connect(tmp_path / "c.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _writer(path: str, worker: int, n: int) -> None:
    with JudgeCache(path) as cache:
        for i in range(n):
            cache.put(f"{worker}-{i}", Verdict(float(i), 1.0, None, f"w{worker}"), prompt=str(i))
            cache.get(f"{1 - worker}-{i}")


def test_two_processes_write_concurrently(tmp_path):
    path = str(tmp_path / "c.sqlite")
    JudgeCache(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 200)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    with JudgeCache(path) as cache:
        assert len(cache) == 400
        assert cache.get("1-199") == Verdict(199.0, 1.0, None, "w1")
