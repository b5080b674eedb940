"""A real ``twistd -n nexus`` process in front of mock backends that run in the test's reactor.

The fault tests talk HTTP to the gateway process the way a user's client would, keep a tally of
what their clients saw, and compare it with the gateway's own ``/metrics``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from nexus.metrics.labels import sanitize_label
from nexus.testing import MockBackend
from tests.support import TWISTD, DeadlineAgent, twistd_env, wait_for

_LISTENING = re.compile(rb"NexusSite starting on (\d+)")
#: Log text that means the gateway hit an error it did not handle.
_BAD_LOG = ("Traceback", "Unhandled", "#critical]", "#error]")


@attrs.define
class Backend:
    """One ``[[backends]]`` entry of the gateway's configuration."""

    name: str
    url: str
    models: Sequence[str] = ()
    type: str = "openai"
    priority: int = 50

    @classmethod
    def of(cls, mock: MockBackend, priority: int = 50) -> Backend:
        s = mock.settings
        return cls(s.name, mock.url, tuple(s.models), s.type, priority)


def gateway_config(
    backends: Iterable[Backend],
    *,
    request_timeout: float = 1.0,
    interval: float = 0.2,
    health_timeout: float = 5.0,
    failure_threshold: int = 3,
    recovery_threshold: int = 2,
    max_retries: int = 0,
    strategy: str = "smart",
    max_body_bytes: int | None = None,
) -> str:
    """The TOML text of a gateway listening on a free port of 127.0.0.1."""
    lines = [
        "[server]",
        'listen = "tcp:0:interface=127.0.0.1"',
        f"request_timeout_seconds = {request_timeout}",
    ]
    if max_body_bytes is not None:
        lines.append(f"max_body_bytes = {max_body_bytes}")
    lines += [
        "[health_check]",
        f"interval_seconds = {interval}",
        f"timeout_seconds = {health_timeout}",
        f"failure_threshold = {failure_threshold}",
        f"recovery_threshold = {recovery_threshold}",
        "[routing]",
        f'strategy = "{strategy}"',
        f"max_retries = {max_retries}",
    ]
    for b in backends:
        lines += [
            "[[backends]]",
            f'name = "{b.name}"',
            f'url = "{b.url}"',
            f'type = "{b.type}"',
            f"priority = {b.priority}",
            f"models = {json.dumps(list(b.models))}",
        ]
    return "\n".join(lines) + "\n"


class GatewayProcess:
    """``twistd -n nexus --config FILE`` as a child process, its log in a file.

    The log goes to a file, not a pipe: a gateway logging a lot must never block on a full pipe.
    """

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.port = 0
        self.stopped = False
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        # Every request and every body read has a deadline: a hang fails, it does not stall.
        self.agent = DeadlineAgent(Agent(reactor, pool=self.pool))

    @classmethod
    async def start(cls, directory: Path, config_text: str, *, healthy: int) -> GatewayProcess:
        """Start the gateway; return once it listens and ``healthy`` backends are healthy."""
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "nexus.toml"
        config.write_text(config_text)
        log_path = directory / "twistd.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*TWISTD, "--pidfile=", "-n", "nexus", "--config", str(config)],
                cwd=directory,
                env=twistd_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        gateway = cls(process, log_path)
        try:
            await gateway._wait_until_ready(healthy)
        except BaseException:
            gateway.kill()
            raise
        return gateway

    async def _wait_until_ready(self, healthy: int) -> None:
        def listening() -> bool:
            self.assert_alive()
            found = _LISTENING.search(self.log_path.read_bytes())
            if found:
                self.port = int(found.group(1))
            return bool(found)

        await wait_for(listening, timeout=30, what="twistd nexus listening")

        async def backends_healthy() -> bool:
            self.assert_alive()
            health = await self.health()
            return bool(health["backends"]["healthy"] == healthy)

        await wait_for(backends_healthy, timeout=30, what=f"{healthy} healthy backends")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        """The gateway process is still running (it must survive every fault)."""
        code = self.process.poll()
        assert code is None, f"the gateway exited with {code}:\n{self.log()[-5000:]}"

    def rss_kb(self) -> int:
        """Resident set size of the gateway process (VmRSS, kB)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]

    def fd_count(self) -> int:
        """Open file descriptors of the gateway process."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await self.agent.request(b"GET", (self.url + path).encode())
        body = await _read_all(response)
        return response.code, body

    async def get_json(self, path: str) -> Any:
        code, body = await self.get(path)
        assert code == 200, (path, code, body)
        return json.loads(body)

    async def health(self) -> Any:
        """``/health``'s document, whatever its status (503 while no backend is healthy)."""
        code, body = await self.get("/health")
        health = json.loads(body)
        assert code == (503 if health["status"] == "unhealthy" else 200), (code, body)
        return health

    async def metrics(self) -> Metrics:
        code, body = await self.get("/metrics")
        assert code == 200, body
        return Metrics.parse(body.decode("utf-8"))

    async def assert_no_pending(self) -> None:
        """Every backend's ``nexus_pending_requests`` returns to 0."""
        last: dict[str, float] = {}

        async def idle() -> bool:
            nonlocal last
            last = (await self.metrics()).pending()
            return bool(last) and all(v == 0 for v in last.values())

        try:
            await wait_for(idle, timeout=10, what="nexus_pending_requests back to 0")
        except AssertionError:
            raise AssertionError(f"pending requests stay at {last}") from None

    async def stop(self, whole_log: bool = True) -> None:
        """SIGTERM; the gateway must have been up until now and must shut down cleanly.

        The log is checked for errors from the start, or (``whole_log=False``, for tests that
        check their own part of the log) from the SIGTERM on.
        """
        if self.stopped:
            return  # a test that stopped it itself (and checked its own part of the log)
        self.assert_alive()
        self.stopped = True
        await self.pool.closeCachedConnections()
        since = 0 if whole_log else self.log_size()
        self.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: self.process.poll() is not None, timeout=30, what="twistd exit")
        output = self.log()
        # twistd re-raises SIGTERM on itself after a clean shutdown, hence -SIGTERM.
        assert self.process.returncode in (0, -signal.SIGTERM), output[-5000:]
        assert "Server Shut Down." in output, output[-5000:]
        self.assert_log_clean(since)

    def log_size(self) -> int:
        """Where the log ends now (for ``assert_log_clean(since=...)``)."""
        return self.log_path.stat().st_size

    def assert_log_clean(self, since: int = 0) -> None:
        """No traceback, unhandled error or critical message in the log (after ``since``)."""
        text = self.log_path.read_bytes()[since:].decode("utf-8", "replace")
        for bad in _BAD_LOG:
            at = text.find(bad)
            assert at < 0, f"the gateway logged {bad!r}:\n{text[max(0, at - 300):at + 2500]}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


