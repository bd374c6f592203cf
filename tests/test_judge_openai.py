"""OpenAI judge against a real HTTP server on 127.0.0.1 speaking /v1/chat/completions,
called through the real ``openai`` client (no mocks of the client or of HTTP)."""

from __future__ import annotations

import json
import math
import random
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from emguard.judge.base import Judge, JudgeError, make_judge
from emguard.judge.cache import JudgeCache
from emguard.judge.openai_judge import OpenAIJudge, RetryPolicy

KEY_ENV = "EMGUARD_TEST_JUDGE_KEY"
SECRET = "sk-test-secret-0123456789"
# Top logprobs the server answers with: numbers, a duplicate of 7, non-numbers, >100.
TOP = [("7", math.log(0.30)), (" 7", math.log(0.10)), ("90", math.log(0.20)),
       ("I", math.log(0.15)), ("150", math.log(0.05)), ("-5", math.log(0.05)),
       ("100", math.log(0.10)), ("0", math.log(0.05))]
# By hand: numbers 0..100 are 7 (0.30 + 0.10), 90 (0.20), 100 (0.10), 0 (0.05).
MASS = 0.75
SCORE = (7 * 0.40 + 90 * 0.20 + 100 * 0.10 + 0 * 0.05) / MASS  # = 41.0666...
FAST = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.01)


def completion(top):
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": top[0][0]},
                         "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


