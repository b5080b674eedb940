"""What the mock says: answer bodies, stream events and OpenAI-shaped errors, as bytes.

Bodies that are cached per settings carry ``ID_PLACEHOLDER`` where the response id goes; the
server swaps in a fresh id per answer.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

from nexus.testing.settings import NON_STREAM_COMPLETION_TOKENS, MockSettings

__all__ = [
    "DONE",
    "ERROR_404",
    "ERROR_405",
    "ERROR_500",
    "ERROR_503",
    "ERROR_HEALTH",
    "HALF_EVENT",
    "ID_PLACEHOLDER",
    "answer_text",
    "check_chat_body",
    "completion_body",
    "endless_events",
    "error",
    "stream_events",
    "stream_pieces",
]

#: Stands for the response id in cached bodies (bytes, as it is replaced in bytes).
ID_PLACEHOLDER = b"@@MOCK_ID@@"
_ID = ID_PLACEHOLDER.decode("ascii")

#: The event that ends a normal stream.
DONE = b"data: [DONE]\n\n"
#: The first bytes of an event: what "truncated_sse" sends of the event it cuts.
HALF_EVENT = b'data: {"id": '


def error(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    """An OpenAI error body."""
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    ).encode("utf-8")


ERROR_500 = error("mock backend failure (fail=500)", "server_error", None, "internal_error")
ERROR_503 = error("mock backend overloaded (fail=503)", "server_error", None, "service_unavailable")
ERROR_HEALTH = error("mock backend unhealthy", "server_error", None, "internal_error")
ERROR_404 = error("Not found", "invalid_request_error", None, "not_found")
ERROR_405 = error("Method not allowed", "invalid_request_error", None, "method_not_allowed")
_ERROR_TEMPERATURE = error("temperature must be <= 2", "invalid_request_error", "temperature", None)


def answer_text(name: str, chunks: int) -> str:
    """The answer of a backend ``name``, streamed in ``chunks`` content events or not.

    ``Hello from <name>``; empty when a stream would have no content event.
    """
    return f"Hello from {name}" if chunks > 0 else ""


def stream_pieces(name: str, chunks: int) -> list[str]:
    """The content deltas of a stream of ``chunks`` content events from a backend ``name``.

    They spell ``answer_text(name, chunks)``. The text is cut first at its two spaces (so three
    events say ``Hello``, `` from``, `` <name>``), then inside `` from``, then inside the name,
    then inside ``Hello``; events past one per character carry empty deltas.
    """
    if chunks <= 0:
        return []
    text = answer_text(name, chunks)
    first, second = len("Hello"), len("Hello from")
    # Where to cut, best first: the word boundaries, then inside " from", the name, "Hello".
    cuts = [first, second, *range(first + 1, second), *range(second + 1, len(text))]
    cuts.extend(range(1, first))
    bounds = [0, *sorted(cuts[: chunks - 1]), len(text)]
    pieces = [text[start:end] for start, end in itertools.pairwise(bounds)]
    return pieces + [""] * (chunks - len(pieces))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_body(settings: MockSettings, model: str) -> bytes:
    """A chat.completion JSON with ``ID_PLACEHOLDER`` where the response id goes."""
    completion = settings.completion_tokens
    if completion is None:
        completion = NON_STREAM_COMPLETION_TOKENS
    text = answer_text(settings.name, settings.stream_chunks)
    return json.dumps(
        {
            "id": f"chatcmpl-{_ID}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(settings.prompt_tokens, completion),
        }
    ).encode("utf-8")


class _ChunkMaker:
    """Builds ``chat.completion.chunk`` events (with ``ID_PLACEHOLDER`` for the stream id)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.created = int(time.time())

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": f"chatcmpl-{_ID}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n"

    def role(self, with_content: bool = True) -> bytes:
        delta = {"role": "assistant", "content": ""} if with_content else {"role": "assistant"}
        return self.event([{"index": 0, "delta": delta, "finish_reason": None}])

    def content(self, text: str) -> bytes:
        return self.event([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def finish(self) -> bytes:
        return self.event([{"index": 0, "delta": {}, "finish_reason": "stop"}])


def stream_events(settings: MockSettings, model: str, include_usage: bool) -> list[bytes]:
    """Every event of a normal stream, ``[DONE]`` included, with ``ID_PLACEHOLDER``s.

    The first is the role event: without ``content`` when a first-token delay follows it.
    """
    maker = _ChunkMaker(model)
    n = settings.stream_chunks
    events = [maker.role(with_content=settings.first_token_delay_ms <= 0)]
    events.extend(maker.content(piece) for piece in stream_pieces(settings.name, n))
    events.append(maker.finish())
    if include_usage:
        completion = n if settings.completion_tokens is None else settings.completion_tokens
        events.append(maker.event([], usage=_usage(settings.prompt_tokens, completion)))
    events.append(DONE)
    return events


def endless_events(name: str, model: str) -> Iterator[bytes]:
    """A role event, then content events for ever: ``Hello``, `` from``, `` <name>``, `` #3``…"""
    maker = _ChunkMaker(model)
    yield maker.role()
    words = ["Hello", " from", f" {name}"]
    for i in itertools.count():
        yield maker.content(words[i] if i < len(words) else f" #{i}")


def check_chat_body(body: object, models: list[str]) -> tuple[int, bytes] | None:
    """Validate a chat request body; return (status, error body) if it must be refused."""
    if not isinstance(body, dict):
        return 400, error(
            "The request body must be a JSON object.", "invalid_request_error", None, None
        )
    model = body.get("model")
    if not isinstance(model, str):
        return 400, error(
            "'model' is required and must be a string.", "invalid_request_error", "model", None
        )
    if not isinstance(body.get("messages"), list):
        return 400, error(
            "'messages' is required and must be a list.", "invalid_request_error", "messages", None
        )
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and temperature > 2:
        return 400, _ERROR_TEMPERATURE
    if model not in models:
        return 404, error(
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    return None