# -- metrics -------------------------------------------------------------------------------------


@attrs.define
class Metrics:
    """Samples of one ``/metrics`` scrape, keyed by (name, sorted labels)."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return cls(samples)

    def _by(self, name: str, *labels: str) -> Counter[tuple[str, ...]]:
        out: Counter[tuple[str, ...]] = Counter()
        for (sample, pairs), value in self.samples.items():
            if sample == name and value:
                d = dict(pairs)
                out[tuple(d[k] for k in labels)] += int(value)
        return out

    def requests(self) -> Counter[tuple[str, ...]]:
        """``nexus_requests_total`` as {(model, backend, status): n}."""
        return self._by("nexus_requests_total", "model", "backend", "status")

    def errors(self) -> Counter[tuple[str, ...]]:
        """``nexus_errors_total`` as {(error_type, model): n}."""
        return self._by("nexus_errors_total", "error_type", "model")

    def pending(self) -> dict[str, float]:
        """``nexus_pending_requests`` as {backend: n}."""
        return {
            dict(pairs)["backend"]: value
            for (sample, pairs), value in self.samples.items()
            if sample == "nexus_pending_requests"
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Counter[Any], before: Counter[Any]) -> Counter[Any]:
    """What changed between two scrapes (counters never go down: a drop shows as negative)."""
    out: Counter[Any] = Counter()
    for key in after.keys() | before.keys():
        d = after.get(key, 0) - before.get(key, 0)
        if d:
            out[key] = d
    return out


@attrs.define
class Tally:
    """What the clients saw, in the label values the gateway must have recorded."""

    requests: Counter[tuple[str, str, str]] = attrs.field(factory=Counter)
    errors: Counter[tuple[str, str]] = attrs.field(factory=Counter)

    def add(self, model: str, seen: Seen, error_type: str | None = None) -> None:
        """Count one client request; ``model`` is the name the client asked for."""
        label = sanitize_label(model)
        self.requests[(label, seen.backend, str(seen.recorded_status))] += 1
        if seen.left:
            error_type = "client_disconnect"
        if error_type is not None:
            self.errors[(error_type, label)] += 1


async def assert_metrics_match(gateway: GatewayProcess, before: Metrics, tally: Tally) -> None:
    """``/metrics`` moved by exactly what the clients saw (polled: a client's leaving is
    noticed by the gateway a moment after the client left)."""
    got: tuple[Any, Any] = (None, None)
    want = (Counter(tally.requests), Counter(tally.errors))

    async def matches() -> bool:
        nonlocal got
        now = await gateway.metrics()
        got = (
            delta(now.requests(), before.requests()),
            delta(now.errors(), before.errors()),
        )
        return got == want

    try:
        await wait_for(matches, timeout=10, what="metrics matching the clients' tally")
    except AssertionError:
        raise AssertionError(
            f"/metrics moved by\n  requests {dict(got[0])}\n  errors   {dict(got[1])}\n"
            f"the clients saw\n  requests {dict(want[0])}\n  errors   {dict(want[1])}"
        ) from None


# -- a client that records what it saw -----------------------------------------------------------


@attrs.define
class Seen:
    """One response as the client saw it."""

    status: int
    headers: Headers
    body: bytes
    #: The client went away before the response ended (the gateway must record 499).
    left: bool = False

    @property
    def backend(self) -> str:
        """The ``x-nexus-backend`` header (``none`` when the gateway chose no backend)."""
        values = self.headers.getRawHeaders(b"x-nexus-backend")
        return values[0].decode() if values else "none"

    @property
    def recorded_status(self) -> int:
        return 499 if self.left else self.status

    def error(self) -> dict[str, Any]:
        """The contract's error body of a non-2xx answer (shape checked)."""
        assert self.headers.getRawHeaders(b"content-type") == [b"application/json"], self
        body = json.loads(self.body)
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return dict(body["error"])

    def events(self) -> list[bytes]:
        """The SSE events of a stream, without their blank-line terminators."""
        assert self.headers.getRawHeaders(b"content-type") == [b"text/event-stream"], self
        parts = self.body.split(b"\n\n")
        assert parts[-1] == b"", f"the stream ends inside an event: {self.body[-200:]!r}"
        return parts[:-1]

    def stream_error(self) -> dict[str, Any] | None:
        """Check a stream's clean end and return its error event, if it has one.

        A clean end is ``data: [DONE]`` exactly once, last, with at most one error event,
        right before it.
        """
        events = self.events()
        assert events and events[-1] == b"data: [DONE]", events[-3:]
        assert events.count(b"data: [DONE]") == 1, events[-3:]
        errors = [e for e in events if e.startswith(b'data: {"error"')]
        assert len(errors) <= 1, errors
        if not errors:
            return None
        assert events[-2] == errors[0], events[-3:]
        body = json.loads(errors[0][len(b"data: "):])
        assert set(body) == {"error"} and set(body["error"]) == {
            "message", "type", "param", "code"
        }, body
        return dict(body["error"])


