"""What the mock says: answer bodies, stream events and OpenAI-shaped errors, as bytes.

Bodies that are cached per settings carry ``ID_PLACEHOLDER`` where the response id goes; the
server swaps in a fresh id per answer.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import struct
import time
from collections.abc import Callable, Iterator
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
    "check_completions_body",
    "check_embeddings_body",
    "completion_body",
    "embedding_vector",
    "embeddings_body",
    "endless_events",
    "error",
    "missing_endpoint",
    "parse_inputs",
    "stream_events",
    "stream_pieces",
    "text_completion_body",
    "text_stream_events",
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
_MISSING = {
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    501: ("server_error", "not_implemented"),
}
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


def missing_endpoint(status: int, path: str) -> bytes:
    """The error body of a ``status`` (404, 405, 501) for an endpoint the mock does not serve."""
    type, code = _MISSING[status]
    return error(f"This server does not serve {path}.", type, None, code)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion_tokens(settings: MockSettings, stream: bool) -> int:
    if settings.completion_tokens is not None:
        return settings.completion_tokens
    return settings.stream_chunks if stream else NON_STREAM_COMPLETION_TOKENS


# -- chat ------------------------------------------------------------------------------------


def completion_body(settings: MockSettings, model: str) -> bytes:
    """A chat.completion JSON with ``ID_PLACEHOLDER`` where the response id goes."""
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
            "usage": _usage(settings.prompt_tokens, _completion_tokens(settings, False)),
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
    """Every event of a normal chat stream, ``[DONE]`` included, with ``ID_PLACEHOLDER``s.

    The first is the role event: without ``content`` when a first-token delay follows it.
    """
    maker = _ChunkMaker(model)
    events = [maker.role(with_content=settings.first_token_delay_ms <= 0)]
    events.extend(maker.content(p) for p in stream_pieces(settings.name, settings.stream_chunks))
    events.append(maker.finish())
    if include_usage:
        usage = _usage(settings.prompt_tokens, _completion_tokens(settings, True))
        events.append(maker.event([], usage=usage))
    events.append(DONE)
    return events


# -- legacy text completions -----------------------------------------------------------------


def text_completion_body(settings: MockSettings, model: str) -> bytes:
    """A text_completion JSON (``/v1/completions``) with ``ID_PLACEHOLDER`` for the id.

    One choice whatever the prompt (a list of prompts too), with the chat answer's text.
    """
    text = answer_text(settings.name, settings.stream_chunks)
    return json.dumps(
        {
            "id": f"cmpl-{_ID}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage(settings.prompt_tokens, _completion_tokens(settings, False)),
        }
    ).encode("utf-8")


class _TextChunkMaker:
    """Builds streamed ``text_completion`` events (with ``ID_PLACEHOLDER`` for the id)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.created = int(time.time())

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": f"cmpl-{_ID}",
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n"

    def content(self, text: str, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self.event([choice])


def text_stream_events(settings: MockSettings, model: str, include_usage: bool) -> list[bytes]:
    """Every event of a normal completions stream, ``[DONE]`` included, with ``ID_PLACEHOLDER``s.

    The content events carry the chat stream's pieces (no role event comes first), then an
    event with an empty text and ``finish_reason: "stop"``, the usage event if asked for, and
    ``[DONE]``.
    """
    maker = _TextChunkMaker(model)
    events = [maker.content(p) for p in stream_pieces(settings.name, settings.stream_chunks)]
    events.append(maker.content("", "stop"))
    if include_usage:
        usage = _usage(settings.prompt_tokens, _completion_tokens(settings, True))
        events.append(maker.event([], usage=usage))
    events.append(DONE)
    return events


def endless_events(name: str, model: str, chat: bool = True) -> Iterator[bytes]:
    """Content events for ever: ``Hello``, `` from``, `` <name>``, `` #3``…

    Chat chunks after a role event, or (``chat=False``) text completion events.
    """
    words = ["Hello", " from", f" {name}"]
    content: Callable[[str], bytes]
    if chat:
        maker = _ChunkMaker(model)
        yield maker.role()
        content = maker.content
    else:
        content = _TextChunkMaker(model).content
    for i in itertools.count():
        yield content(words[i] if i < len(words) else f" #{i}")


# -- embeddings ------------------------------------------------------------------------------

#: One input of an embeddings request: a text or a list of token ids.
Input = str | list[int]


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_inputs(value: object, allow_empty_text: bool = False) -> list[Input] | None:
    """The inputs an ``input`` (or ``prompt``) field names, or None if it is malformed.

    As OpenAI takes them: a string, a list of strings, a list of token ids (one input) or a
    list of token-id lists; no list may be empty, nor (unless ``allow_empty_text``) a string.
    """
    if isinstance(value, str):
        return [value] if value or allow_empty_text else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) and (v or allow_empty_text) for v in value):
        return list(value)
    if all(_is_token(v) for v in value):
        return [value]
    if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
        return list(value)
    return None


