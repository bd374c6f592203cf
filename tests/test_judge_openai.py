"""OpenAI judge against a real HTTP server on 127.0.0.1 speaking /v1/chat/completions,
called through the real ``openai`` client (no mocks of the client or of HTTP)."""

from __future__ import annotations

import json
import math
import random
import re
import socket
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emguard.judge.base import Judge, JudgeError
from emguard.judge.cache import JudgeCache
from emguard.judge.factory import make_judge
from emguard.judge.openai_judge import UNUSABLE_AFTER, OpenAIJudge, RetryPolicy

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
    """Serves scripted (status, body) replies first, then ``reply``; logs requests.

    A body is JSON, or bytes sent as they are. ``GET /v1/models`` lists ``models`` (or
    answers the (status, body) given there). With ``key`` set, a request without
    ``Bearer <key>`` gets a 401 whose body echoes the Authorization header, as some do.
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: deque[tuple[int, dict | bytes]] = deque()
        self.reply: dict | bytes = completion(TOP)
        self.models: list[str] | tuple[int, dict] = ["judge-model", "org/judge-model"]
        self.key: str | None = None
        self.requests: list[dict] = []
        self.gets: list[str] = []
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
            if self.unauthorized():
                return
            status, reply = server.script.popleft() if server.script else (200, server.reply)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        time.sleep(server.delay_s)
        with server.lock:
            server.in_flight -= 1
        if status == 0:  # scripted stall: answer normally, but only after the client timed out
            time.sleep(reply["sleep"])
            status, reply = 200, completion(TOP)
        self.send(status, reply)

    def do_GET(self):  # noqa: N802 (http.server API)
        server: FakeOpenAI = self.server  # type: ignore[assignment]
        server.gets.append(self.path)
        if self.unauthorized():
            return
        if self.path != "/v1/models":
            self.send(*error(404, f"no route {self.path}"))
        elif isinstance(server.models, tuple):
            self.send(*server.models)
        else:
            self.send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "test"}
                for m in server.models]})

    def unauthorized(self) -> bool:
        key, auth = self.server.key, self.headers.get("Authorization")  # type: ignore[attr-defined]
        if key is None or auth == f"Bearer {key}":
            return False
        self.send(*error(401, f"Incorrect API key provided. Request header: Authorization: {auth}"))
        return True

    def send(self, status: int, reply: dict | bytes) -> None:
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
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


@contextmanager
def serving():
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        thread.join(timeout=5)
        srv.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, SECRET)
    with serving() as srv:
        yield srv


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        where = re.escape(f"judge openai:judge-model at {server.base_url}")
        with pytest.raises(JudgeError, match=rf"{where}: gave up after 3 attempts.*HTTP 500"):
            judge.score(["p"])
        assert len(server.requests) == FAST.max_attempts
        assert len(cache) == 0
        # The storm is over: a rerun works and is cached.
        assert judge.score(["p"])[0].score == pytest.approx(SCORE)
        assert len(cache) == 1


def test_one_prompt_400_is_missing_not_cached_and_the_study_goes_on(server, tmp_path):
    server.script.append(error(400, "This model's maximum context length is 4096 tokens"))
    with JudgeCache(tmp_path / "cache.sqlite") as cache:
        judge = judge_for(server, cache=cache, concurrency=1)  # the first prompt gets the 400
        long, short = judge.score(["long prompt", "short prompt"])
        assert long.score is None and long.number_mass == 0.0
        assert long.reason == "api_error: HTTP 400: This model's maximum context length is 4096 tokens"
        assert short.score == pytest.approx(SCORE)
        assert len(server.requests) == 2 and judge.attempts == 2  # a 400 is not retried
        assert judge.failures == {"api_error": 1}
        assert len(cache) == 1  # the error is not a verdict: a rerun asks again ...
        assert judge.score(["long prompt"])[0].score == pytest.approx(SCORE)  # ... and gets one
        assert len(server.requests) == 3 and len(cache) == 2


def test_a_400_on_every_prompt_stops_early_with_a_clear_error(server):
    server.script.extend([error(400, "Unsupported parameter: 'max_tokens'")] * 50)
    judge = judge_for(server, concurrency=2)
    where = re.escape(f"judge openai:judge-model at {server.base_url}")
    with pytest.raises(JudgeError, match=rf"{where}: none of the first {UNUSABLE_AFTER} answers "
                                         r"could be used \(last: api_error: HTTP 400: Unsupported"):
        judge.score([f"p{i}" for i in range(40)])
    assert len(server.requests) < 40 // 2  # stopped, not 40 useless requests
    # on_error="missing" never raises for failed prompts: every one is missing.
    verdicts = judge_for(server, on_error="missing", concurrency=4).score(
        [f"q{i}" for i in range(UNUSABLE_AFTER + 2)])
    assert all(v.score is None and v.reason.startswith("api_error: HTTP 400") for v in verdicts)


def no_logprobs() -> dict:
    reply = completion(TOP)
    reply["choices"][0]["logprobs"] = None
    return reply


def no_top_logprobs() -> dict:
    reply = completion(TOP)
    del reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return reply


def nan_logprob() -> dict:
    reply = completion(TOP)
    reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] = math.nan
    return reply


@pytest.mark.parametrize("reply,reason", [
    (no_logprobs(), "no_logprobs"),
    (no_top_logprobs(), "no_logprobs"),
    ({**completion(TOP), "choices": []}, "bad_response: the answer has no choices"),
    (b"<html>502 Bad Gateway</html>", "bad_response: unreadable answer"),
    (b"[1, 2]", "bad_response: the answer has no choices"),
    (nan_logprob(), "bad_response: logprob nan of token '7' is not a log probability"),
])
def test_malformed_answer_is_a_missing_verdict_with_a_reason(server, tmp_path, reply, reason):
    server.script.append((200, reply))
    with JudgeCache(tmp_path / "cache.sqlite") as cache:
        judge = judge_for(server, cache=cache, concurrency=1)
        bad, good = judge.score(["first", "second"])
        assert bad.score is None and bad.reason.startswith(reason) and bad.number_mass == 0.0
        assert good.score == pytest.approx(SCORE)
        assert len(cache) == 1 and judge.failures == {reason.split(":")[0]: 1}


def test_server_without_logprobs_is_a_clear_error_naming_it(server):
    server.reply = no_logprobs()
    with pytest.raises(JudgeError) as info:
        judge_for(server, concurrency=3).score([f"p{i}" for i in range(30)])
    message = str(info.value)
    assert f"judge openai:judge-model at {server.base_url}" in message
    assert "must support logprobs and top_logprobs" in message
    assert len(server.requests) < 30


def test_server_error_text_is_redacted_everywhere(server, tmp_path, caplog):
    echo = (f"bad request; headers: Authorization: Bearer {SECRET} X-Other: Bearer abc.DEF-123 "
            f"key={SECRET} " + "x" * 2000)
    server.script.extend([error(400, echo)] + [error(500, echo)] * FAST.max_attempts)
    path = tmp_path / "cache.sqlite"
    with JudgeCache(path) as cache:
        judge = judge_for(server, cache=cache, concurrency=1)
        verdict = judge.score(["p"])[0]
        with pytest.raises(JudgeError) as info:
            judge.score(["q"])
        judge.score(["r"])  # a verdict in the file, next to the failures' traces
    shown = [verdict.reason, str(info.value), "".join(traceback.format_exception(info.value)),
             caplog.text]
    for text in shown:
        assert SECRET not in text and "abc.DEF-123" not in text and "Bearer [redacted]" in text
    assert len(verdict.reason) <= 210 and len(str(info.value)) < 600
    assert SECRET.encode() not in path.read_bytes()


def test_missing_key_for_the_openai_api_names_the_variable_and_real_options(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    judge = OpenAIJudge("gpt-4o-mini", api_key_env=KEY_ENV, progress=False)
    for call in (lambda: judge.check(), lambda: judge.score(["p"])):  # no request is made
        with pytest.raises(JudgeError) as info:
            call()
        message = str(info.value)
        assert f"environment variable {KEY_ENV} is not set" in message
        assert "--judge openai:MODEL@http://HOST:PORT/v1" in message
        assert "api_key_env" not in message  # not an option a CLI user has


def test_keyless_local_server_gets_a_placeholder_key(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    judge = judge_for(server)
    judge.check()
    assert judge.score(["p"])[0].score == pytest.approx(SCORE)
    assert server.requests[0]["auth"] == "Bearer EMPTY"


def test_server_that_needs_a_key_says_so(server, monkeypatch):
    server.key = SECRET
    monkeypatch.delenv(KEY_ENV)
    for call in (lambda: judge_for(server).check(), lambda: judge_for(server).score(["p"])):
        with pytest.raises(JudgeError, match=rf"HTTP 401.*the server needs an API key: export it "
                                             rf"in \${KEY_ENV}"):
            call()
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-000000")
    with pytest.raises(JudgeError, match=rf"check the API key in \${KEY_ENV}") as info:
        judge_for(server).score(["p"])
    assert "sk-wrong-key-000000" not in "".join(traceback.format_exception(info.value))
    monkeypatch.setenv(KEY_ENV, SECRET)
    assert judge_for(server).score(["p"])[0].score == pytest.approx(SCORE)


def test_check_passes_on_a_good_endpoint_without_a_completion(server):
    judge_for(server).check()
    assert server.gets == ["/v1/models"] and server.requests == []


def test_check_finds_a_model_the_server_does_not_serve(server):
    judge = OpenAIJudge("judge-modle", base_url=server.base_url, api_key_env=KEY_ENV,
                        progress=False)
    with pytest.raises(JudgeError, match=r"does not serve model 'judge-modle'; it lists: "
                                         r"judge-model, org/judge-model"):
        judge.check()
    assert server.requests == []


def test_check_tolerates_a_server_without_a_model_list(server):
    server.models = error(404, "Not Found")
    judge_for(server).check()
    assert server.gets == ["/v1/models"]


def test_check_names_an_unreachable_endpoint_and_reach_false_skips_it(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv(KEY_ENV, raising=False)
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = OpenAIJudge("m", base_url=url, api_key_env=KEY_ENV, progress=False)
    start = time.monotonic()
    with pytest.raises(JudgeError, match=rf"judge openai:m at {re.escape(url)}: cannot reach the "
                                         r"endpoint .*is the server running"):
        judge.check(timeout_s=2.0)
    assert time.monotonic() - start < 5
    judge.check(reach=False)  # key and URL are fine; nothing is sent


def test_make_judge_then_check_with_a_password_in_the_url(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    judge = make_judge(f"openai:m@http://user:pa55word@127.0.0.1:{free_port()}/v1",
                       progress=False)
    assert judge.model == "m"
    with pytest.raises(JudgeError) as info:
        judge.check(timeout_s=2.0)
    assert "pa55word" not in str(info.value) and "user:[redacted]@127.0.0.1" in str(info.value)


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
    # the raw reply: the top logprobs read, the same from the API and from the cache
    assert first[0].raw and all(isinstance(t, str) and lp <= 0 for t, lp in first[0].raw)
    assert [v.raw for v in again] == [v.raw for v in first]
    assert SECRET.encode() not in path.read_bytes()


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
    # the retried request must answer within timeout_s: 0.8 s leaves room on a loaded
    # 2-core CI machine (0.1 s once timed out twice there while other tests ran)
    server.script.append((0, {"sleep": 2.0}))
    judge = judge_for(server, timeout_s=0.8)
    assert judge.score(["p"])[0].score == pytest.approx(SCORE)
    assert judge.attempts == 2 and len(server.requests) == 2


def test_connection_refused_is_retried_then_clear_error(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, SECRET)
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = OpenAIJudge("m", base_url=url, api_key_env=KEY_ENV, retry=FAST, progress=False)
    with pytest.raises(JudgeError, match=rf"at {re.escape(url)}: gave up after 3 attempts.*"
                                         "APIConnectionError"):
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


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
ENTRY = st.fixed_dictionaries({}, optional={
    "token": st.one_of(st.sampled_from(["0", "7", " 7", "42", "100", "101", "I"]), JSON_VALUES),
    "logprob": st.one_of(st.floats(-50, 0), JSON_VALUES)})
LOGPROBS = st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
    "content": st.one_of(JSON_VALUES, st.lists(st.fixed_dictionaries({}, optional={
        "token": JSON_VALUES, "logprob": JSON_VALUES,
        "top_logprobs": st.one_of(JSON_VALUES, st.lists(ENTRY, max_size=8))}), max_size=2)),
}))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(logprobs=LOGPROBS)
def test_any_answer_gives_a_valid_verdict_never_an_exception(server, logprobs):
    """Whatever a server puts in ``logprobs``, one prompt gets a valid Verdict."""
    reply = completion(TOP)
    reply["choices"][0]["logprobs"] = logprobs
    server.reply = reply
    verdict = judge_for(server).score(["p"])[0]
    assert 0.0 <= verdict.number_mass <= 1.0
    assert verdict.score is None or 0.0 <= verdict.score <= 100.0
    assert (verdict.score is None) == (verdict.reason is not None)
