"""OpenAI-compatible judge throughput against a local server that answers after a fixed delay.

A study judges thousands of answers per run; the judge's cost is its wall time, which its
concurrency limit bounds: with ``c`` requests in flight and a server that takes ``d``
seconds, the best possible rate is ``c / d`` judgments per second. Reported per
concurrency: judgments/s and how busy the limit was kept (rate x d / c; target >= 90 %
at the default concurrency, issue 13). The server is a threaded HTTP server on
127.0.0.1 (its own process) answering every request with the same one-token completion and its top
logprobs; no cache, so every prompt is a request.

    python benchmarks/bench_judge.py [--delay 0.05,0.5] [--concurrency 1,4,16,64]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from emguard.judge.openai_judge import OpenAIJudge

RESULTS = Path(__file__).parent / "results" / "judge.json"
TOP = [("7", math.log(0.6)), ("90", math.log(0.3)), ("I", math.log(0.1))]
REPLY = json.dumps({
    "id": "c", "object": "chat.completion", "created": 0, "model": "judge",
    "choices": [{"index": 0, "finish_reason": "length",
                 "message": {"role": "assistant", "content": "7"},
                 "logprobs": {"content": [{"token": "7", "logprob": TOP[0][1], "bytes": [55],
                                           "top_logprobs": [{"token": t, "logprob": lp,
                                                             "bytes": list(t.encode())}
                                                            for t, lp in TOP]}]}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


class DelayedServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, delay_s: float):
        super().__init__(("127.0.0.1", 0), Handler)
        self.delay_s = delay_s


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints

    def setup(self):
        super().setup()
        # headers and body go out as two writes; without TCP_NODELAY, Nagle + delayed ACK
        # stall every reply by ~40 ms (a cost of this test server, not of the judge)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):  # noqa: N802 (http.server API)
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.server.delay_s)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(REPLY)))
        self.end_headers()
        self.wfile.write(REPLY)

    def log_message(self, *args):
        pass


def serve(delay_s: float, ports) -> None:
    server = DelayedServer(delay_s)
    ports.put(server.server_address[1])
    server.serve_forever(poll_interval=0.05)


def measure(base_url: str, concurrency: int, n: int, delay_s: float) -> dict:
    judge = OpenAIJudge("judge", base_url=base_url, api_key_env=None, concurrency=concurrency,
                        progress=False)
    prompts = [f"prompt {concurrency} {i}" for i in range(n)]
    judge.score(prompts[:concurrency])  # warm-up: client, connections
    started = time.perf_counter()
    verdicts = judge.score(prompts)
    seconds = time.perf_counter() - started
    assert all(v.score is not None for v in verdicts)
    rate = n / seconds
    return {"concurrency": concurrency, "judgments": n, "seconds": round(seconds, 3),
            "judgments_per_s": round(rate, 1), "ideal_per_s": round(concurrency / delay_s, 1),
            "busy": round(rate * delay_s / concurrency, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", default="0.05,0.5", help="server seconds per request (a list)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=8, help="judgments = rounds x concurrency")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    # the server runs in its own process, so it does not share the client's interpreter lock
    ports: mp.Queue = mp.Queue()
    default = OpenAIJudge.__init__.__kwdefaults__["concurrency"]
    result = {"default_concurrency": default, "target": "busy >= 0.90 at the default concurrency",
              "by_delay": []}
    for delay in (float(x) for x in args.delay.split(",")):
        server = mp.Process(target=serve, args=(delay, ports), daemon=True)
        server.start()
        base_url = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
        rows = [measure(base_url, c, args.rounds * c, delay)
                for c in (int(x) for x in args.concurrency.split(","))]
        at_default = next((r for r in rows if r["concurrency"] == default), None)
        met = None if at_default is None else at_default["busy"] >= 0.90
        result["by_delay"].append({"delay_s": delay, "rows": rows, "met": met})
        print(f"\nOpenAI-compatible judge vs a local server answering after {delay * 1000:.0f} ms")
        print(f"{'concurrency':>11} {'judgments':>9} {'seconds':>8} {'per s':>7} {'ideal':>7} {'busy':>6}")
        for r in rows:
            print(f"{r['concurrency']:>11} {r['judgments']:>9} {r['seconds']:>8.2f} "
                  f"{r['judgments_per_s']:>7.1f} {r['ideal_per_s']:>7.1f} {r['busy']:>6.0%}")
        print(f"target (>= 90 % busy at the default concurrency {default}): "
              f"{'met' if met else 'missed' if met is False else 'not measured'}")
        server.terminate()
        server.join()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
