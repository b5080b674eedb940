"""SSE framing: whole events come out wherever the upstream splits its chunks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus import sse

payloads = st.dictionaries(
    st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=20)), max_size=4
)
terminators = st.sampled_from([b"\n\n", b"\r\n\r\n"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    events = [
        b"data: " + json.dumps(p).encode() + draw(terminators) for p in draw(st.lists(payloads))
    ]
    events.append(sse.DONE_EVENT)
    total = sum(map(len, events))
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=20)))
    return events, cuts


@given(streams())
def test_events_survive_any_chunking(stream: tuple[list[bytes], list[int]]) -> None:
    events, cuts = stream
    data = b"".join(events)
    framer = sse.SSEFramer()
    out: list[bytes] = []
    previous = 0
    for cut in [*cuts, len(data)]:
        out.extend(framer.feed(data[previous:cut]))
        previous = cut
    assert out == events
    assert framer.pending == b""


def test_partial_event_is_held_back() -> None:
    framer = sse.SSEFramer()
    assert framer.feed(b'data: {"a": 1}\n\ndata: {"b"') == [b'data: {"a": 1}\n\n']
    assert framer.pending == b'data: {"b"'


def test_oversized_event_is_refused() -> None:
    framer = sse.SSEFramer(max_event_bytes=10)
    with pytest.raises(sse.EventTooLarge):
        framer.feed(b"data: " + b"x" * 20)


def test_done_usage_and_content_detection() -> None:
    assert sse.is_done(b"data: [DONE]\n\n")
    assert not sse.is_done(b'data: {"x": "[DONE]"}\n\n')
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'
    assert sse.usage_of(usage) == (7, 3)
    assert sse.usage_of(b'data: {"usage": null}\n\n') is None
    assert sse.usage_of(b"data: not json usage\n\n") is None
    role = b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
    text = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
    assert not sse.has_content(role)
    assert sse.has_content(text)


@given(st.binary(max_size=200))
def test_helpers_never_raise_on_garbage(event: bytes) -> None:
    sse.is_done(event)
    sse.usage_of(event)
    sse.has_content(event)
