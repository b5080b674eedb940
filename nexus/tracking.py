"""Exactly-once request recording.

Every inference request gets one ``RequestRecord`` when its handler starts.
The handler fills in what it learns (model, backend, error, tokens); the
request (``nexus.api.NexusRequest``) writes the record to the metrics exactly
once: when its last byte was written, or as status 499 when the client went
away first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.logger import Logger

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


def track(request: Any, clock: Callable[[], float]) -> RequestRecord:
    """Start the record of an inference request.

    ``NexusRequest`` writes it once: when the request finishes, or as 499
    when the connection is lost first.
    """
    record = RequestRecord(started=clock())
    request.nexus_record = record
    return record