def embedding_vector(item: Input, dimensions: int) -> list[float]:
    """The mock's embedding of one input: ``dimensions`` floats, deterministic, unit length.

    SHAKE-256 of the input (a text and a token list never share a key) gives 4 bytes per
    component, read as an unsigned int mapped to [-1, 1); the vector is scaled to unit length
    and rounded to float32, so its base64 form decodes to exactly these floats.
    """
    if isinstance(item, str):
        key = b"text:" + item.encode("utf-8")
    else:
        key = b"tokens:" + ",".join(map(str, item)).encode("ascii")
    raw = hashlib.shake_256(key).digest(4 * dimensions)
    values = [u / 2**31 - 1.0 for u in struct.unpack(f"<{dimensions}I", raw)]
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def embeddings_body(
    settings: MockSettings, model: str, inputs: list[Input], encoding: str = "float"
) -> bytes:
    """An embeddings response: one vector per input, as floats or (``"base64"``) as the
    base64 of their little-endian float32 bytes, as OpenAI sends them."""
    dimensions = settings.embedding_dimensions
    data = []
    for index, item in enumerate(inputs):
        vector = embedding_vector(item, dimensions)
        embedding: list[float] | str = vector
        if encoding == "base64":
            packed = struct.pack(f"<{dimensions}f", *vector)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = settings.prompt_tokens * len(inputs)
    return json.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    ).encode("utf-8")


# -- request checks --------------------------------------------------------------------------

Refusal = tuple[int, bytes]


def _request(body: object) -> dict[str, Any] | Refusal:
    """``body`` if it is an object with a string ``model``, else the refusal."""
    if not isinstance(body, dict):
        return 400, error(
            "The request body must be a JSON object.", "invalid_request_error", None, None
        )
    if not isinstance(body.get("model"), str):
        return 400, error(
            "'model' is required and must be a string.", "invalid_request_error", "model", None
        )
    return body


def _check_model_known(model: str, models: list[str]) -> Refusal | None:
    if model in models:
        return None
    return 404, error(
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def _check_temperature(body: dict[str, Any]) -> Refusal | None:
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and temperature > 2:
        return 400, _ERROR_TEMPERATURE
    return None


def check_chat_body(body: object, models: list[str]) -> Refusal | None:
    """Validate a chat request body; return (status, error body) if it must be refused."""
    request = _request(body)
    if isinstance(request, tuple):
        return request
    if not isinstance(request.get("messages"), list):
        return 400, error(
            "'messages' is required and must be a list.", "invalid_request_error", "messages", None
        )
    return _check_temperature(request) or _check_model_known(request["model"], models)


def check_completions_body(body: object, models: list[str]) -> Refusal | None:
    """Validate a ``/v1/completions`` body (``model``, ``prompt``); return a refusal or None.

    ``prompt``: a string (empty too), a list of strings, of token ids or of token-id lists.
    """
    request = _request(body)
    if isinstance(request, tuple):
        return request
    if parse_inputs(request.get("prompt"), allow_empty_text=True) is None:
        return 400, error(
            "'prompt' is required: a string, a list of strings, a list of token ids or a list "
            "of token-id lists.",
            "invalid_request_error",
            "prompt",
            None,
        )
    return _check_temperature(request) or _check_model_known(request["model"], models)


def check_embeddings_body(body: object, models: list[str]) -> Refusal | None:
    """Validate a ``/v1/embeddings`` body; return (status, error body) if it must be refused.

    ``input`` as ``parse_inputs`` takes it; ``encoding_format`` absent, ``null``,
    ``"float"`` or ``"base64"``.
    """
    request = _request(body)
    if isinstance(request, tuple):
        return request
    if parse_inputs(request.get("input")) is None:
        return 400, error(
            "'input' is required: a non-empty string, a list of strings, a list of token ids "
            "or a list of token-id lists (no list empty).",
            "invalid_request_error",
            "input",
            None,
        )
    if request.get("encoding_format") not in (None, "float", "base64"):
        return 400, error(
            "'encoding_format' must be 'float' or 'base64'.",
            "invalid_request_error",
            "encoding_format",
            None,
        )
    return _check_model_known(request["model"], models)