class _Collect(Protocol):
    """Collects a body; leaves (closes the connection) after ``leave_after`` SSE events."""

    def __init__(self, done: Deferred[tuple[bytes, bool]], leave_after: int | None) -> None:
        self.done = done
        self.leave_after = leave_after
        self.chunks: list[bytes] = []
        self.events = 0
        self.left = False

    def dataReceived(self, data: bytes) -> None:
        if self.left:
            return
        self.chunks.append(data)
        if self.leave_after is None:
            return
        self.events += data.count(b"\n\n")
        if self.events >= self.leave_after:
            self.left = True
            self.done.callback((b"".join(self.chunks), True))
            assert self.transport is not None
            self.transport.stopProducing()  # closes the connection: the client is gone

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback((b"".join(self.chunks), False))
        else:
            self.done.errback(reason)


async def _read_all(response: Any) -> bytes:
    done: Deferred[tuple[bytes, bool]] = Deferred()
    response.deliverBody(_Collect(done, None))
    body, _ = await done
    return body


def chat_body(model: str, stream: bool = False, **fields: Any) -> bytes:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    if stream:
        payload["stream"] = True
    return json.dumps(payload).encode()


async def chat(
    gateway: GatewayProcess,
    model: str,
    stream: bool = False,
    leave_after: int | None = None,
    agent: DeadlineAgent | None = None,
) -> Seen:
    """POST one chat completion; with ``leave_after`` the client leaves after that many events.

    ``agent`` (the gateway's own by default) bounds the wait for the answer and for its body.
    """
    return await post(gateway, "/v1/chat/completions", chat_body(model, stream),
                      leave_after=leave_after, agent=agent)


async def post(
    gateway: GatewayProcess,
    path: str,
    body: bytes,
    leave_after: int | None = None,
    agent: DeadlineAgent | None = None,
) -> Seen:
    """POST ``body`` to ``path``; with ``leave_after`` the client leaves after that many events."""
    response = await (agent or gateway.agent).request(
        b"POST",
        (gateway.url + path).encode(),
        Headers({b"content-type": [b"application/json"]}),
        FileBodyProducer(BytesIO(body)),
    )
    done: Deferred[tuple[bytes, bool]] = Deferred()
    response.deliverBody(_Collect(done, leave_after))
    body, left = await done
    return Seen(response.code, response.headers, body, left)


async def many(n: int, make: Any, concurrency: int = 50) -> list[Any]:
    """Run ``make()`` (a coroutine factory) ``n`` times, at most ``concurrency`` at once."""
    from twisted.internet.defer import ensureDeferred

    sem = DeferredSemaphore(concurrency)
    return list(
        await gatherResults(
            [sem.run(lambda: ensureDeferred(make())) for _ in range(n)], consumeErrors=True
        )
    )
