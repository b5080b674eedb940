"""The metric families the gateway exports: names, types, labels, help and buckets.

Contract section 5 fixes these; ``nexus_time_to_first_token_seconds`` and
``nexus_build_info`` are the additions. Everything that names a family (the
renderer, the docs tests, the tests' prometheus_client bridge) reads it from here.
"""

from __future__ import annotations

import attrs
from prometheus_client.utils import floatToGoString

#: Upper bounds of both duration histograms (``+Inf`` is implied).
DURATION_BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
#: Upper bounds of the time-to-first-token histogram.
TTFT_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Upper bounds of the token histogram.
TOKEN_BUCKETS: tuple[float, ...] = (
    10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0,
    16000.0, 32000.0, 64000.0, 128000.0,
)


@attrs.frozen
class Family:
    """One metric family as exposed.

    ``name`` is the name of the family in the Prometheus text format (counters end
    in ``_total`` there); ``openmetrics_name`` is its OpenMetrics family name.
    """

    name: str
    type: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def openmetrics_name(self) -> str:
        """OpenMetrics drops the ``_total`` suffix from counter family names only."""
        if self.type == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        return self.name

    @property
    def le_values(self) -> tuple[str, ...]:
        """The ``le`` label values of a histogram, ``+Inf`` last (Go float formatting)."""
        return (*(floatToGoString(b) for b in self.buckets), "+Inf")

    @property
    def sample_names(self) -> tuple[str, ...]:
        """Every sample name this family can produce."""
        if self.type == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_count", f"{self.name}_sum")
        return (self.name,)


REQUESTS = Family(
    "nexus_requests_total",
    "counter",
    "Finished client inference requests, by requested model, backend and HTTP status sent.",
    ("model", "backend", "status"),
)
ERRORS = Family(
    "nexus_errors_total",
    "counter",
    "Failed client requests, by the final error type and requested model (once per request).",
    ("error_type", "model"),
)
FALLBACKS = Family(
    "nexus_fallbacks_total",
    "counter",
    "Requests served by a fallback model instead of the model they resolved to.",
    ("from_model", "to_model"),
)
REQUEST_DURATION = Family(
    "nexus_request_duration_seconds",
    "histogram",
    "Time from request arrival to the last response byte sent, in seconds.",
    ("model", "backend"),
    DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Family(
    "nexus_time_to_first_token_seconds",
    "histogram",
    "Time from request arrival to the first streamed event sent to the client, in seconds.",
    ("model", "backend"),
    TTFT_BUCKETS,
)
BACKEND_LATENCY = Family(
    "nexus_backend_latency_seconds",
    "histogram",
    "Round trip of backend health checks that got an HTTP response, in seconds.",
    ("backend",),
    DURATION_BUCKETS,
)
TOKENS = Family(
    "nexus_tokens_total",
    "histogram",
    "Tokens per request as reported by the response usage, by type (prompt or completion).",
    ("model", "backend", "type"),
    TOKEN_BUCKETS,
)
BACKENDS_TOTAL = Family("nexus_backends_total", "gauge", "Backends configured.")
BACKENDS_HEALTHY = Family("nexus_backends_healthy", "gauge", "Backends currently healthy.")
MODELS_AVAILABLE = Family(
    "nexus_models_available",
    "gauge",
    "Distinct models served by at least one healthy backend.",
)
PENDING_REQUESTS = Family(
    "nexus_pending_requests",
    "gauge",
    "Requests in flight to each backend right now.",
    ("backend",),
)
BUILD_INFO = Family(
    "nexus_build_info",
    "gauge",
    "Always 1; the label says which Nexus version is running.",
    ("version",),
)
LOG_EVENTS_DROPPED = Family(
    "nexus_log_events_dropped_total",
    "counter",
    "Log lines the log destination could not take (disk full, closed or full pipe).",
)
DASHBOARD_SUBSCRIBERS = Family(
    "nexus_dashboard_subscribers",
    "gauge",
    "Dashboard event streams (GET /v1/events) open right now.",
)

#: All families, in exposition order.
FAMILIES: tuple[Family, ...] = (
    REQUESTS,
    ERRORS,
    FALLBACKS,
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    BACKEND_LATENCY,
    TOKENS,
    BACKENDS_TOTAL,
    BACKENDS_HEALTHY,
    MODELS_AVAILABLE,
    PENDING_REQUESTS,
    BUILD_INFO,
    LOG_EVENTS_DROPPED,
    DASHBOARD_SUBSCRIBERS,
)

#: ``error_type`` values of contract section 5; anything else is counted as ``other``.
ERROR_TYPES: frozenset[str] = frozenset(
    {
        "timeout",
        "parse_error",
        "backend_error",
        "no_backend",
        "no_healthy_backend",
        "invalid_request",
        "client_disconnect",
        "other",
    }
)
