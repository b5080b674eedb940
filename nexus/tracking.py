"""Exactly-once request recording.

Every inference request gets one ``RequestRecord`` when its handler starts.
The handler fills in what it learns (model, backend, error, tokens); the
record is written to the metrics exactly once, when the request's
``notifyFinish`` Deferred fires: on its callback when the last byte was
written, on its errback when the client went away first (status 499).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from nexus.metrics import MetricsCollector

log = Logger()

#: Status recorded for a client that left before the last byte was written.
CLIENT_CLOSED = 499


@attrs.define(eq=False)
class RequestRecord:
    """What is known so far about one client request."""

    started: float
    model: str | None = None
    backend: str | None = None
    error_type: str | None = None
    fallback_from: str | None = None
    fallback_to: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token: float | None = None
    recorded: bool = False
    #: The client went away before the response was finished.
    client_gone: bool = False

    def set_usage(self, prompt: int | None, completion: int | None) -> None:
        """Keep token counts reported by the backend."""
        self.prompt_tokens = prompt
        self.completion_tokens = completion

    def write(self, recorder: MetricsCollector, status: int, now: float) -> None:
        """Record the finished request, once; a metrics failure is only logged."""
        if self.recorded:
            return
        self.recorded = True
        try:
            recorder.record_request(
                self.model,
                self.backend,
                status,
                now - self.started,
                self.error_type,
                self.fallback_from,
                self.fallback_to,
                self.prompt_tokens,
                self.completion_tokens,
                self.time_to_first_token,
            )
        except Exception:
            log.failure("recording a request's metrics failed")


def track(request: Any, recorder: MetricsCollector, clock: Callable[[], float]) -> RequestRecord:
    """Start a record for ``request``, written when the request finishes or is lost."""
    record = RequestRecord(started=clock())

    def finished(_: object) -> None:
        record.write(recorder, request.code, clock())

    def lost(_: Failure) -> None:
        record.client_gone = True
        record.error_type = "client_disconnect"
        record.write(recorder, CLIENT_CLOSED, clock())

    request.notifyFinish().addCallbacks(finished, lost)
    return record
