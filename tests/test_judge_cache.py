"""SQLite verdict cache: keys, round trips, no secrets, and concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import re
import sqlite3
import threading
import time

import pytest

from emguard.judge.base import JudgeError, Verdict
from emguard.judge.cache import JudgeCache, cache_key
from emguard.judge.factory import make_judge

SETTINGS = {"top_logprobs": 20, "threshold": 0.25, "max_tokens": 1, "temperature": 0.0}


def counted_asks(monkeypatch, judge) -> list[str]:
    """Record every call of ``judge.ask`` (the mock's underlying judge call, what an API
    request is to the OpenAI judge) here, independently of the mock's own bookkeeping."""
    calls: list[str] = []
    real = judge.ask

    def ask(prompt):
        calls.append(prompt)
        return real(prompt)

    monkeypatch.setattr(judge, "ask", ask)
    return calls


def test_same_prompt_twice_is_one_underlying_call(tmp_path, monkeypatch):
    """Through ``make_judge``'s ``JudgeCache``: the second ask of a prompt, by the same judge
    or by a new one on the same file, is answered from the SQLite file."""
    path = tmp_path / "c.sqlite"
    judge = make_judge("mock:42", cache_path=path)
    calls = counted_asks(monkeypatch, judge)
    a = judge.score(["hello"])
    b = judge.score(["hello"])
    assert a == b == [Verdict(42.0, 1.0, None, "mock:42")]
    assert calls == ["hello"] and len(judge.cache) == 1
    judge.cache.close()

    fresh = make_judge("mock:42", cache_path=path)  # a new process's judge: same file
    fresh_calls = counted_asks(monkeypatch, fresh)
    assert fresh.score(["hello", "world", "hello"]) == [a[0]] * 3
    assert fresh_calls == ["world"] and len(fresh.cache) == 2  # only the new prompt asked
    fresh.cache.close()
    with JudgeCache(path) as cache:  # the verdict is in the package's file, under its key
        assert cache.get(cache_key("mock:42", fresh.identity, "hello", fresh.settings())) == a[0]


def test_without_a_cache_every_score_call_asks_again(monkeypatch):
    """The counting above can fail: with no cache each ``score`` call asks its prompts."""
    judge = make_judge("mock:42")
    calls = counted_asks(monkeypatch, judge)
    judge.score(["hello"])
    judge.score(["hello"])
    assert calls == ["hello", "hello"]


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
            cache.put(f"{worker}-{i}", Verdict(float(i % 101), 1.0, None, f"w{worker}"),
                      prompt=str(i))
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
        assert cache.get("1-199") == Verdict(199.0 % 101, 1.0, None, "w1")


def _opener(path: str, worker: int, n: int, start: float) -> None:
    """Open, write and close the file ``n`` times, starting at ``start`` (as racing runs do)."""
    while time.time() < start:
        time.sleep(0.001)
    for i in range(n):
        with JudgeCache(path) as cache:
            cache.put(f"{worker}-{i}", Verdict(50.0, 1.0, None, f"w{worker}"))
            cache.get(f"{1 - worker}-{i}")


