"""StreamRelay and Deadline in memory: a Clock for time, StringTransports for both sides."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from nexus import sse
from nexus.proxy import StreamFailed, StreamRelay
from nexus.tracking import RequestRecord
from nexus.upstream import Deadline, UpstreamTimeout

ROLE = b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
HELLO = b'data: {"choices": [{"delta": {"content": "Hello"}}]}\n\n'
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
DONE = b"data: [DONE]\n\n"


def relay_on(
    clock: Clock, timeout: float = 5.0
) -> tuple[StreamRelay, StringTransport, RequestRecord]:
    record = RequestRecord(started=clock.seconds())
    relay = StreamRelay(record, timeout, clock, clock.seconds)
    upstream = StringTransport()
    relay.makeConnection(upstream)
    return relay, upstream, record


def outcome(d: Deferred[None]) -> object:
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def events_of(client: StringTransport) -> list[bytes]:
    return [e + b"\n\n" for e in client.value().split(b"\n\n") if e]


def test_buffers_until_written_then_relays_as_events_come() -> None:
    clock = Clock()
    relay, upstream, record = relay_on(clock)
    relay.dataReceived(ROLE)
    assert outcome(relay.ready) is None
    clock.advance(0.3)
    relay.dataReceived(HELLO[:10])
    client = StringTransport()
    done = relay.write_to(client)
    assert client.value() == ROLE  # half an event is never relayed
    assert client.producer is upstream  # a slow client pauses the backend
    relay.dataReceived(HELLO[10:] + USAGE + DONE)
    relay.connectionLost(Failure(ResponseDone()))
    assert outcome(done) is None
    assert client.value() == ROLE + HELLO + USAGE + DONE  # no second [DONE]
    assert client.producer is None
    assert record.time_to_first_token == pytest.approx(0.3)  # the first *content* event
    assert (record.prompt_tokens, record.completion_tokens) == (3, 1)
    assert record.error_type is None


def test_a_close_delimited_body_ended_after_done_is_a_normal_end() -> None:
    # HTTP/1.0-style body: the backend closes the connection; Twisted says PotentialDataLoss.
    relay, _, record = relay_on(Clock())
    relay.dataReceived(HELLO + DONE)
    client = StringTransport()
    done = relay.write_to(client)
    relay.connectionLost(Failure(PotentialDataLoss()))
    assert outcome(done) is None
    assert client.value() == HELLO + DONE
    assert record.error_type is None


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (HELLO[:12], PotentialDataLoss()),  # closed inside an event
        (b"", PotentialDataLoss()),  # closed between events, before [DONE]: cut, not ended
        (HELLO[:12], ResponseDone()),  # chunked body ended inside an event
        (b"", ResponseFailed([Failure(ConnectionError("reset"))])),
    ],
)
def test_a_stream_cut_after_the_first_event_ends_with_one_error_event(
    tail: bytes, reason: Exception
) -> None:
    relay, _, record = relay_on(Clock())
    relay.dataReceived(HELLO + tail)
    client = StringTransport()
    done = relay.write_to(client)
    relay.connectionLost(Failure(reason))
    assert outcome(done) is None
    events = events_of(client)
    assert events[0] == HELLO and events[-1] == DONE and len(events) == 3
    error = json.loads(sse.event_data(events[1]))["error"]
    assert error["code"] == "bad_gateway"
    assert record.error_type == "backend_error"


def test_a_chunked_body_ended_between_events_without_done_gets_done() -> None:
    relay, _, record = relay_on(Clock())
    relay.dataReceived(HELLO)
    client = StringTransport()
    done = relay.write_to(client)
    relay.connectionLost(Failure(ResponseDone()))
    assert outcome(done) is None
    assert client.value() == HELLO + DONE
    assert record.error_type is None


def test_a_break_before_any_event_fails_ready_so_the_attempt_can_be_retried() -> None:
    relay, _, _ = relay_on(Clock())
    relay.dataReceived(HELLO[:8])
    relay.connectionLost(Failure(PotentialDataLoss()))
    failure = outcome(relay.ready)
    assert isinstance(failure, Failure) and failure.check(StreamFailed)


def test_idle_timeout_before_and_after_the_first_event() -> None:
    clock = Clock()
    relay, upstream, _ = relay_on(clock, timeout=1.0)
    clock.advance(1.0)
    failure = outcome(relay.ready)
    assert isinstance(failure, Failure) and failure.check(StreamFailed)
    assert failure.value.error.error_type == "timeout"
    assert upstream.producerState == "stopped"

    relay, upstream, record = relay_on(clock, timeout=1.0)
    relay.dataReceived(HELLO)
    client = StringTransport()
    done = relay.write_to(client)
    clock.advance(0.9)
    relay.dataReceived(HELLO)  # every event re-arms the timer: a flowing stream is never cut
    clock.advance(0.9)
    assert not done.called
    clock.advance(0.1)
    assert outcome(done) is None
    assert b'"gateway_timeout"' in client.value() and client.value().endswith(DONE)
    assert record.error_type == "timeout" and upstream.producerState == "stopped"


def test_a_client_leaving_stops_the_upstream_at_once() -> None:
    clock = Clock()
    relay, upstream, _ = relay_on(clock)
    relay.dataReceived(HELLO)
    client = StringTransport()
    done = relay.write_to(client)
    done.cancel()
    failure = outcome(done)
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    assert upstream.producerState == "stopped"
    assert clock.getDelayedCalls() == []  # no idle timer left behind

    relay, upstream, _ = relay_on(clock)
    relay.dataReceived(HELLO)
    relay.stop()  # gone before the stream was written
    assert upstream.producerState == "stopped"
    assert clock.getDelayedCalls() == []


def test_deadline_bounds_every_step_with_one_timer() -> None:
    clock = Clock()
    deadline = Deadline(clock, 2.0)
    first: Deferred[str] = Deferred()
    watched = deadline.watch(first)
    clock.advance(1.5)
    first.callback("headers")
    assert outcome(watched) == "headers"
    second: Deferred[str] = Deferred()
    watched = deadline.watch(second)
    clock.advance(0.5)  # 2 s in all: the second step gets what the first left
    failure = outcome(watched)
    assert isinstance(failure, Failure) and failure.check(UpstreamTimeout)
    # A step watched after expiry is cancelled at once.
    late = deadline.watch(Deferred())
    failure = outcome(late)
    assert isinstance(failure, Failure) and failure.check(UpstreamTimeout)


def test_deadline_cancel_leaves_no_timer() -> None:
    clock = Clock()
    deadline = Deadline(clock, 2.0)
    d: Deferred[int] = Deferred()
    watched = deadline.watch(d)
    d.callback(1)
    assert outcome(watched) == 1
    deadline.cancel()
    assert clock.getDelayedCalls() == []
