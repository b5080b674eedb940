"""Benchmark: the gateway's CPU per proxied request, in one process, without sockets.

The wrk runs of ``make bench`` measure the whole machine: the kernel's TCP work,
the reactor's wake-ups and the scheduler of a shared VM move their figures by
10-20 % from run to run, more than most changes to the request path are worth.
This one drives the real gateway (``build_gateway``: site, API, router, proxy,
our HTTP client, metrics, request log writing text lines to /dev/null) with
in-memory transports on both sides: a client's keep-alive connection sends the
benchmark's chat completion, the backend connection answers with a recorded
mock answer, and the time is the process's CPU time per request. What it leaves
out: reading and writing sockets and the reactor's loop (about 120 µs per
request on the benchmark machine, measured with a plain Twisted relay).

Run with ``python -m benchmarks.bench_path [--stream]``; ``run()`` returns the
numbers for a larger suite. ``--opcodes`` counts instead the Python opcodes and
C calls one request executes (under ``sys.settrace``/``sys.setprofile``, with
``--by-function`` per function): a deterministic figure to compare two versions
of the path on a machine whose speed will not hold still.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner

from nexus.config import parse_config
from nexus.endpoints import CHAT
from nexus.http_client import BackendConnection
from nexus.logs import LogDestination, make_observer
from nexus.registry import HEALTHY
from nexus.service import build_gateway

#: The body wrk's post.lua sends (benchmarks/run.py ``chat_body``), about 400 bytes.
BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You are a concise assistant; answer plainly."},
            {"role": "user", "content": "Summarise why an HTTP proxy keeps a pool of "
             "persistent connections to its upstream servers, in two short sentences."},
        ],
        "temperature": 0.7,
        "max_tokens": 128,
    }
).encode()

#: What the mock backend answers (its headers as it sends them).
ANSWER_BODY = json.dumps(
    {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1795965928,
        "model": "bench-model", "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
).encode()
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: TwistedWeb/26.10.0\r\n"
    b"Date: Sun, 29 Nov 2026 15:25:28 GMT\r\nX-Mock-Backend: mock\r\n"
    b"Connection: x-mock-hop, x-mock-backend\r\nX-Mock-Hop: 1\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(ANSWER_BODY), ANSWER_BODY)
)

STREAM_EVENTS = 50


def _stream_answer() -> bytes:
    chunks = []
    for i in range(STREAM_EVENTS):
        event = b'data: {"choices": [{"delta": {"content": "tok%d"}}]}\n\n' % i
        chunks.append(b"%x\r\n%s\r\n" % (len(event), event))
    done = b"data: [DONE]\n\n"
    chunks.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    return head + b"".join(chunks)


class _Backend(StringTransport):
    """The backend's side of one keep-alive connection: it answers every request."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer
        self.connection: BackendConnection | None = None

    def deliver(self) -> None:
        if self.io.tell():
            self.clear()
            assert self.connection is not None
            self.connection.dataReceived(self.answer)


class Path:
    """One gateway, one client connection, one backend connection; ``request()`` runs one."""

    def __init__(self, stream: bool = False) -> None:
        config, _ = parse_config(
            {
                "backends": [{"name": "b", "url": "http://127.0.0.1:9", "type": "openai",
                              "models": ["bench-model"]}],
                "health_check": {"enabled": False},
                "discovery": {"enabled": False},
            },
            "bench_path",
            environ={},
        )
        self.clock = Clock()
        self.gateway = gateway = build_gateway(config, self.clock, environ={})
        for backend in gateway.registry.backends:
            backend.status = HEALTHY
        # Text lines to /dev/null through the gateway's own observer, as under twistd -n.
        self.devnull = open(os.devnull, "w")  # kept open for the run
        globalLogBeginner.beginLoggingTo(
            [make_observer(LogDestination(self.devnull), config.logging)],
            discardBuffer=True,
            redirectStandardIO=False,
        )
        body = BODY.replace(b'"max_tokens"', b'"stream": true, "max_tokens"') if stream else BODY
        self.request_bytes = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.client = StringTransport()
        self.channel = gateway.site.buildProtocol(None)
        self.channel.makeConnection(self.client)
        # One backend connection in the pool, answered in memory.
        head = gateway.api.proxy._target(gateway.registry.backends[0], CHAT).head
        origin = head.origin
        self.backend = _Backend(_stream_answer() if stream else ANSWER)
        connection = BackendConnection(gateway.upstream.connections, origin)
        connection.makeConnection(self.backend)
        self.backend.connection = connection
        gateway.upstream.connections.put(connection)

    def request(self) -> bytes:
        """One whole request: in from the client, to the backend and back, out to the client."""
        self.channel.dataReceived(self.request_bytes)
        self.backend.deliver()
        out = self.client.value()
        self.client.clear()
        return out

    def close(self) -> None:
        self.devnull.close()


