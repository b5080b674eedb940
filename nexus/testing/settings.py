"""The mock backend's knobs (``MockSettings``), their validation and the constants they name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from nexus.config import BACKEND_TYPES

__all__ = [
    "BACKEND_TYPES",
    "ENDPOINTS",
    "FAIL_MODES",
    "HUGE_LENGTH",
    "MISSING_ENDPOINT_STATUSES",
    "NON_STREAM_COMPLETION_TOKENS",
    "RESET_AFTER_SECONDS",
    "SETTING_NAMES",
    "STREAM_FRAMINGS",
    "MockSettings",
]

#: Values of ``MockSettings.fail``; what each does is described on ``MockSettings``.
FAIL_MODES = (
    "500",
    "503",
    "hang",
    "reset",
    "invalid_json",
    "stall",
    "truncated_sse",
    "huge_length",
    "endless",
    "close",
)

#: The inference endpoints, as ``MockSettings.endpoints`` names them, and their paths.
ENDPOINTS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}

#: Values of ``MockSettings.missing_endpoint_status``: how real servers say they lack a path.
MISSING_ENDPOINT_STATUSES = (404, 405, 501)

#: Values of ``MockSettings.stream_framing``: how a streamed body is delimited on the wire.
STREAM_FRAMINGS = ("chunked", "close")

#: ``usage.completion_tokens`` of a non-streaming answer (a stream counts its content events).
NON_STREAM_COMPLETION_TOKENS = 5

#: How long "reset" waits between writing part of a response and aborting the connection, so the
#: part is flushed to the client first (an abort discards whatever is still buffered).
RESET_AFTER_SECONDS = 0.05

#: The Content-Length that "huge_length" announces (2 GiB, one past the largest int32).
HUGE_LENGTH = 2147483648


def _non_negative(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{attribute.name} must be a number >= 0, got {value!r}")


def _int_at_least(low: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{attribute.name} must be an integer >= {low}, got {value!r}")

    return check


def _optional_count(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _int_at_least(0)(inst, attribute, value)


def _one_of(
    choices: Sequence[str | None],
) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            shown = ", ".join("null" if c is None else c for c in choices)
            raise ValueError(f"{attribute.name} must be one of {shown}; got {value!r}")

    return check


def _string(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _model_list(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise ValueError(f"{attribute.name} must be a list of non-empty strings, got {value!r}")


def _endpoint_list(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, list)
        or not all(isinstance(e, str) and e in ENDPOINTS for e in value)
        or len(set(value)) != len(value)
    ):
        raise ValueError(
            f"{attribute.name} must be a list of distinct names out of "
            f"{', '.join(ENDPOINTS)}; got {value!r}"
        )


def _status(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value not in MISSING_ENDPOINT_STATUSES
    ):
        shown = ", ".join(str(s) for s in MISSING_ENDPOINT_STATUSES)
        raise ValueError(f"{attribute.name} must be one of {shown}; got {value!r}")


def _bool(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be true or false, got {value!r}")


@attrs.define
class MockSettings:
    """The mock's knobs; mutable, and validated on every assignment.

    ``type`` decides which discovery endpoints answer (``/api/tags`` for ollama, ``/health`` for
    llamacpp and vllm, ``/v1/models`` for all). ``latency_ms`` delays the headers of every
    inference response (chat, completions, embeddings), ``health_latency_ms`` those of every
    discovery response.

    Inference endpoints: ``POST /v1/chat/completions`` (``chat``), ``POST /v1/completions``
    (``completions``, the legacy text completion) and ``POST /v1/embeddings`` (``embeddings``),
    in the OpenAI shape. ``endpoints`` lists those the mock serves (default all three); a request
    to one not listed gets ``missing_endpoint_status`` (404, 405 with an empty ``Allow``, or 501)
    with an OpenAI error body (code ``not_found``, ``method_not_allowed`` or ``not_implemented``),
    whatever its method, as a server lacking the path does. That answer comes at once: ``fail``
    and ``latency_ms`` do not apply to it and it does not use up ``fail_count`` (it is still
    counted in the stats).

    The answer (chat and completions) is ``Hello from <name>``, streamed or not: a stream cuts
    it into ``stream_chunks`` content events (three say ``Hello``, `` from``, `` <name>``; more
    cut the words, and past one character each the rest are empty), so the streamed text equals
    the non-streamed one for the same settings (with ``stream_chunks=0`` both are empty). A
    completions answer has one choice, whatever the prompt (a list of prompts too).
    ``stream_delay_ms`` spaces the events of a stream.
    ``first_token_delay_ms`` (stream only): the headers go out at once (for chat with an event
    with only ``delta: {"role": "assistant"}``), the first content event this long after (then
    ``stream_delay_ms`` between events); 0 sends the first content event (for chat a role event
    with ``"content": ""`` first) with no extra wait. A completions stream has no role event.
    ``stream_framing``: ``"chunked"`` sends a streamed body with ``Transfer-Encoding: chunked``;
    ``"close"`` sends it close-delimited (``Connection: close``, neither Content-Length nor
    Transfer-Encoding, the body ends when the mock closes the connection), as HTTP/1.0 and many
    small servers do.

    Embeddings: one vector of ``embedding_dimensions`` floats per input (a string, or a list of
    token ids), derived from a hash of the input alone (same input, same vector, whatever the
    model or the request), of unit length, and exact in float32, so ``encoding_format:
    "base64"`` (little-endian float32, what the ``openai`` SDK asks for by default) decodes to
    the very floats ``"float"`` sends. ``usage.prompt_tokens`` is ``prompt_tokens`` per input.

    ``fail`` makes the inference endpoints misbehave, all alike, for the next ``fail_count``
    inference requests (then it clears itself; -1 = until changed); embeddings never stream,
    so they get the non-stream behaviour:

    - ``"500"`` / ``"503"``: that status with an OpenAI error body.
    - ``"hang"``: never answer; the request stays open until the client leaves.
    - ``"reset"``: headers and part of the body (one event for a stream), then a TCP reset.
    - ``"invalid_json"``: 200, ``application/json``, body ``not json{`` (streams too).
    - ``"stall"``: stream: headers and two events, then silence with the connection open;
      non-stream: headers with the full Content-Length and half the body, then silence.
    - ``"truncated_sse"``: stream: one event and half of the next, then, chunked, the body is
      ended properly and the connection closed (a clean end without ``[DONE]``) or, with
      ``stream_framing="close"``, the connection closed right there, mid-event (counted as
      aborted); non-stream: half the announced body, then the connection is closed (FIN, not
      reset).
    - ``"huge_length"``: 200 with ``Content-Length: 2147483648``, a few bytes, then silence.
    - ``"endless"``: stream: an event every ``max(stream_delay_ms, 1)`` ms until the client
      leaves (``first_token_delay_ms`` does not apply); non-stream: a chunked JSON body that
      never ends (a space every interval).
    - ``"close"``: the connection is closed (FIN) without a byte of an answer, right after
      the request is read: what a client sees when a kept connection's idle close (uvicorn's
      keep-alive time, 5 s under vLLM) crosses its request on the wire.

    ``health_fail`` makes discovery endpoints answer 500; ``flap`` makes each discovery path
    alternate success / 500 on every probe (first one succeeds; paths alternate independently,
    so a check that probes two paths sees both succeed or both fail).
    ``prompt_tokens`` is ``usage.prompt_tokens`` of a chat or completions answer (whatever the
    prompt) and of each embeddings input.
    ``completion_tokens`` overrides ``usage.completion_tokens``; by default it is the number of
    content events (``stream_chunks``) for a stream and 5 otherwise.

    Every header the mock adds of its own is named ``x-mock-*``: ``x-mock-backend`` (the name)
    and ``x-mock-hop``; both are listed in ``Connection`` (hop-by-hop: a proxy must strip them).
    """

    name: str = attrs.field(default="mock", validator=_string)
    models: list[str] = attrs.field(factory=lambda: ["mock-model"], validator=_model_list)
    type: str = attrs.field(default="openai", validator=_one_of(BACKEND_TYPES))
    latency_ms: float = attrs.field(default=0.0, validator=_non_negative)
    stream_chunks: int = attrs.field(default=5, validator=_int_at_least(0))
    stream_delay_ms: float = attrs.field(default=0.0, validator=_non_negative)
    first_token_delay_ms: float = attrs.field(default=0.0, validator=_non_negative)
    stream_framing: str = attrs.field(default="chunked", validator=_one_of(STREAM_FRAMINGS))
    fail: str | None = attrs.field(default=None, validator=_one_of((None, *FAIL_MODES)))
    fail_count: int = attrs.field(default=-1, validator=_int_at_least(-1))
    health_fail: bool = attrs.field(default=False, validator=_bool)
    flap: bool = attrs.field(default=False, validator=_bool)
    health_latency_ms: float = attrs.field(default=0.0, validator=_non_negative)
    prompt_tokens: int = attrs.field(default=10, validator=_int_at_least(0))
    completion_tokens: int | None = attrs.field(default=None, validator=_optional_count)
    embedding_dimensions: int = attrs.field(default=8, validator=_int_at_least(1))
    endpoints: list[str] = attrs.field(factory=lambda: list(ENDPOINTS), validator=_endpoint_list)
    missing_endpoint_status: int = attrs.field(default=404, validator=_status)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (what ``GET /_mock/config`` answers)."""
        return attrs.asdict(self)


#: Every knob's name, as ``MockBackend.configure`` and ``POST /_mock/config`` accept them.
SETTING_NAMES = frozenset(a.name for a in attrs.fields(MockSettings))
