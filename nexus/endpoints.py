"""The inference endpoints (contract section 1): what each one requires of a request body.

Everything else - routing, retries, timeouts, the streaming relay, errors,
access, request ids, the request log and the metrics - is the same for all of
them (``nexus.proxy.InferenceProxy``); an endpoint is only these few facts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from nexus.errors import InvalidRequest
from nexus.routing import request_needs

_NO_NEEDS: frozenset[str] = frozenset()

#: The scanner ``json.loads`` ends in (C; set by ``JSONDecoder.__init__``, not in its stubs),
#: and the whitespace JSON allows around a value.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_SPACE = " \t\n\r"


def json_body(data: bytes) -> Any:
    """``json.loads(data)``, without its general steps for the usual body.

    A body that starts with ``{`` and a non-zero byte is UTF-8 by
    ``json.loads``'s own detection (RFC 8259 section 8.1): it is decoded the
    same way and read by the same C scanner, skipping the detection (in
    Python) and the two whitespace regexes around the value: about a tenth
    of a request's Python work at one connection. Anything else goes to
    ``json.loads``. Raises what it raises (ValueError, UnicodeDecodeError,
    RecursionError).
    """
    if data[:1] != b"{" or data[1:2] == b"\x00":
        return json.loads(data)
    text = data.decode("utf-8", "surrogatepass")
    value, end = _SCAN(text, 0)  # a "{" is always the start of a value: no StopIteration
    if end != len(text) and text[end:].strip(_JSON_SPACE):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _messages(payload: dict[str, Any]) -> None:
    if not isinstance(payload.get("messages"), list):
        raise InvalidRequest("'messages' is required and must be a list.", "messages")


def _prompt(payload: dict[str, Any]) -> None:
    if not isinstance(payload.get("prompt"), str | list):
        raise InvalidRequest(
            "'prompt' is required and must be a string or a list.", "prompt"
        )


def _input(payload: dict[str, Any]) -> None:
    value = payload.get("input")
    if not (isinstance(value, str) or (isinstance(value, list) and value)):
        raise InvalidRequest(
            "'input' is required: a string, a list of strings or a list of token lists.",
            "input",
        )


def _no_needs(payload: object) -> frozenset[str]:
    return _NO_NEEDS


@attrs.frozen
class Endpoint:
    """One inference endpoint.

    ``name`` is the request log's ``endpoint``; ``check`` raises InvalidRequest
    for a body that lacks what the endpoint requires (``model`` is checked for
    all); ``streams`` says whether ``"stream": true`` is relayed as SSE;
    ``optional`` endpoints may be missing on a backend (it answers 404, 405 or
    501), which is then skipped for this endpoint; ``needs`` gives the
    capabilities a body needs (vision, tools, json_mode: chat only).
    """

    name: str
    path: bytes
    check: Callable[[dict[str, Any]], None]
    streams: bool
    optional: bool
    needs: Callable[[object], frozenset[str]] = _no_needs

    def parse(self, body: bytes) -> dict[str, Any]:
        """Decode and check a request body; raise InvalidRequest with the reason."""
        try:
            payload = json_body(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("The request body is not valid JSON.") from None
        except RecursionError:
            raise InvalidRequest("The request body is nested too deeply.") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required and must be a non-empty string.", "model")
        self.check(payload)
        return payload


CHAT = Endpoint("chat", b"/v1/chat/completions", _messages, True, False, request_needs)
COMPLETIONS = Endpoint("completions", b"/v1/completions", _prompt, True, True)
EMBEDDINGS = Endpoint("embeddings", b"/v1/embeddings", _input, False, True)

#: Every inference endpoint, by path.
ENDPOINTS: dict[bytes, Endpoint] = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS)}

#: HTTP statuses with which a backend says it lacks an endpoint.
MISSING_ENDPOINT = frozenset({404, 405, 501})