def measure(stream: bool = False, requests: int = 500, rounds: int = 20) -> dict[str, Any]:
    """CPU microseconds per request over ``rounds`` rounds of ``requests``: least and median.

    On a shared VM the CPU's speed moves by a third within seconds; noise only
    ever adds time, so the least round is the figure to compare.
    """
    path = Path(stream)
    try:
        first = path.request()
        if b" 200 OK" not in first.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"the gateway did not answer 200: {first[:300]!r}")
        for _ in range(200):  # warm up
            path.request()
        per_request = []
        gc.collect()
        for _ in range(rounds):
            start = time.process_time()
            for _ in range(requests):
                path.request()
            per_request.append((time.process_time() - start) / requests * 1e6)
        recorded = len(path.gateway.request_log.history)
        if not recorded:
            raise RuntimeError("no request was recorded")
        return {
            "stream": stream,
            "us_per_request": round(min(per_request), 1),
            "median_us": round(statistics.median(per_request), 1),
        }
    finally:
        path.close()


def count_opcodes(
    stream: bool = False, requests: int = 50, by_function: int = 0
) -> dict[str, Any]:
    """Python opcodes and C calls per request (and the functions that execute most)."""
    import collections
    import sys

    path = Path(stream)
    try:
        for _ in range(50):
            path.request()
        per_code: collections.Counter[Any] = collections.Counter()
        c_calls = 0

        def trace(frame: Any, event: str, arg: Any) -> Any:
            frame.f_trace_opcodes = True
            return opcode

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal c_calls
            if event == "c_call":
                c_calls += 1

        # Which part of the exchange runs: the phase moves on when bytes leave the gateway.
        phases = collections.Counter[str]()
        phase = "request in -> sent upstream"

        def moved(to: str, write: Callable[[bytes], None]) -> Callable[[bytes], None]:
            def write_and_move(data: bytes) -> None:
                nonlocal phase
                phase = to
                write(data)
            return write_and_move

        path.backend.write = moved("after sending upstream", path.backend.write)  # type: ignore[method-assign]
        path.client.write = moved("after replying", path.client.write)  # type: ignore[method-assign]
        deliver = path.backend.deliver

        def answer_arrives() -> None:
            nonlocal phase
            phase = "answer in -> reply sent"
            deliver()

        path.backend.deliver = answer_arrives  # type: ignore[method-assign]

        def opcode(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                per_code[frame.f_code] += 1
                phases[phase] += 1
            return opcode

        sys.setprofile(profile)
        sys.settrace(trace)
        try:
            for _ in range(requests):
                phase = "request in -> sent upstream"
                path.request()
        finally:
            sys.settrace(None)
            sys.setprofile(None)
        result: dict[str, Any] = {
            "stream": stream,
            "opcodes_per_request": round(sum(per_code.values()) / requests),
            "c_calls_per_request": round(c_calls / requests),
            # Only the first two are in a client's wait for its answer (at c1).
            "opcodes_by_phase": {name: round(n / requests) for name, n in phases.items()},
        }
        if by_function:
            result["functions"] = [
                (f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno} {code.co_name}",
                 round(n / requests))
                for code, n in per_code.most_common(by_function)
            ]
        return result
    finally:
        path.close()


def run() -> dict[str, Any]:
    """Both kinds of request, for the benchmark suite."""
    return {"chat": measure(False), "stream": measure(True, requests=100)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", action="store_true", help="a 50-event stream per request")
    parser.add_argument("--requests", type=int, default=500, help="per round (20 rounds)")
    parser.add_argument(
        "--opcodes", action="store_true", help="count opcodes and C calls per request instead"
    )
    parser.add_argument(
        "--by-function", type=int, default=0, metavar="N",
        help="with --opcodes: the N functions that execute most opcodes",
    )
    args = parser.parse_args()
    if args.opcodes:
        result = count_opcodes(args.stream, by_function=args.by_function)
    else:
        result = measure(args.stream, args.requests if not args.stream else args.requests // 5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
