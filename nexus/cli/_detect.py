"""What kind of inference server is at a URL (``nexus backends add`` without ``--type``).

Probes in the contract's order (section 11), each within ``PROBE_SECONDS``: ``GET /api/tags``
answering a model list is Ollama; ``GET /health`` answering ``{"status": "ok"}`` is a llama.cpp
server; ``GET /v1/models`` answering a model list (or refusing a missing key, as servers
started with an API key do) is an OpenAI-compatible server; anything else is ``generic``.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from nexus.cli._http import Answer, Unreachable, get

#: How long one probe may take, in seconds.
PROBE_SECONDS = 2.0


@attrs.frozen
class Detection:
    """The type found and why (for the operator)."""

    type: str
    reason: str
    #: Whether anything answered at all (nothing answering is worth a word to the operator).
    reachable: bool = True


def _tags(answer: Answer) -> bool:
    body = answer.json()
    return answer.status == 200 and isinstance(body, dict) and isinstance(body.get("models"), list)


def _health_ok(answer: Answer) -> bool:
    body = answer.json()
    return answer.status == 200 and isinstance(body, dict) and body.get("status") == "ok"


def _models(answer: Answer) -> bool:
    body = answer.json()
    if answer.status == 200:
        return isinstance(body, dict) and isinstance(body.get("data"), list)
    # An OpenAI-style refusal: a server that wants an API key for its model list.
    return answer.status == 401 and isinstance(body, dict) and isinstance(body.get("error"), dict)


PROBES: tuple[tuple[str, str, Callable[[Answer], bool]], ...] = (
    ("/api/tags", "ollama", _tags),
    ("/health", "llamacpp", _health_ok),
    ("/v1/models", "openai", _models),
)


def detect_type(url: str, timeout: float = PROBE_SECONDS) -> Detection:
    """Probe the server at base ``url`` and say what it is."""
    base = url.rstrip("/")
    failures: list[str] = []
    for path, kind, answers in PROBES:
        try:
            answer = get(base + path, timeout)
        except Unreachable as e:
            failures.append(f"GET {path}: {e}")
            continue
        if answers(answer):
            return Detection(kind, f"GET {path} answered as {kind} does")
    if len(failures) == len(PROBES):
        return Detection("generic", "; ".join(failures), reachable=False)
    return Detection("generic", "no probe was answered as a known type does")
