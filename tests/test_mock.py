"""The mock inference backend, over real HTTP on 127.0.0.1 with the real reactor."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseFailed, ResponseNeverReceived

from nexus.testing import (
    ENDPOINTS,
    FAIL_MODES,
    HUGE_LENGTH,
    MISSING_ENDPOINT_STATUSES,
    STREAM_FRAMINGS,
    MockBackend,
    MockSettings,
    Options,
    answer_text,
    embedding_vector,
    listen_mock,
    makeService,
    stream_pieces,
)
from tests.support import CLIENT_DEADLINE, TWISTD, deadline, http_client, twistd_env, wait_for

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
MESSAGES = [{"role": "user", "content": "hi"}]


# -- helpers ---------------------------------------------------------------------------------


def mock_timers() -> list[Any]:
    """Delayed calls scheduled by nexus.testing (a leak if any remain once a request is over)."""
    return [
        c
        for c in reactor.getDelayedCalls()
        if getattr(c.func, "__module__", "").startswith("nexus.testing")
    ]


class Body(protocol.Protocol):
    """Collects a response body as it arrives and can hang up on it."""

    def __init__(self) -> None:
        self.data = b""
        self.reads = 0
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.reads += 1

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.reason = reason
        self.ended.callback(None)

    def events(self) -> list[bytes]:
        """Complete SSE events received so far (the ``data: `` payloads)."""
        return [e.removeprefix(b"data: ") for e in self.data.split(b"\n\n")[:-1]]

    def hang_up(self) -> None:
        # The body transport has no abortConnection; stopProducing drops the connection.
        assert self.transport is not None
        self.transport.stopProducing()


class Client:
    """treq against one mock (with deadlines), on a non-persistent pool unless asked."""

    def __init__(self, backend: MockBackend, persistent: bool = False) -> None:
        self.backend = backend
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.http = http_client(self.pool)

    def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None, **kw: Any
    ) -> Deferred[Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        return self.http.post(self.backend.url + path, data=data, headers=headers, **kw)

    def chat(self, **fields: Any) -> Deferred[Any]:
        body = {"model": "mock-model", "messages": MESSAGES, **fields}
        return self.post(CHAT, body, unbuffered=True)

    def complete(self, **fields: Any) -> Deferred[Any]:
        body = {"model": "mock-model", "prompt": "Say hi", **fields}
        return self.post(COMPLETIONS, body, unbuffered=True)

    def embed(self, **fields: Any) -> Deferred[Any]:
        body = {"model": "mock-model", "input": "hi", **fields}
        return self.post(EMBEDDINGS, body, unbuffered=True)

    def infer(self, endpoint: str, **fields: Any) -> Deferred[Any]:
        """A request to the inference endpoint named ``endpoint`` (chat, completions, ...)."""
        if endpoint == "chat":
            return self.chat(**fields)
        if endpoint == "completions":
            return self.complete(**fields)
        return self.embed(**fields)

    def get(self, path: str) -> Deferred[Any]:
        return self.http.get(self.backend.url + path)

    async def json(self, response: Any) -> Any:
        return json.loads(await response.content())

    async def body(self, response: Any) -> Body:
        """Start receiving ``response``'s body; return the collector at once."""
        body = Body()
        response.deliverBody(body)
        return body


@pytest.fixture
def start() -> Iterator[Callable[..., tuple[MockBackend, Client]]]:
    """Start mocks (port 0, 127.0.0.1) with clients; stop them all, and check for leaks."""
    started: list[tuple[MockBackend, Client]] = []

    def start_one(persistent: bool = False, **knobs: Any) -> tuple[MockBackend, Client]:
        backend = listen_mock(reactor, MockSettings(**knobs))
        client = Client(backend, persistent)
        started.append((backend, client))
        return backend, client

    yield start_one
    for backend, client in started:
        pytest_twisted.blockon(client.pool.closeCachedConnections())
        pytest_twisted.blockon(backend.stop())
    assert mock_timers() == []