class FakeOpenAI(ThreadingHTTPServer):
    """Serves scripted (status, body) replies first, then ``completion(TOP)``; logs requests."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: deque[tuple[int, dict]] = deque()
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.delay_s = 0.0  # every reply waits this long (concurrency test)
        self.in_flight = self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        server: FakeOpenAI = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"path": self.path, "body": body,
                                    "auth": self.headers.get("Authorization")})
            status, reply = server.script.popleft() if server.script else (200, completion(TOP))
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        time.sleep(server.delay_s)
        with server.lock:
            server.in_flight -= 1
        if status == 0:  # scripted stall: answer normally, but only after the client timed out
            time.sleep(reply["sleep"])
            status, reply = 200, completion(TOP)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


def error(status: int, message: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "test", "code": None}}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.shutdown()
    thread.join(timeout=5)
    srv.server_close()


def judge_for(server, cache=None, **kw) -> OpenAIJudge:
    kw.setdefault("retry", FAST)
    return OpenAIJudge("judge-model", base_url=server.base_url, api_key_env=KEY_ENV, cache=cache,
                       progress=False, **kw)


def test_scores_equal_hand_computation_and_request_is_betley_style(server):
    verdicts = judge_for(server).score(["prompt A", "prompt B"])
    assert [v.score for v in verdicts] == [pytest.approx(SCORE)] * 2
    assert all(v.number_mass == pytest.approx(MASS) and v.reason is None for v in verdicts)
    assert verdicts[0].judge == "openai:judge-model"
    assert len(server.requests) == 2
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["messages"][0]["role"] == "user"
    assert {m["messages"][0]["content"] for m in (r["body"] for r in server.requests)} == \
        {"prompt A", "prompt B"}
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"],
            body["seed"]) == (1, 0.0, True, 20, 0)
    assert "max_completion_tokens" not in body


def test_concurrency_limit_is_respected(server):
    server.delay_s = 0.3
    verdicts = judge_for(server, concurrency=2).score([f"p{i}" for i in range(6)])
    assert len(verdicts) == 6 and len(server.requests) == 6
    assert server.max_in_flight == 2  # concurrent, but never more than the limit


def test_max_completion_tokens_setting(server):
    judge_for(server, token_param="max_completion_tokens").score(["p"])
    body = server.requests[0]["body"]
    assert body["max_completion_tokens"] == 1 and "max_tokens" not in body


def test_low_mass_is_missing(server):
    server.script.append((200, completion([("I", math.log(0.76)), ("50", math.log(0.24))])))
    verdict = judge_for(server).score(["refusal"])[0]
    assert verdict.score is None and verdict.reason == "low_number_mass"
    assert verdict.number_mass == pytest.approx(0.24)


def test_429_then_success_is_retried(server):
    server.script.append(error(429, "Rate limit reached"))
    judge = judge_for(server)
    verdict = judge.score(["p"])[0]
    assert verdict.score == pytest.approx(SCORE)
    assert len(server.requests) == 2 and judge.attempts == 2


def test_500_storm_exhausts_retries_and_caches_nothing(server, tmp_path):
    for _ in range(FAST.max_attempts):
        server.script.append(error(500, "upstream exploded"))
    with JudgeCache(tmp_path / "cache.sqlite") as cache:
        judge = judge_for(server, cache=cache)
        with pytest.raises(JudgeError, match=r"3 attempts.*HTTP 500"):
            judge.score(["p"])
        assert len(server.requests) == FAST.max_attempts
        assert len(cache) == 0
        # The storm is over: a rerun works and is cached.
        assert judge.score(["p"])[0].score == pytest.approx(SCORE)
        assert len(cache) == 1


def test_non_retryable_400_fails_at_once_or_is_missing(server):
    server.script.append(error(400, "Unsupported parameter: 'max_tokens'"))
    with pytest.raises(JudgeError, match=r"HTTP 400.*max_tokens"):
        judge_for(server).score(["p"])
    assert len(server.requests) == 1
    server.script.append(error(400, "content filter"))
    verdict = judge_for(server, on_error="missing").score(["p"])[0]
    assert verdict.score is None and verdict.reason == "api_error"


def test_rerun_with_cache_makes_zero_requests(server, tmp_path):
    path = tmp_path / "cache.sqlite"
    prompts = ["one", "two", "one"]
    with JudgeCache(path) as cache:
        first = judge_for(server, cache=cache).score(prompts)
    assert len(server.requests) == 2  # the duplicate prompt is asked once
    with JudgeCache(path) as cache:  # a fresh process would see the same file
        again = judge_for(server, cache=cache).score(prompts)
    assert len(server.requests) == 2
    assert again == first
    assert SECRET.encode() not in path.read_bytes()


def test_missing_api_key_fails_before_any_request(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=KEY_ENV):
        judge_for(server).score(["p"])
    assert server.requests == []


def test_no_key_option_for_local_servers(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    judge = OpenAIJudge("judge-model", base_url=server.base_url, api_key_env=None, progress=False)
    assert judge.score(["p"])[0].score == pytest.approx(SCORE)
    assert server.requests[0]["auth"] == "Bearer EMPTY"


def test_make_judge_parses_spec_with_base_url(server, tmp_path):
    judge = make_judge(f"openai:org/judge-model@{server.base_url}", tmp_path / "c.sqlite",
                       api_key_env=KEY_ENV, retry=FAST, progress=False)
    assert judge.name == "openai:org/judge-model" and isinstance(judge, Judge)
    assert judge.score(["p"])[0].score == pytest.approx(SCORE)
    assert server.requests[0]["body"]["model"] == "org/judge-model"
    with pytest.raises(JudgeError, match="must be"):
        make_judge("anthropic:claude")


def test_score_inside_running_loop_is_a_clear_error(server):
    import asyncio

    judge = judge_for(server)

    async def inside():
        with pytest.raises(JudgeError, match="ascore"):
            judge.score(["p"])
        return await judge.ascore(["p"])

    assert asyncio.run(inside())[0].score == pytest.approx(SCORE)


def test_timeout_then_success_is_retried(server):
    server.script.append((0, {"sleep": 0.5}))
    judge = judge_for(server, timeout_s=0.1)
    assert judge.score(["p"])[0].score == pytest.approx(SCORE)
    assert judge.attempts == 2 and len(server.requests) == 2


def test_connection_refused_is_retried_then_clear_error(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, SECRET)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge("m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV,
                        retry=FAST, progress=False)
    with pytest.raises(JudgeError, match=r"3 attempts.*APIConnectionError"):
        judge.score(["p"])
    assert judge.attempts == FAST.max_attempts


def test_backoff_is_exponential_with_bounded_jitter():
    policy = RetryPolicy(max_attempts=6, base_delay_s=1.0, max_delay_s=10.0, jitter=0.5)
    rng = random.Random(0)
    for attempt, nominal in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0)]:
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert nominal * 0.5 <= min(delays) and max(delays) <= nominal * 1.5
        assert max(delays) - min(delays) > 0.5 * nominal  # jitter is really applied
    assert policy.delay(1, rng, retry_after=7.0) >= 7.0  # Retry-After is honoured ...
    assert policy.delay(1, rng, retry_after=99.0) <= 10.0  # ... up to the cap
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
