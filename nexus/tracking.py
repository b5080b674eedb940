"""The record of one inference request, written exactly once.

Every inference request gets one ``RequestRecord`` when the server layer
starts serving it (``nexus.server.Exchange``). The handler fills in what it
learns (model, backend, error, tokens); the exchange finishes the record
exactly once, when the last byte was written, or as status 499 when the
client went away first, and hands it to the metrics collector.
"""

from __future__ import annotations

import attrs

#: Status recorded for a client that left before the last byte was written.
CLIENT_CLOSED = 499


@attrs.define(eq=False)
class RequestRecord:
    """What is known about one client request; ``status`` and ``duration`` once finished.

    ``model`` is the name the client asked for (None: no usable model),
    ``actual_model`` the one sent to the backend (after alias and fallback),
    ``backend`` the last backend tried (None: none chosen), ``duration`` and
    ``time_to_first_token`` are seconds. Everything here but ``prompt_preview``
    may be shown to operators (the request log, ``/v1/history``): never keys,
    headers or bodies.
    """

    started: float
    #: The request id (the client's ``x-request-id`` when valid, else a new one).
    request_id: str = ""
    #: Which inference endpoint: ``chat`` (later ``completions``, ``embeddings``).
    endpoint: str = "chat"
    #: The client's address (host).
    client: str | None = None
    #: The worker process that served it (worker mode), None in a single process.
    worker: int | None = None
    model: str | None = None
    actual_model: str | None = None
    backend: str | None = None
    backend_type: str | None = None
    stream: bool = False
    #: Attempts made on backends (retries are attempts - 1).
    attempts: int = 0
    #: Why this backend: strategy and score, alias and fallback taken, retries.
    route_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    fallback_from: str | None = None
    fallback_to: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token: float | None = None
    #: The HTTP status sent (CLIENT_CLOSED when the client left first); set by ``finish``.
    status: int = 0
    #: Seconds from the start to the last byte; set by ``finish``.
    duration: float = 0.0
    #: Set once ``finish`` ran: the record is complete and must not change.
    finished: bool = False
    #: The client went away before the response was finished.
    client_gone: bool = False
    #: The first characters of the last user message, only with ``content_preview`` on
    #: (last: every field before it is what a worker sends to the others).
    prompt_preview: str | None = None

    def set_usage(self, prompt: int | None, completion: int | None) -> None:
        """Keep token counts reported by the backend."""
        self.prompt_tokens = prompt
        self.completion_tokens = completion

    def finish(self, status: int, now: float) -> bool:
        """Close the record with its final status; False if it was already closed."""
        if self.finished:
            return False
        self.finished = True
        self.status = status
        self.duration = now - self.started
        return True
