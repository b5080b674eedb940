"""The request log (contract section 8): one event per finished inference request.

``RequestLog.record`` is a recorder of the server layer, called at the same
single moment as the metrics collector's, with the same record: the request
log and ``/metrics`` cannot disagree. Each event goes to the gateway's log
(namespace ``nexus.requests``, through ``twisted.logger``) and into a
fixed-size history for ``GET /v1/history``.
"""

from __future__ import annotations

import re
import time
from collections import deque
from typing import Any

from twisted.logger import Logger, LogLevel

from nexus.tracking import CLIENT_CLOSED, RequestRecord

#: Finished requests kept for ``/v1/history`` (a ring: memory never grows).
HISTORY_SIZE = 100

#: The namespace of request events in the log.
NAMESPACE = "nexus.requests"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def request_event(record: RequestRecord) -> dict[str, Any]:
    """The contract's fields of one finished request (JSON-ready; no preview)."""
    status = record.status
    if 200 <= status < 300:
        outcome = "success"
    elif status == CLIENT_CLOSED and record.client_gone:
        outcome = "client_disconnect"
    else:
        outcome = "error"
    ttft = record.time_to_first_token
    event: dict[str, Any] = {
        "request_id": record.request_id,
        "endpoint": record.endpoint,
        "model": record.model,
        "actual_model": record.actual_model,
        "backend": record.backend,
        "backend_type": record.backend_type,
        "status_code": status,
        "status": outcome,
        "error_type": None if outcome == "success" else record.error_type,
        "error_message": None if outcome == "success" else record.error_message,
        "latency_ms": round(record.duration * 1000.0, 3),
        "ttft_ms": None if ttft is None or not record.stream else round(ttft * 1000.0, 3),
        "tokens_prompt": record.prompt_tokens,
        "tokens_completion": record.completion_tokens,
        "stream": record.stream,
        "retry_count": max(record.attempts - 1, 0),
        "route_reason": record.route_reason,
        "fallback_from": record.fallback_from,
        "client": record.client,
    }
    if record.worker is not None:
        event["worker"] = record.worker
    return event


def summary(event: dict[str, Any]) -> str:
    """One readable line: id, endpoint, model -> backend, status, time (and what went wrong)."""
    line = (
        f"{event['request_id']} {event['endpoint']} {event['model'] or '-'}"
        f" -> {event['backend'] or '-'} {event['status_code']} {event['latency_ms']:.1f} ms"
    )
    if event["ttft_ms"] is not None:
        line += f" (ttft {event['ttft_ms']:.1f} ms)"
    retries = event["retry_count"]
    if retries:
        line += f" after {retries} {'retry' if retries == 1 else 'retries'}"
    if event["status"] != "success":
        line += f" {event['error_type']}: {event['error_message']}"
    # Names and messages can come from clients: one event is always one line.
    return _CONTROL.sub(" ", line)


class RequestLog:
    """Writes every finished request's event to the log and keeps the last ones.

    ``log_requests`` False keeps the history but writes nothing;
    ``content_preview`` adds ``prompt_preview`` to the logged event (never to
    the history).
    """

    def __init__(self, log_requests: bool = True, history_size: int = HISTORY_SIZE) -> None:
        self.log_requests = log_requests
        #: The last finished records (their events are built when someone reads them).
        self.history: deque[RequestRecord] = deque(maxlen=history_size)
        self._log = Logger(namespace=NAMESPACE)

    def record(self, record: RequestRecord) -> None:
        """A recorder: turn the finished ``record`` into its event, once."""
        self.history.append(record)
        if self.log_requests:
            logged = request_event(record)
            summary_line = summary(logged)
            if record.prompt_preview is not None:
                logged["prompt_preview"] = record.prompt_preview
            # What ``Logger.info`` would publish, without its check of the level
            # (it sorts every LogLevel on each call: a third of an event's cost).
            log = self._log
            log.observer(
                {
                    "summary": summary_line,
                    "request": logged,
                    "log_logger": log,
                    "log_level": LogLevel.info,
                    "log_namespace": NAMESPACE,
                    "log_source": None,
                    "log_format": "{summary}",
                    "log_time": time.time(),
                }
            )

    def remember(self, record: RequestRecord) -> None:
        """Keep ``record`` in the history without logging it (another worker did)."""
        self.history.append(record)

    def recent(self, limit: int = HISTORY_SIZE) -> list[dict[str, Any]]:
        """The last ``limit`` events, newest first."""
        history = self.history
        count = min(limit, len(history))
        return [request_event(history[-1 - i]) for i in range(count)]
