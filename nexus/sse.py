"""Server-Sent Events framing for relayed streams.

The relay forwards whole events only, so that an error event the gateway adds
after an upstream failure never lands inside a half-written one.
"""

from __future__ import annotations

import json
import re

#: An event ends at the first blank line; SSE allows CRLF, LF or CR line ends.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")

#: Largest event the relay holds while waiting for its end (bounds memory per stream).
MAX_EVENT_BYTES = 1024 * 1024

DONE_EVENT = b"data: [DONE]\n\n"


class EventTooLarge(Exception):
    """An upstream event grew past MAX_EVENT_BYTES without ending."""


class SSEFramer:
    """Cuts a byte stream into complete SSE events, wherever the chunks split."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    @property
    def pending(self) -> bytes:
        """Bytes received after the last complete event."""
        return self._buffer

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the events it completed, each with its terminator."""
        buffer = self._buffer + data if self._buffer else data
        events = []
        start = 0
        for match in _EVENT_END.finditer(buffer):
            events.append(buffer[start : match.end()])
            start = match.end()
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise EventTooLarge(f"stream event larger than {self._max} bytes")
        return events


def event_data(event: bytes) -> bytes:
    """The concatenated ``data:`` field of one event (without the prefix)."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


def is_done(event: bytes) -> bool:
    """Whether the event is the OpenAI end-of-stream marker."""
    # The substring test keeps the parse off every ordinary event.
    return b"[DONE]" in event and event_data(event).strip() == b"[DONE]"


def usage_of(event: bytes) -> tuple[int | None, int | None] | None:
    """Prompt and completion token counts if the event carries ``usage``."""
    if b'"usage"' not in event:
        return None
    try:
        payload = json.loads(event_data(event))
    except (ValueError, RecursionError):
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else None,
        completion if isinstance(completion, int) and not isinstance(completion, bool) else None,
    )


def has_content(event: bytes) -> bool:
    """Whether the event carries generated output (for time to first token).

    Only called until the first such event, so parsing here costs little.
    """
    try:
        payload = json.loads(event_data(event))
    except (ValueError, RecursionError):
        return False
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and any(
            delta.get(key) for key in ("content", "tool_calls", "reasoning_content")
        ):
            return True
    return False


def error_event(body: bytes) -> bytes:
    """An SSE event carrying an OpenAI-style error body."""
    return b"data: " + body + b"\n\n"