def test_two_processes_create_and_write_a_fresh_file_at_once(tmp_path):
    """No 'database is locked': creating the file, switching it to WAL and writing all wait
    for the other process (busy timeout); with ``timeout_s=0`` this fails."""
    path = str(tmp_path / "sub" / "c.sqlite")  # neither the folder nor the file exists yet
    ctx = mp.get_context("spawn")
    start = time.time() + 3  # both start together, after the slow spawn
    procs = [ctx.Process(target=_opener, args=(path, w, 60, start)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    with JudgeCache(path) as cache:
        assert len(cache) == 120


def test_threads_with_their_own_connections_write_concurrently(tmp_path):
    path = tmp_path / "c.sqlite"
    errors = []

    def write(worker):
        try:
            with JudgeCache(path) as cache:
                for i in range(100):
                    cache.put(f"{worker}-{i}", Verdict(1.0, 1.0, None, "t"), raw=[["1", -0.1]])
        except Exception as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with JudgeCache(path) as cache:
        assert len(cache) == 400


def test_a_writer_waits_for_a_lock_and_a_too_long_lock_is_a_clear_error(tmp_path):
    path = tmp_path / "c.sqlite"
    JudgeCache(path).close()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write
    with JudgeCache(path, timeout_s=0.3) as impatient:
        with pytest.raises(JudgeError, match=r"'.*c.sqlite' stayed locked by another process "
                                             r"for more than 0.3 s.*--judge-cache"):
            impatient.put("k", Verdict(1.0, 1.0, None, "j"))
    threading.Timer(0.5, holder.execute, args=("COMMIT",)).start()
    start = time.monotonic()
    with JudgeCache(path) as patient:  # default timeout: waits for the commit
        patient.put("k", Verdict(1.0, 1.0, None, "j"))
        assert time.monotonic() - start >= 0.4 and len(patient) == 1
    holder.close()


HOW_TO_GO_ON = r"only holds cached verdicts.*move it away or delete it"


def test_a_file_that_is_not_sqlite_is_a_clear_error_and_is_left_alone(tmp_path):
    path = tmp_path / "judge_cache.sqlite"
    content = b"these are my notes, not a database\n" * 200
    path.write_bytes(content)
    with pytest.raises(JudgeError, match=rf"judge cache '{re.escape(str(path))}' is not a usable SQLite file.*"
                                         rf"{HOW_TO_GO_ON}.*judge_cache.sqlite-wal"):
        JudgeCache(path)
    with pytest.raises(JudgeError, match=HOW_TO_GO_ON):  # also through make_judge
        make_judge("openai:m@http://127.0.0.1:9/v1", cache_path=path)
    assert path.read_bytes() == content  # never overwritten


def test_a_database_of_another_schema_is_a_clear_error(tmp_path):
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE verdicts (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO verdicts VALUES ('k', 'mine')")
    conn.close()
    with pytest.raises(JudgeError, match=r"another schema \(no column\(s\) created, judge, "
                                         rf"number_mass, prompt, raw, reason, score\).*{HOW_TO_GO_ON}"):
        JudgeCache(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT * FROM verdicts").fetchall() == [("k", "mine")]
    conn.close()


@pytest.mark.parametrize("column,value", [("number_mass", "abc"), ("number_mass", 7.5),
                                          ("score", "high"), ("score", 1e9),
                                          ("judge", b"\xff\x00")])
def test_garbage_rows_are_a_clear_error(tmp_path, column, value):
    path = tmp_path / "c.sqlite"
    with JudgeCache(path) as cache:
        cache.put("good", Verdict(10.0, 0.9, None, "j"))
        cache.put("bad", Verdict(10.0, 0.9, None, "j"))
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE verdicts SET {column} = ? WHERE key = 'bad'", (value,))
    conn.close()
    with JudgeCache(path) as cache:
        assert cache.get("good") == Verdict(10.0, 0.9, None, "j")
        with pytest.raises(JudgeError, match=rf"'{re.escape(str(path))}' has a garbage row.*{HOW_TO_GO_ON}"):
            cache.get_many(["good", "bad"])


def test_raw_that_is_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "c.sqlite"
    with JudgeCache(path) as cache:
        cache.put("k", Verdict(10.0, 0.9, None, "j"), raw=[["1", -0.1]])
        cache._conn.execute("UPDATE verdicts SET raw = '{broken' WHERE key = 'k'")
        with pytest.raises(JudgeError, match=r"garbage row.*raw is not JSON"):
            cache.raw("k")


def _open_once(path: str, worker: int, start: float) -> None:
    while time.time() < start:
        time.sleep(0.0005)
    with JudgeCache(path, timeout_s=20) as cache:
        cache.put(f"{worker}", Verdict(50.0, 1.0, None, "t"))


def test_many_processes_racing_to_create_one_fresh_file(tmp_path):
    """Six processes open one new file at the same instant, five times over. SQLite answers
    the losers of the switch to WAL with "locked" without waiting; before the retry this
    failed about one open in thirty (6 of 180 in a measured run)."""
    ctx = mp.get_context("fork")
    for trial in range(5):
        path = str(tmp_path / f"t{trial}" / "c.sqlite")
        start = time.time() + 0.3
        procs = [ctx.Process(target=_open_once, args=(path, w, start)) for w in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * 6
        with JudgeCache(path) as cache:
            assert len(cache) == 6