# -- normal behaviour ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_completion_has_the_openai_shape_and_mock_headers(start: Any) -> None:
    backend, client = start(name="alpha", models=["m1", "m2"], prompt_tokens=7)
    response = await client.post(
        CHAT,
        {"model": "m2", "messages": MESSAGES, "user": "u"},
        headers={"Authorization": "Bearer k"},
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.headers.getRawHeaders("x-mock-backend") == ["alpha"]
    assert response.headers.getRawHeaders("x-mock-hop") == ["1"]
    body = await client.json(response)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "m2"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from alpha"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}

    stats = backend.stats()
    assert stats["chat_requests"] == stats["completed"] == 1
    assert stats["in_flight"] == stats["disconnects"] == 0
    assert stats["last_request"]["body"] == {"model": "m2", "messages": MESSAGES, "user": "u"}
    assert stats["last_request"]["headers"]["authorization"] == "Bearer k"


@pytest_twisted.ensureDeferred
async def test_each_response_gets_its_own_id(start: Any) -> None:
    _, client = start()
    first = await client.json(await client.chat())
    second = await client.json(await client.chat())
    assert first["id"] != second["id"]


@pytest_twisted.ensureDeferred
async def test_the_openai_client_understands_the_mock(start: Any) -> None:
    backend, _ = start(name="gamma", models=["m"], stream_chunks=3)

    def talk() -> tuple[Any, list[Any], list[str]]:
        client = openai.OpenAI(
            base_url=backend.url + "/v1", api_key="k", max_retries=0, timeout=CLIENT_DEADLINE
        )
        try:
            answer = client.chat.completions.create(model="m", messages=MESSAGES)
            stream = client.chat.completions.create(
                model="m",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            models = [m.id for m in client.models.list()]
        finally:
            client.close()
        return answer, chunks, models

    answer, chunks, models = await deferToThread(talk)
    assert answer.choices[0].message.content == "Hello from gamma"
    assert answer.usage is not None and answer.usage.total_tokens == 15
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from gamma"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert models == ["m"]


@pytest_twisted.ensureDeferred
async def test_keep_alive_survives_the_hop_by_hop_connection_header(start: Any) -> None:
    backend, client = start(persistent=True)
    for _ in range(3):
        response = await client.chat()
        assert response.code == 200
        await response.content()
    assert (await (await client.chat(stream=True)).content()).endswith(b"[DONE]\n\n")
    assert backend.stats()["connections"] == 1


class Wire(protocol.Protocol):
    """Sends raw bytes and keeps everything that comes back until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_header_on_the_wire_keeps_connection_close(start: Any) -> None:
    backend, _ = start()
    body = json.dumps({"model": "mock-model", "messages": MESSAGES}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    wire = Wire(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", backend.port.getHost().port)
    await deadline(connectProtocol(endpoint, wire), what="connecting")
    await wire.closed.addTimeout(5, reactor)  # the server closes, as the client asked
    head = wire.received.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert head[0] == b"http/1.1 200 ok"
    assert b"connection: close" in head
    assert b"connection: x-mock-hop, x-mock-backend" in head
    assert b"x-mock-hop: 1" in head
    assert b"x-mock-backend: mock" in head


@pytest_twisted.ensureDeferred
async def test_no_log_event_per_request(start: Any) -> None:
    _, client = start()
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        await (await client.chat()).content()
        await (await client.get("/v1/models")).content()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    client_side = "twisted.web.client"
    assert [e for e in logged if not e.get("log_namespace", "").startswith(client_side)] == []


@pytest.mark.parametrize("include_usage", [True, False])
@pytest_twisted.ensureDeferred
async def test_stream_events_end_with_done(start: Any, include_usage: bool) -> None:
    _, client = start(name="beta", stream_chunks=4, prompt_tokens=3)
    response = await client.chat(stream=True, stream_options={"include_usage": include_usage})
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert response.headers.getRawHeaders("cache-control") == ["no-cache"]
    raw = await response.content()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n")[:-1]]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:5]]
    assert content == stream_pieces("beta", 4) == ["Hello", " ", "from", " beta"]
    assert "".join(content) == "Hello from beta"
    assert chunks[5]["choices"][0]["finish_reason"] == "stop"
    if include_usage:
        assert len(chunks) == 7
        assert chunks[6]["choices"] == []
        assert chunks[6]["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "total_tokens": 7,
        }
    else:
        assert len(chunks) == 6
        assert all("usage" not in c for c in chunks)


@pytest_twisted.ensureDeferred
async def test_stream_events_are_paced_and_written_separately(start: Any) -> None:
    backend, client = start(stream_chunks=3, stream_delay_ms=40)
    began = time.monotonic()
    response = await client.chat(stream=True)
    body = await client.body(response)
    await body.ended
    elapsed = time.monotonic() - began
    events = body.events()
    assert len(events) == 6 and events[-1] == b"[DONE]"  # role, 3 content, finish, [DONE]
    assert body.reads >= 6  # 40 ms apart: each event arrives on its own
    assert elapsed >= 5 * 0.040
    assert backend.stats()["completed"] == 1


@pytest_twisted.ensureDeferred
async def test_latency_delays_headers_and_a_client_leaving_cancels_the_timer(start: Any) -> None:
    backend, client = start(latency_ms=60)
    began = time.monotonic()
    response = await client.chat()
    assert response.code == 200
    assert time.monotonic() - began >= 0.06
    await response.content()

    backend.configure(latency_ms=60_000)
    d = client.chat()
    await wait_for(lambda: backend.stats()["in_flight"] == 1, what="request received")
    assert len(mock_timers()) == 1
    d.cancel()
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        await d
    await wait_for(lambda: backend.stats()["disconnects"] == 1, what="disconnect counted")
    assert mock_timers() == []
    assert backend.stats()["in_flight"] == 0


@pytest_twisted.ensureDeferred
async def test_completion_tokens_can_be_set(start: Any) -> None:
    _, client = start(completion_tokens=42, stream_chunks=2)
    body = await client.json(await client.chat())
    assert body["usage"]["completion_tokens"] == 42
    raw = await (await client.chat(stream=True, stream_options={"include_usage": True})).content()
    usage = json.loads(raw.split(b"\n\n")[-3].removeprefix(b"data: "))["usage"]
    assert usage == {"prompt_tokens": 10, "completion_tokens": 42, "total_tokens": 52}


# -- legacy completions and embeddings -------------------------------------------------------


def sse_json(raw: bytes) -> list[Any]:
    """The events of a whole SSE body: parsed JSON, then ``[DONE]`` as bytes."""
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n")[:-1]]
    return [e if e == b"[DONE]" else json.loads(e) for e in events]


def decode_base64_floats(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest_twisted.ensureDeferred
async def test_the_openai_client_does_embeddings_and_completions(start: Any) -> None:
    backend, _ = start(name="delta", models=["m"], stream_chunks=3, prompt_tokens=4)
    sent: dict[str, Any] = {}

    def talk() -> dict[str, Any]:
        client = openai.OpenAI(
            base_url=backend.url + "/v1", api_key="k", max_retries=0, timeout=CLIENT_DEADLINE
        )
        try:
            got: dict[str, Any] = {}
            got["default"] = client.embeddings.create(model="m", input=["one", "two"])
            # What the SDK asked for when not told: it decodes base64 itself.
            sent["encoding_format"] = backend.stats()["last_request"]["body"]["encoding_format"]
            got["float"] = client.embeddings.create(model="m", input="one", encoding_format="float")
            got["tokens"] = client.embeddings.create(model="m", input=[[1, 2], [3]])
            got["text"] = client.completions.create(model="m", prompt="Say hi")
            stream = client.completions.create(
                model="m", prompt=["a", "b"], stream=True, stream_options={"include_usage": True}
            )
            got["chunks"] = list(stream)
            try:
                client.completions.create(model="nope", prompt="x")
            except openai.NotFoundError as e:
                got["not_found"] = e
        finally:
            client.close()
        return got

    got = await deferToThread(talk)
    assert sent["encoding_format"] == "base64"
    default = got["default"]
    assert [e.index for e in default.data] == [0, 1]
    assert default.model == "m"
    assert default.data[0].embedding == embedding_vector("one", 8)
    assert default.data[1].embedding == embedding_vector("two", 8)
    assert default.usage.prompt_tokens == default.usage.total_tokens == 8  # 4 per input
    assert got["float"].data[0].embedding == default.data[0].embedding
    tokens = got["tokens"].data
    assert [t.embedding for t in tokens] == [embedding_vector([1, 2], 8), embedding_vector([3], 8)]

    text = got["text"]
    assert text.object == "text_completion"
    assert text.choices[0].text == "Hello from delta"
    assert text.choices[0].finish_reason == "stop"
    assert text.usage is not None and text.usage.total_tokens == 9  # 4 + 5

    chunks = got["chunks"]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from delta"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert got["not_found"].status_code == 404
    stats = backend.stats()
    assert stats["requests_by_endpoint"] == {"chat": 0, "completions": 3, "embeddings": 3}
    assert stats["chat_requests"] == 0


@pytest_twisted.ensureDeferred
async def test_embeddings_are_deterministic_unit_vectors_of_the_set_dimension(start: Any) -> None:
    backend, client = start(models=["e1", "e2"], prompt_tokens=3)
    response = await client.embed(model="e1", input=["alpha", "beta", "alpha"])
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    body = await client.json(response)
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == "e1"
    assert body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}  # 3 per input
    data = body["data"]
    assert [(d["object"], d["index"]) for d in data] == [("embedding", i) for i in range(3)]
    vectors = [d["embedding"] for d in data]
    assert all(len(v) == 8 and all(isinstance(x, float) for x in v) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]  # same input, same vector
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-6) for v in vectors)

    # Another request, another model: the same input still gives the same vector.
    again = await client.json(await client.embed(model="e2", input="alpha"))
    assert again["data"][0]["embedding"] == vectors[0]
    assert again["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    # A token list is an input of its own, not the text it may stand for.
    tokens = await client.json(await client.embed(model="e1", input=[5, 6]))
    assert len(tokens["data"]) == 1 and tokens["data"][0]["embedding"] != vectors[0]

    # base64: the little-endian float32 bytes of the very same floats.
    encoded = await client.json(
        await client.embed(model="e1", input="alpha", encoding_format="base64")
    )
    assert decode_base64_floats(encoded["data"][0]["embedding"]) == vectors[0]

    backend.configure(embedding_dimensions=3)
    short = await client.json(await client.embed(model="e1", input="alpha"))
    assert len(short["data"][0]["embedding"]) == 3
    assert short["data"][0]["embedding"] == embedding_vector("alpha", 3)


@pytest.mark.parametrize("include_usage", [True, False])
@pytest_twisted.ensureDeferred
async def test_completions_have_the_openai_shape_streamed_or_not(
    start: Any, include_usage: bool
) -> None:
    backend, client = start(name="beta", models=["t"], stream_chunks=4, prompt_tokens=3)
    response = await client.complete(model="t", prompt=["one", "two"], user="u")
    assert response.code == 200
    body = await client.json(response)
    fields = {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert set(body) == fields
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert body["object"] == "text_completion" and body["model"] == "t"
    assert body["choices"] == [
        {"index": 0, "text": "Hello from beta", "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}

    response = await client.complete(
        model="t", prompt="x", stream=True, stream_options={"include_usage": include_usage}
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert response.headers.getRawHeaders("cache-control") == ["no-cache"]
    events = sse_json(await response.content())
    assert events[-1] == b"[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert {tuple(c) for c in chunks[:5]} == {("id", "object", "created", "model", "choices")}
    # No role event: the same pieces as a chat stream, then the finish event.
    choices = [c["choices"][0] for c in chunks[:5]]
    assert [c["text"] for c in choices] == [*stream_pieces("beta", 4), ""]
    assert [c["finish_reason"] for c in choices] == [None] * 4 + ["stop"]
    assert all(c["index"] == 0 and c["logprobs"] is None for c in choices)
    if include_usage:
        assert len(chunks) == 6 and chunks[5]["choices"] == []
        assert chunks[5]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    else:
        assert len(chunks) == 5 and all("usage" not in c for c in chunks)
    assert backend.stats()["completed"] == 2


@pytest_twisted.ensureDeferred
async def test_completion_streams_are_paced_like_chat(start: Any) -> None:
    backend, client = start(stream_chunks=3, stream_delay_ms=40, first_token_delay_ms=80)
    began = time.monotonic()
    response = await client.complete(stream=True)
    body = await client.body(response)
    await body.ended
    elapsed = time.monotonic() - began
    assert len(body.events()) == 5 and body.events()[-1] == b"[DONE]"  # 3 content, finish, DONE
    assert body.reads >= 5  # each event arrives on its own
    assert elapsed >= 0.080 + 4 * 0.040  # the first token's wait, then a gap before each event
    assert backend.stats()["completed"] == 1


def test_completions_first_token_delay_sends_the_headers_at_once() -> None:
    clock = MemoryReactorClock()
    settings = MockSettings(stream_chunks=2, first_token_delay_ms=300, stream_delay_ms=10)
    backend = MockBackend(settings, clock)
    channel = backend.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    body = json.dumps({"model": "mock-model", "prompt": "p", "stream": True}).encode()
    channel.dataReceived(raw_request(b"POST", COMPLETIONS.encode(), body))

    def texts() -> list[Any]:
        head, _, body = transport.value().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Transfer-Encoding: chunked" in head
        events = sse_json(dechunk(body))
        return [e if e == b"[DONE]" else e["choices"][0]["text"] for e in events]

    assert texts() == []  # the headers, and not one event yet
    clock.advance(0.299)
    assert texts() == []
    clock.advance(0.001)
    assert texts() == ["Hello"]
    clock.advance(0.010)
    assert texts() == ["Hello", " from mock"]
    clock.advance(0.010)
    clock.advance(0.010)
    assert texts() == ["Hello", " from mock", "", b"[DONE]"]
    assert clock.getDelayedCalls() == []
    assert backend.stats()["completed"] == 1


@pytest.mark.parametrize(
    ("path", "body", "param", "status"),
    [
        (EMBEDDINGS, b"not json", None, 400),
        (EMBEDDINGS, [1], None, 400),
        (EMBEDDINGS, {"input": "x"}, "model", 400),
        (EMBEDDINGS, {"model": "mock-model"}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": ""}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": []}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": 3}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": {"text": "x"}}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": ["a", 1]}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": [[1], []]}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": [[1], ["a"]]}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": [True]}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": [1.5]}, "input", 400),
        (EMBEDDINGS, {"model": "mock-model", "input": "x", "encoding_format": "hex"},
         "encoding_format", 400),
        (EMBEDDINGS, {"model": "other", "input": "x"}, "model", 404),
        (COMPLETIONS, b"not json", None, 400),
        (COMPLETIONS, {"prompt": "x"}, "model", 400),
        (COMPLETIONS, {"model": "mock-model"}, "prompt", 400),
        (COMPLETIONS, {"model": "mock-model", "prompt": None}, "prompt", 400),
        (COMPLETIONS, {"model": "mock-model", "prompt": []}, "prompt", 400),
        (COMPLETIONS, {"model": "mock-model", "prompt": {"a": 1}}, "prompt", 400),
        (COMPLETIONS, {"model": "mock-model", "prompt": "x", "temperature": 3}, "temperature",
         400),
        (COMPLETIONS, {"model": "other", "prompt": "x"}, "model", 404),
    ],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_malformed_embeddings_and_completions_are_refused(
    start: Any, path: str, body: Any, param: str | None, status: int
) -> None:
    backend, client = start()
    response = await client.post(path, body)
    assert response.code == status
    error = (await client.json(response))["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    if status == 404:
        assert error["code"] == "model_not_found"
    stats = backend.stats()
    assert stats["requests_by_endpoint"][path.rsplit("/", 1)[1]] == 1
    assert stats["completed"] == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (EMBEDDINGS, {"input": "x"}),
        (EMBEDDINGS, {"input": ["x", "y"]}),
        (EMBEDDINGS, {"input": [1, 2, 3]}),
        (EMBEDDINGS, {"input": [[1, 2], [0]], "encoding_format": None}),
        (COMPLETIONS, {"prompt": ""}),
        (COMPLETIONS, {"prompt": ["a", ""]}),
        (COMPLETIONS, {"prompt": [1, 2]}),
        (COMPLETIONS, {"prompt": [[1], [2, 3]]}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_every_openai_input_shape_is_accepted(start: Any, path: str, body: Any) -> None:
    _, client = start()
    response = await client.post(path, {"model": "mock-model", **body})
    assert response.code == 200, await response.content()
    answer = await client.json(response)
    if path == EMBEDDINGS:
        inputs = body["input"]
        count = 1 if isinstance(inputs, str) or isinstance(inputs[0], int) else len(inputs)
        assert len(answer["data"]) == count
    else:
        assert [c["text"] for c in answer["choices"]] == ["Hello from mock"]  # one choice


@pytest_twisted.ensureDeferred
async def test_stats_cover_every_inference_endpoint(start: Any) -> None:
    backend, client = start()
    for request in (client.chat, client.complete, client.embed, client.complete):
        await (await request(user="x")).content()
    response = await client.post(EMBEDDINGS, {"model": "mock-model", "input": "hi"},
                                 headers={"Authorization": "Bearer e"})  # fmt: skip
    await response.content()
    stats = await client.json(await client.get("/_mock/stats"))
    assert stats["requests_by_endpoint"] == {"chat": 1, "completions": 2, "embeddings": 2}
    assert stats["chat_requests"] == 1  # chat only, as before
    assert stats["completed"] == 5 and stats["in_flight"] == 0
    last = stats["last_request"]
    assert last["path"] == EMBEDDINGS and last["endpoint"] == "embeddings"
    assert last["body"] == {"model": "mock-model", "input": "hi"}
    assert last["headers"]["authorization"] == "Bearer e"
    await (await client.complete(prompt="p")).content()
    last = backend.stats()["last_request"]
    assert last["path"] == COMPLETIONS and last["endpoint"] == "completions"
    assert last["body"]["prompt"] == "p"
    reset = await client.json(await client.post("/_mock/reset", b""))
    assert reset["requests_by_endpoint"] == {"chat": 0, "completions": 0, "embeddings": 0}
    assert reset["last_request"] is None


@pytest.mark.parametrize("endpoint", ["completions", "embeddings"])
@pytest.mark.parametrize(
    ("mode", "code"), [("500", "internal_error"), ("503", "service_unavailable")]
)
@pytest_twisted.ensureDeferred
async def test_fail_status_on_every_endpoint(
    start: Any, endpoint: str, mode: str, code: str
) -> None:
    backend, client = start(fail=mode, latency_ms=30)
    began = time.monotonic()
    for stream in (False, True):
        response = await client.infer(endpoint, stream=stream)
        assert response.code == int(mode)
        error = (await client.json(response))["error"]
        assert error["type"] == "server_error" and error["code"] == code
    assert time.monotonic() - began >= 2 * 0.030  # latency_ms applies too
    assert backend.stats()["requests_by_endpoint"][endpoint] == 2


@pytest_twisted.ensureDeferred
async def test_fail_count_is_shared_by_the_endpoints(start: Any) -> None:
    backend, client = start(fail="503", fail_count=2)
    codes = []
    for endpoint in ("embeddings", "completions", "chat", "embeddings"):
        response = await client.infer(endpoint)
        await response.content()
        codes.append(response.code)
    assert codes == [503, 503, 200, 200]
    assert backend.settings.fail is None


@pytest_twisted.ensureDeferred
async def test_failure_modes_cut_embeddings_and_completions_in_their_own_shape(
    start: Any,
) -> None:
    backend, client = start(fail="invalid_json")
    for endpoint in ("completions", "embeddings"):
        response = await client.infer(endpoint)
        assert response.code == 200 and await response.content() == b"not json{"

    backend.configure(fail="truncated_sse")
    raw = await (await client.complete(stream=True)).content()
    first, rest = raw.split(b"\n\n", 1)
    assert json.loads(first.removeprefix(b"data: "))["object"] == "text_completion"
    assert rest == b'data: {"id": ' and b"[DONE]" not in raw
    response = await client.embed(input=["a", "b"])  # embeddings never stream: half the body
    with pytest.raises(ResponseFailed):
        await response.content()

    backend.configure(fail="reset")
    response = await client.embed(stream=True)
    assert response.code == 200 and response.length > 0
    with pytest.raises(ResponseFailed):
        await response.content()
    response = await client.complete(stream=True)
    body = await client.body(response)
    await body.ended
    assert body.reason is not None and body.reason.check(ResponseFailed)
    assert [json.loads(e)["choices"][0]["text"] for e in body.events()] == ["Hello"]

    backend.configure(fail="huge_length")
    response = await client.embed()
    assert response.length == HUGE_LENGTH
    body = await client.body(response)
    await wait_for(lambda: body.data == b'{"object": "list", ', what="the first bytes")
    body.hang_up()

    backend.configure(fail="endless", stream_delay_ms=2)
    response = await client.complete(stream=True)
    body = await client.body(response)
    await wait_for(lambda: len(body.events()) >= 5, what="five events")
    texts = [json.loads(e)["choices"][0]["text"] for e in body.events()]
    assert texts[:4] == ["Hello", " from", " mock", " #3"]
    body.hang_up()
    await wait_for(lambda: backend.stats()["in_flight"] == 0, what="all requests over")
    assert backend.stats()["requests_by_endpoint"] == {
        "chat": 0, "completions": 4, "embeddings": 4}  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_fail_hang_and_stall_hold_every_endpoint(start: Any) -> None:
    backend, client = start(fail="hang")
    for endpoint in ("completions", "embeddings"):
        with pytest.raises((CancelledError, ResponseNeverReceived)):
            await client.infer(endpoint).addTimeout(0.2, reactor)
    await wait_for(lambda: backend.stats()["disconnects"] == 2, what="disconnects counted")

    backend.configure(fail="stall")
    response = await client.complete(stream=True)
    body = await client.body(response)
    await wait_for(lambda: len(body.events()) == 2, what="two events")
    body.hang_up()
    response = await client.embed()
    body = await client.body(response)
    await wait_for(lambda: len(body.data) == response.length // 2, what="half the body")
    body.hang_up()
    await wait_for(lambda: backend.stats()["disconnects"] == 4, what="disconnects counted")
    assert backend.stats()["in_flight"] == 0


@pytest.mark.parametrize(
    ("status", "type", "code"),
    [
        (404, "invalid_request_error", "not_found"),
        (405, "invalid_request_error", "method_not_allowed"),
        (501, "server_error", "not_implemented"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_mock_can_lack_endpoints(start: Any, status: int, type: str, code: str) -> None:
    backend, client = start(endpoints=["chat"], missing_endpoint_status=status)
    for endpoint, path in (("completions", COMPLETIONS), ("embeddings", EMBEDDINGS)):
        response = await client.infer(endpoint)
        assert response.code == status
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        error = (await client.json(response))["error"]
        assert error == {
            "message": f"This server does not serve {path}.",
            "type": type,
            "param": None,
            "code": code,
        }
        # 405 with an empty Allow: the resource allows no method (RFC 9110, 10.2.1).
        allow = response.headers.getRawHeaders("allow")
        assert allow == ([""] if status == 405 else None)
        # Whatever the method, as a server without the path answers.
        other = await client.get(path)
        assert other.code == status
        assert (await client.json(other))["error"]["code"] == code
    assert (await client.chat()).code == 200
    stats = backend.stats()
    assert stats["requests_by_endpoint"] == {"chat": 1, "completions": 1, "embeddings": 1}
    assert stats["last_request"]["path"] == CHAT
    assert stats["completed"] == 3


@pytest_twisted.ensureDeferred
async def test_a_missing_endpoint_answers_at_once_whatever_the_failure_knobs(
    start: Any,
) -> None:
    backend, client = start(endpoints=["chat", "completions"], fail="hang", fail_count=1,
                            latency_ms=60_000)  # fmt: skip
    response = await client.embed()
    assert response.code == 404
    assert (await client.json(response))["error"]["code"] == "not_found"
    assert backend.settings.fail == "hang" and backend.settings.fail_count == 1  # not used up
    backend.configure(fail="500", latency_ms=0)
    assert (await client.complete()).code == 500
    assert (await client.complete()).code == 200

    # Lacking every endpoint, and then serving them all again.
    backend.configure(endpoints=[])
    assert (await client.chat()).code == 404
    backend.configure(endpoints=list(ENDPOINTS))
    for endpoint in ENDPOINTS:
        response = await client.infer(endpoint)
        assert response.code == 200
        await response.content()
    assert (await client.get(EMBEDDINGS)).code == 405  # served: GET is the wrong method


@pytest_twisted.ensureDeferred
async def test_endpoint_knobs_over_the_control_api(start: Any) -> None:
    backend, client = start()
    config = await client.json(await client.get("/_mock/config"))
    assert config["endpoints"] == ["chat", "completions", "embeddings"]
    assert config["missing_endpoint_status"] == 404 and config["embedding_dimensions"] == 8
    changes = {"endpoints": ["embeddings"], "missing_endpoint_status": 501,
               "embedding_dimensions": 4}  # fmt: skip
    config = await client.json(await client.post("/_mock/config", changes))
    assert {name: config[name] for name in changes} == changes
    assert (await client.chat()).code == 501
    answer = await client.json(await client.embed())
    assert len(answer["data"][0]["embedding"]) == 4
    for bad in (
        {"endpoints": ["chat", "images"]},
        {"endpoints": "chat"},
        {"endpoints": ["chat", "chat"]},
        {"missing_endpoint_status": 400},
        {"missing_endpoint_status": "404"},
        {"missing_endpoint_status": 404.0},
        {"embedding_dimensions": 0},
    ):
        response = await client.post("/_mock/config", bad)
        assert response.code == 400
        assert next(iter(bad)) in (await client.json(response))["error"]["message"]
    assert backend.settings.endpoints == ["embeddings"]  # refused updates change nothing
    assert backend.settings.missing_endpoint_status == 501
    assert MISSING_ENDPOINT_STATUSES == (404, 405, 501)


# -- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", None),
        ([1, 2], None),
        ({"messages": MESSAGES}, "model"),
        ({"model": 3, "messages": MESSAGES}, "model"),
        ({"model": "mock-model"}, "messages"),
        ({"model": "mock-model", "messages": "hi"}, "messages"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_chat_requests_get_400(start: Any, body: Any, param: str | None) -> None:
    _, client = start()
    response = await client.post(CHAT, body)
    assert response.code == 400
    error = (await client.json(response))["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


@pytest_twisted.ensureDeferred
async def test_temperature_above_2_is_refused_like_openai(start: Any) -> None:
    _, client = start()
    response = await client.chat(temperature=2.5)
    assert response.code == 400
    assert await client.json(response) == {
        "error": {
            "message": "temperature must be <= 2",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    assert (await client.chat(temperature=2)).code == 200


@pytest_twisted.ensureDeferred
async def test_unlisted_model_is_404_model_not_found(start: Any) -> None:
    _, client = start(models=["a"])
    response = await client.chat(model="b")
    assert response.code == 404
    error = (await client.json(response))["error"]
    assert error["code"] == "model_not_found"
    assert "b" in error["message"]


@pytest_twisted.ensureDeferred
async def test_unknown_path_404_and_wrong_method_405(start: Any) -> None:
    _, client = start()
    response = await client.get("/v1/nothing")
    assert response.code == 404
    assert (await client.json(response))["error"]["code"] == "not_found"
    response = await client.get(CHAT)
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["POST"]
    assert (await client.json(response))["error"]["code"] == "method_not_allowed"


# -- discovery -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "tags", "health"),
    [
        ("ollama", 200, 404),
        ("llamacpp", 404, 200),
        ("vllm", 404, 200),
        ("openai", 404, 404),
        ("lmstudio", 404, 404),
        ("exo", 404, 404),
        ("generic", 404, 404),
    ],
)
@pytest_twisted.ensureDeferred
async def test_discovery_endpoints_by_type(start: Any, kind: str, tags: int, health: int) -> None:
    backend, client = start(type=kind, models=["x", "y"])
    response = await client.get("/v1/models")
    assert response.code == 200
    assert await client.json(response) == {
        "object": "list",
        "data": [
            {"id": "x", "object": "model", "created": 0, "owned_by": "mock"},
            {"id": "y", "object": "model", "created": 0, "owned_by": "mock"},
        ],
    }
    response = await client.get("/api/tags")
    assert response.code == tags
    if tags == 200:
        models = (await client.json(response))["models"]
        assert [(m["name"], m["model"]) for m in models] == [("x", "x"), ("y", "y")]
    else:
        await response.content()
    response = await client.get("/health")
    assert response.code == health
    content = await response.content()
    if kind == "llamacpp":
        assert json.loads(content) == {"status": "ok"}
    answered = 1 + (tags == 200) + (health == 200)
    assert backend.stats()["health_checks"] == answered
    assert backend.stats()["chat_requests"] == 0


@pytest_twisted.ensureDeferred
async def test_health_fail_and_flap(start: Any) -> None:
    backend, client = start(type="llamacpp", health_fail=True)
    for path in ("/health", "/v1/models"):
        response = await client.get(path)
        assert response.code == 500
        assert (await client.json(response))["error"]["type"] == "server_error"
    assert (await client.chat()).code == 200  # chat is not affected

    backend.configure(health_fail=False, flap=True)
    codes = []
    for _ in range(3):
        for path in ("/health", "/v1/models"):
            response = await client.get(path)
            await response.content()
            codes.append(response.code)
    # Each path alternates on its own: a two-probe check is all good or all bad.
    assert codes == [200, 200, 500, 500, 200, 200]


# -- failure modes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "code"), [("500", "internal_error"), ("503", "service_unavailable")]
)
@pytest_twisted.ensureDeferred
async def test_fail_status(start: Any, mode: str, code: str) -> None:
    backend, client = start(fail=mode)
    for stream in (False, True):
        response = await client.chat(stream=stream)
        assert response.code == int(mode)
        assert response.headers.getRawHeaders("x-mock-backend") == ["mock"]
        error = (await client.json(response))["error"]
        assert error["type"] == "server_error" and error["code"] == code
    assert backend.stats()["completed"] == 2


@pytest_twisted.ensureDeferred
async def test_fail_invalid_json(start: Any) -> None:
    _, client = start(fail="invalid_json")
    response = await client.chat()
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert await response.content() == b"not json{"


@pytest_twisted.ensureDeferred
async def test_fail_count_expires(start: Any) -> None:
    backend, client = start(fail="503", fail_count=2)
    codes = []
    for _ in range(3):
        response = await client.chat()
        await response.content()
        codes.append(response.code)
    assert codes == [503, 503, 200]
    assert backend.settings.fail is None
    assert backend.settings.fail_count == -1


@pytest_twisted.ensureDeferred
async def test_fail_hang_until_the_client_gives_up(start: Any) -> None:
    backend, client = start(fail="hang")
    d = client.chat().addTimeout(0.2, reactor)
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        await d
    await wait_for(lambda: backend.stats()["disconnects"] == 1, what="disconnect counted")
    stats = backend.stats()
    assert stats["in_flight"] == stats["completed"] == stats["aborted"] == 0


@pytest_twisted.ensureDeferred
async def test_fail_reset_cuts_the_body(start: Any) -> None:
    backend, client = start(fail="reset")
    response = await client.chat()
    assert response.code == 200
    assert response.length > 0
    with pytest.raises(ResponseFailed):
        await response.content()

    response = await client.chat(stream=True)
    assert response.code == 200
    body = await client.body(response)
    await body.ended
    assert body.reason is not None and body.reason.check(ResponseFailed)
    assert len(body.events()) == 1  # the role event got through
    await wait_for(lambda: backend.stats()["aborted"] == 2, what="aborts counted")
    assert backend.stats()["disconnects"] == 0


@pytest_twisted.ensureDeferred
async def test_fail_close_ends_the_connection_without_an_answer(start: Any) -> None:
    backend, client = start(fail="close", fail_count=2)
    for stream in (False, True):
        with pytest.raises(ResponseNeverReceived):  # a POST: Twisted's client never resends it
            await client.chat(stream=stream)
    await wait_for(lambda: backend.stats()["aborted"] == 2, what="closes counted")
    assert backend.stats()["disconnects"] == 0
    assert backend.chat_requests == 2
    response = await client.chat()  # the count used up: answered again
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_fail_stall_stream_keeps_the_connection_silent(start: Any) -> None:
    backend, client = start(fail="stall")
    response = await client.chat(stream=True)
    assert response.code == 200
    body = await client.body(response)
    await wait_for(lambda: len(body.events()) == 2, what="two events")
    received = body.data
    # Nothing more comes, and the connection stays open (a window, not a wait for state).
    await deferLater(reactor, 0.15, lambda: None)
    assert body.data == received and not body.ended.called
    assert backend.stats()["in_flight"] == 1
    body.hang_up()
    await body.ended
    await wait_for(lambda: backend.stats()["disconnects"] == 1, what="disconnect counted")


@pytest_twisted.ensureDeferred
async def test_fail_stall_non_stream_sends_half_the_announced_body(start: Any) -> None:
    backend, client = start(fail="stall")
    response = await client.chat()
    assert response.code == 200
    body = await client.body(response)
    await wait_for(lambda: len(body.data) > 0, what="part of the body")
    assert len(body.data) == response.length // 2
    assert not body.ended.called
    body.hang_up()
    await wait_for(lambda: backend.stats()["disconnects"] == 1, what="disconnect counted")


@pytest_twisted.ensureDeferred
async def test_fail_truncated_sse_ends_cleanly_without_done(start: Any) -> None:
    backend, client = start(fail="truncated_sse")
    response = await client.chat(stream=True)
    assert response.code == 200
    raw = await response.content()  # the HTTP body itself ends properly
    first, rest = raw.split(b"\n\n", 1)
    assert json.loads(first.removeprefix(b"data: "))["object"] == "chat.completion.chunk"
    assert rest == b'data: {"id": '
    assert b"[DONE]" not in raw
    await wait_for(lambda: backend.stats()["open_connections"] == 0, what="connection closed")
    assert backend.stats()["completed"] == 1

    response = await client.chat()  # non-stream: half the announced body, then FIN
    with pytest.raises(ResponseFailed):
        await response.content()
    await wait_for(lambda: backend.stats()["aborted"] == 1, what="close counted")


@pytest_twisted.ensureDeferred
async def test_fail_huge_length(start: Any) -> None:
    backend, client = start(fail="huge_length")
    response = await client.chat()
    assert response.code == 200
    assert response.length == HUGE_LENGTH == 2147483648
    body = await client.body(response)
    await wait_for(lambda: len(body.data) > 0, what="a few bytes")
    body.hang_up()
    await wait_for(lambda: backend.stats()["disconnects"] == 1, what="disconnect counted")


@pytest_twisted.ensureDeferred
async def test_fail_endless_until_the_client_leaves(start: Any) -> None:
    backend, client = start(fail="endless", stream_delay_ms=2)
    response = await client.chat(stream=True)
    assert response.code == 200
    body = await client.body(response)
    await wait_for(lambda: len(body.events()) >= 20, what="twenty events")
    chunks = [json.loads(e) for e in body.events()]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len(mock_timers()) == 1
    body.hang_up()
    await wait_for(lambda: backend.stats()["disconnects"] == 1, what="disconnect counted")
    assert mock_timers() == []

    response = await client.chat()  # non-stream: a JSON body that never ends
    body = await client.body(response)
    await wait_for(lambda: len(body.data) >= 10, what="ten bytes")
    assert body.data.startswith(b"{ ")
    body.hang_up()
    await wait_for(lambda: backend.stats()["disconnects"] == 2, what="disconnect counted")


@pytest_twisted.ensureDeferred
async def test_stop_aborts_open_requests(start: Any) -> None:
    backend, client = start(fail="hang")
    d = client.chat()
    await wait_for(lambda: backend.stats()["in_flight"] == 1, what="request received")
    await backend.stop()
    with pytest.raises(ResponseFailed):
        await d
    stats = backend.stats()
    assert stats["aborted"] == 1 and stats["disconnects"] == 0 and stats["open_connections"] == 0


# -- answer text -----------------------------------------------------------------------------


@given(name=st.text(min_size=1, max_size=20), chunks=st.integers(min_value=0, max_value=40))
def test_stream_pieces_spell_the_answer(name: str, chunks: int) -> None:
    pieces = stream_pieces(name, chunks)
    text = answer_text(name, chunks)
    assert len(pieces) == chunks
    assert "".join(pieces) == text == (f"Hello from {name}" if chunks else "")
    assert all(pieces[: len(text)])  # one character per event before any empty one
    if 2 <= chunks <= len(text) - 4:
        assert pieces[0] == "Hello"
    if 3 <= chunks <= 7:
        assert pieces[-1] == f" {name}"
    if chunks == 3:
        assert pieces == ["Hello", " from", f" {name}"]


@given(
    item=st.text(max_size=40) | st.lists(st.integers(min_value=0, max_value=2**31), max_size=8),
    dimensions=st.integers(min_value=1, max_value=64),
)
def test_embedding_vectors_are_deterministic_unit_float32(item: Any, dimensions: int) -> None:
    vector = embedding_vector(item, dimensions)
    assert len(vector) == dimensions
    assert vector == embedding_vector(item, dimensions)
    packed = struct.pack(f"<{dimensions}f", *vector)  # exact in float32: base64 loses nothing
    assert list(struct.unpack(f"<{dimensions}f", packed)) == vector
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)
    assert all(-1.0 <= x <= 1.0 for x in vector)


async def streamed_text(client: Client, model: str) -> str:
    """The ``delta.content`` of every event of one stream, joined."""
    raw = await (await client.chat(model=model, stream=True)).content()
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n")[:-1]]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest_twisted.ensureDeferred
async def test_streamed_text_equals_the_non_streamed_text(start: Any) -> None:
    # First the demo backend's settings (nexus.service.start_demo_backend), then the edges.
    backend, client = start(name="demo", models=["demo", "demo-large"], stream_delay_ms=50)
    cases: list[dict[str, Any]] = [
        {},
        {"stream_delay_ms": 0, "stream_chunks": 0},
        {"stream_chunks": 1},
        {"stream_chunks": 2},
        {"stream_chunks": 3},
        {"stream_chunks": 8, "name": "other"},
        {"first_token_delay_ms": 5},
        {"stream_framing": "close"},
    ]
    texts = []
    for knobs in cases:
        backend.configure(**knobs)
        for model in ("demo", "demo-large"):
            answer = await client.json(await client.chat(model=model))
            text = answer["choices"][0]["message"]["content"]
            assert await streamed_text(client, model) == text, knobs
            # Legacy completions say the same, streamed or not.
            answer = await client.json(await client.complete(model=model))
            assert answer["choices"][0]["text"] == text, knobs
            events = sse_json(await (await client.complete(model=model, stream=True)).content())
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text, knobs
        texts.append(text)
    assert texts[0] == "Hello from demo"  # what the demo answers, streamed or not
    assert texts[1] == ""  # no content events, no text
    assert texts[2:5] == ["Hello from demo"] * 3
    assert texts[5:] == ["Hello from other"] * 3


# -- stream framing, first token, headers ----------------------------------------------------


def raw_request(method: bytes, path: bytes, body: bytes = b"", close: bool = False) -> bytes:
    """A raw HTTP/1.1 request; without ``close`` it leaves the connection open."""
    connection = b"Connection: close\r\n" if close else b""
    head = b"%s %s HTTP/1.1\r\nHost: x\r\n%s" % (method, path, connection)
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def chat_request(close: bool = False, **fields: Any) -> bytes:
    """A raw chat request for ``mock-model`` with ``fields`` added to the body."""
    body = json.dumps({"model": "mock-model", "messages": MESSAGES, **fields}).encode()
    return raw_request(b"POST", CHAT.encode(), body, close)


async def exchange(backend: MockBackend, request: bytes) -> tuple[list[bytes], bytes]:
    """Send ``request`` raw; return the response head's lines and its body once the server
    closes the connection."""
    wire = Wire(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", backend.port.getHost().port)
    await deadline(connectProtocol(endpoint, wire), what="connecting")
    await wire.closed.addTimeout(5, reactor)
    head, body = wire.received.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n"), body


def header_lines(head: list[bytes]) -> list[tuple[bytes, bytes]]:
    """``(lower-case name, value)`` for each header line of a response head."""
    pairs = [line.split(b": ", 1) for line in head[1:]]
    return [(name.lower(), value) for name, value in pairs]


@pytest_twisted.ensureDeferred
async def test_stream_framing_close_on_the_wire(start: Any) -> None:
    backend, client = start(name="c", stream_framing="close", stream_chunks=3)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        head, body = await exchange(backend, chat_request(stream=True))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    # Nothing from Twisted's request machinery either (the raw client's factory logs its start).
    client_side = "twisted.internet.endpoints"
    assert [e for e in logged if not e.get("log_namespace", "").startswith(client_side)] == []
    assert head[0] == b"HTTP/1.1 200 OK"
    headers = header_lines(head)
    names = {name for name, _ in headers}
    assert names == {
        b"server", b"date", b"content-type", b"cache-control", b"connection",
        b"x-mock-backend", b"x-mock-hop",
    }  # fmt: skip
    assert b"content-length" not in names and b"transfer-encoding" not in names
    assert (b"content-type", b"text/event-stream") in headers
    connection = [v for n, v in headers if n == b"connection"]
    assert connection == [b"close", b"x-mock-hop, x-mock-backend"]
    # The body is the events and [DONE], nothing else (no chunk sizes, no "0" chunk), and the
    # server closed the connection by itself to end it.
    assert body.startswith(b"data: {") and body.endswith(b"\n\ndata: [DONE]\n\n")
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert len(chunks) == 5  # role, three content, finish
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello from c"
    await wait_for(lambda: backend.stats()["open_connections"] == 0, what="connection closed")
    assert backend.stats()["completed"] == 1 and backend.stats()["aborted"] == 0

    # An HTTP client reads such a body to its end (the close).
    response = await client.chat(stream=True)
    assert response.headers.getRawHeaders("transfer-encoding") is None
    assert (await response.content()).endswith(b"data: [DONE]\n\n")
    assert (await client.chat()).code == 200  # non-streamed answers keep their Content-Length


@pytest_twisted.ensureDeferred
async def test_stream_framing_close_truncated_sse_cuts_mid_event(start: Any) -> None:
    backend, client = start(stream_framing="close", fail="truncated_sse")
    head, body = await exchange(backend, chat_request(stream=True))
    assert head[0] == b"HTTP/1.1 200 OK"
    names = {name for name, _ in header_lines(head)}
    assert b"content-length" not in names and b"transfer-encoding" not in names
    first, rest = body.split(b"\n\n", 1)
    assert json.loads(first.removeprefix(b"data: "))["object"] == "chat.completion.chunk"
    assert rest == b'data: {"id": '  # half an event, then the close: nothing more
    await wait_for(lambda: backend.stats()["aborted"] == 1, what="cut counted")

    # To an HTTP client the body just ends: only the bytes say the stream was cut.
    raw = await (await client.chat(stream=True)).content()
    assert raw.endswith(b'\n\ndata: {"id": ') and b"[DONE]" not in raw
    await wait_for(lambda: backend.stats()["aborted"] == 2, what="cut counted")
    assert backend.stats()["completed"] == 0


def dechunk(data: bytes) -> bytes:
    """The payload of a chunked body (whole chunks only)."""
    out = b""
    while data:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        out += data[:size]
        data = data[size + 2 :]
    return out


def test_first_token_delay_sends_the_role_at_once_and_content_later() -> None:
    clock = MemoryReactorClock()
    settings = MockSettings(stream_chunks=3, first_token_delay_ms=400, stream_delay_ms=10)
    backend = MockBackend(settings, clock)
    channel = backend.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(chat_request(stream=True))

    def events() -> list[Any]:
        head, _, body = transport.value().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        raw = dechunk(body).split(b"\n\n")[:-1]
        return [e if e == b"data: [DONE]" else json.loads(e.removeprefix(b"data: ")) for e in raw]

    # Headers and the role-only event at once, no content yet.
    assert [e["choices"][0]["delta"] for e in events()] == [{"role": "assistant"}]
    clock.advance(0.399)
    assert len(events()) == 1
    clock.advance(0.001)
    assert [e["choices"][0]["delta"] for e in events()[1:]] == [{"content": "Hello"}]
    clock.advance(0.010)  # then stream_delay_ms between events
    assert events()[-1]["choices"][0]["delta"] == {"content": " from"}
    for _ in range(3):
        clock.advance(0.010)
    assert events()[-1] == b"data: [DONE]"
    assert len(events()) == 6  # role, three content, finish, [DONE]
    assert clock.getDelayedCalls() == []
    assert backend.stats()["completed"] == 1

    # 0 (the default) is today's stream: a role event with empty content, no wait.
    transport.clear()
    backend.configure(first_token_delay_ms=0, stream_delay_ms=0)
    channel.dataReceived(chat_request(stream=True))
    deltas = [e["choices"][0]["delta"] for e in events()[:-1]]
    assert deltas[:2] == [{"role": "assistant", "content": ""}, {"content": "Hello"}]


#: Headers any HTTP server may send; every other header of the mock's is its own.
STANDARD_HEADERS = {
    "allow", "cache-control", "connection", "content-length", "content-type", "date", "server",
    "transfer-encoding",
}  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_every_header_of_its_own_is_named_x_mock(start: Any) -> None:
    # On the wire: an HTTP client adds and drops headers of its own.
    backend, _ = start(type="llamacpp")
    requests = [
        chat_request(close=True),
        chat_request(close=True, stream=True),
        raw_request(b"GET", b"/health", close=True),
        raw_request(b"GET", b"/v1/nothing", close=True),
        raw_request(b"GET", CHAT.encode(), close=True),
        raw_request(b"GET", b"/_mock/stats", close=True),
    ]
    heads = [(await exchange(backend, request))[0] for request in requests]
    backend.configure(fail="503")
    heads.append((await exchange(backend, chat_request(close=True)))[0])
    backend.configure(fail=None, stream_framing="close")
    heads.append((await exchange(backend, chat_request(stream=True)))[0])
    completion = json.dumps({"model": "mock-model", "prompt": "p", "stream": True}).encode()
    embedding = json.dumps({"model": "mock-model", "input": "p"}).encode()
    stream = raw_request(b"POST", COMPLETIONS.encode(), completion)
    heads.append((await exchange(backend, stream))[0])
    backend.configure(stream_framing="chunked", endpoints=["chat"], missing_endpoint_status=405)
    embed = raw_request(b"POST", EMBEDDINGS.encode(), embedding, close=True)
    heads.append((await exchange(backend, embed))[0])
    backend.configure(endpoints=list(ENDPOINTS))
    heads.append((await exchange(backend, embed))[0])
    names = {name.decode() for head in heads for name, _ in header_lines(head)}
    assert names - STANDARD_HEADERS == {"x-mock-backend", "x-mock-hop"}


@pytest_twisted.ensureDeferred
async def test_new_knobs_over_the_control_api(start: Any) -> None:
    backend, client = start()
    changes = {"stream_framing": "close", "first_token_delay_ms": 25}
    config = await client.json(await client.post("/_mock/config", changes))
    assert config["stream_framing"] == "close" and config["first_token_delay_ms"] == 25
    assert backend.settings.stream_framing == "close"
    for bad in ({"stream_framing": "http2"}, {"first_token_delay_ms": -5}):
        response = await client.post("/_mock/config", bad)
        assert response.code == 400
        assert next(iter(bad)) in (await client.json(response))["error"]["message"]
    config = await client.json(await client.get("/_mock/config"))
    assert config["stream_framing"] == "close" and config["first_token_delay_ms"] == 25


# -- control API and settings ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_control_api(start: Any) -> None:
    backend, client = start()
    response = await client.post("/_mock/config", {"fail": "503", "fail_count": 1, "name": "b2"})
    assert response.code == 200
    config = await client.json(response)
    assert config["fail"] == "503" and config["fail_count"] == 1 and config["name"] == "b2"
    assert backend.settings.name == "b2"
    assert (await client.chat()).code == 503
    assert (await client.chat()).code == 200

    for bad in ({"nope": 1}, {"name": "c", "fail": "bogus"}, {"latency_ms": -1}, [1]):
        response = await client.post("/_mock/config", bad)
        assert response.code == 400
        assert (await client.json(response))["error"]["type"] == "invalid_request_error"
    assert backend.settings.name == "b2"  # a refused update changes nothing

    stats = await client.json(await client.get("/_mock/stats"))
    assert stats["chat_requests"] == 2
    assert stats["completed"] == 2
    assert stats["in_flight"] == 0
    assert stats["disconnects"] == 0
    assert stats["health_checks"] == 0
    assert stats["last_request"]["body"]["model"] == "mock-model"
    assert stats["last_request"]["headers"]["content-type"] == "application/json"

    reset = await client.json(await client.post("/_mock/reset", b""))
    assert reset["chat_requests"] == reset["completed"] == 0
    assert reset["last_request"] is None
    assert backend.settings.name == "b2"  # settings survive a reset
    assert (await client.json(await client.get("/_mock/config")))["name"] == "b2"


def test_settings_are_validated_on_every_assignment() -> None:
    settings = MockSettings()
    for name, value in [
        ("type", "tgi"),
        ("fail", "explode"),
        ("fail_count", -2),
        ("latency_ms", -1),
        ("stream_chunks", 1.5),
        ("models", "m"),
        ("health_fail", 1),
        ("stream_framing", "http2"),
        ("stream_framing", None),
        ("first_token_delay_ms", -1),
        ("first_token_delay_ms", True),
        ("endpoints", ["chat", "rerank"]),
        ("endpoints", ("chat",)),
        ("endpoints", ["embeddings", "embeddings"]),
        ("missing_endpoint_status", 500),
        ("missing_endpoint_status", True),
        ("embedding_dimensions", 0),
        ("embedding_dimensions", 2.0),
    ]:
        with pytest.raises(ValueError, match=name):
            setattr(settings, name, value)
    backend = MockBackend(settings, reactor)
    with pytest.raises(KeyError, match="unknown setting"):
        backend.configure(nope=1)
    assert set(FAIL_MODES) >= {"500", "hang", "endless"}
    assert STREAM_FRAMINGS == ("chunked", "close")
    assert MockSettings().stream_framing == "chunked"  # today's framing unless asked
    assert MockSettings().first_token_delay_ms == 0
    assert MockSettings().endpoints == list(ENDPOINTS) == ["chat", "completions", "embeddings"]
    assert MockSettings().missing_endpoint_status == 404
    assert MockSettings().embedding_dimensions == 8


def test_options() -> None:
    options = Options()
    options.parseOptions(
        ["--port", "0", "--models", "a, b", "--type", "ollama", "--fail", "stall",
         "--fail-count", "3", "--stream-delay-ms", "2.5", "--flap",
         "--stream-framing", "close", "--first-token-delay-ms", "40",
         "--endpoints", "chat, embeddings", "--missing-endpoint-status", "501",
         "--embedding-dimensions", "16"]
    )  # fmt: skip
    settings = options["settings"]
    assert settings.models == ["a", "b"] and settings.type == "ollama"
    assert settings.fail == "stall" and settings.fail_count == 3
    assert settings.stream_delay_ms == 2.5 and settings.flap
    assert settings.stream_framing == "close" and settings.first_token_delay_ms == 40
    assert settings.endpoints == ["chat", "embeddings"]
    assert settings.missing_endpoint_status == 501 and settings.embedding_dimensions == 16
    service = makeService(options, reactor)
    assert service.backend.settings is settings and service.port_number == 0

    assert Options().parseOptions([]) is None  # defaults are valid
    defaults = Options()
    defaults.parseOptions([])
    assert defaults["settings"] == MockSettings()
    for argv, message in [
        (["--type", "tgi"], "type must be one of"),
        (["--fail", "explode"], "fail must be one of"),
        (["--models", ","], "models"),
        (["--latency-ms", "-3"], "latency-ms"),
        (["--port", "70000"], "port"),
        (["--stream-framing", "http2"], "--stream-framing must be one of chunked, close"),
        (["--first-token-delay-ms", "-1"], "--first-token-delay-ms must be a number >= 0"),
        (["--endpoints", "chat,images"], "--endpoints must be a list of distinct names"),
        (["--missing-endpoint-status", "500"], "--missing-endpoint-status must be one of 404"),
        (["--embedding-dimensions", "0"], "--embedding-dimensions must be an integer >= 1"),
    ]:
        with pytest.raises(usage.UsageError, match=message):
            Options().parseOptions(argv)


def test_mock_service_opens_its_port_only_while_running() -> None:
    clock = MemoryReactorClock()
    options = Options()
    options.parseOptions(["--port", "9123", "--interface", "127.0.0.1"])
    service = makeService(options, clock)
    assert clock.tcpServers == []  # building the service opens nothing
    service.startService()
    assert [(port, iface) for port, _, _, iface in clock.tcpServers] == [(9123, "127.0.0.1")]
    assert service.backend.url == "http://127.0.0.1:9123"
    stopped = service.stopService()
    assert stopped.called and service.backend.port is None
    assert not service.running


# -- as a process ----------------------------------------------------------------------------


class Twistd(protocol.ProcessProtocol):
    """Watches a twistd process's output for the URL it logs."""

    def __init__(self) -> None:
        self.output = b""
        self.url: Deferred[str] = Deferred()
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", self.output)
        if match and not self.url.called:
            self.url.callback(match.group(1).decode())

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.url.called:
            self.url.errback(AssertionError(self.output.decode(errors="replace")))
        self.reason = reason
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_twistd_plugin_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    # twistd_env(): the repository root on PYTHONPATH, where Twisted finds twisted/plugins/.
    args = [*TWISTD, "--pidfile=", "-n", "nexus-mock", "--port", "0",
            "--name", "proc", "--models", "p1,p2", "--type", "ollama",
            "--endpoints", "chat,embeddings", "--missing-endpoint-status", "501",
            "--embedding-dimensions", "3"]  # fmt: skip
    watcher = Twistd()
    process = reactor.spawnProcess(watcher, TWISTD[0], args, env=twistd_env(), path=str(tmp_path))
    try:
        url = await watcher.url.addTimeout(10, reactor)
        http = http_client()
        body = json.dumps({"model": "p2", "messages": MESSAGES}).encode()
        response = await http.post(url + CHAT, data=body)
        assert response.code == 200
        assert response.headers.getRawHeaders("x-mock-backend") == ["proc"]
        answer = json.loads(await response.content())
        assert answer["choices"][0]["message"]["content"] == "Hello from proc"
        tags = json.loads(await (await http.get(url + "/api/tags")).content())
        assert [m["name"] for m in tags["models"]] == ["p1", "p2"]
        body = json.dumps({"model": "p1", "input": "x"}).encode()
        embedded = json.loads(await (await http.post(url + EMBEDDINGS, data=body)).content())
        assert embedded["data"][0]["embedding"] == embedding_vector("x", 3)
        body = json.dumps({"model": "p1", "prompt": "x"}).encode()
        response = await http.post(url + COMPLETIONS, data=body)
        assert response.code == 501
        await response.content()
    finally:
        if process.pid is not None:
            os.kill(process.pid, 15)  # SIGTERM, by the PID of the process this test started
        await watcher.ended.addTimeout(10, reactor)
    # twistd re-raises the signal once shut down, so it ends "by signal 15", after a clean stop.
    assert watcher.reason is not None
    assert watcher.reason.check(ProcessDone, ProcessTerminated)
    assert b"Server Shut Down" in watcher.output
