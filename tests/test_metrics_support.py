"""Shared fixtures for the metrics tests: a small fleet and a scripted day of traffic.

No tests here. The expected numbers are written out by hand from the contract
(bucket bounds included), not derived from the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

import nexus
from nexus.config import BackendConfig
from nexus.metrics import MetricsCollector
from nexus.registry import HEALTHY, UNHEALTHY, BackendRegistry
from nexus.tracking import RequestRecord

# Contract section 5 (and the brief, for time to first token).
DURATION_BOUNDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BOUNDS = (10, 50, 100, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000)

#: (name, labels) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


#: The project's copy of shared/spec/stats.schema.json.
STATS_SCHEMA = json.loads((Path(__file__).parent / "data" / "stats.schema.json").read_text())


def validate_stats(document: object) -> None:
    """Fail unless ``document`` is valid against the /v1/stats schema."""
    jsonschema.Draft7Validator.check_schema(STATS_SCHEMA)
    jsonschema.Draft7Validator(STATS_SCHEMA).validate(document)


def finished(
    model: str | None, backend: str | None, status: int, duration: float, **fields: Any
) -> RequestRecord:
    """A finished :class:`RequestRecord`, as the server layer hands it to the collector.

    ``fields`` are the record's other attributes (``error_type``, ``prompt_tokens``...).
    """
    return RequestRecord(
        started=0.0,
        model=model,
        backend=backend,
        status=status,
        duration=duration,
        finished=True,
        **fields,
    )


def record_request(
    collector: MetricsCollector,
    model: str | None,
    backend: str | None,
    status: int,
    duration: float,
    **fields: Any,
) -> None:
    """Record one finished request built by :func:`finished`."""
    collector.record_request(finished(model, backend, status, duration, **fields))


def make_registry() -> BackendRegistry:
    """Three backends: two healthy, one (with a dot in its id) unhealthy."""
    registry = BackendRegistry(
        [
            BackendConfig(
                name="gpu-a", url="http://127.0.0.1:9", models=("llama3:70b", "mistral:7b")
            ),
            BackendConfig(name="gpu-b", url="http://127.0.0.1:9", models=("llama3:70b",)),
            BackendConfig(name="cpu.c", url="http://127.0.0.1:9", models=("mistral:7b",)),
        ],
        aliases={"gpt-4": "llama3:70b"},
        fallbacks={"llama3:70b": ("mistral:7b",)},
    )
    statuses = {"gpu-a": HEALTHY, "gpu-b": HEALTHY, "cpu.c": UNHEALTHY}
    pending = {"gpu-a": 2, "gpu-b": 0, "cpu.c": 1}
    for backend in registry.backends:
        backend.status = statuses[backend.name]
        backend.pending = pending[backend.name]
    return registry


def make_collector() -> tuple[MetricsCollector, Clock]:
    """A collector over :func:`make_registry` with a fake clock."""
    clock = Clock()
    clock.advance(1000.0)
    return MetricsCollector(make_registry(), clock=clock.seconds), clock


def record_scenario(collector: MetricsCollector) -> None:
    """Every kind of outcome the request path reports, plus health checks."""
    record = partial(record_request, collector)
    record("llama3:70b", "gpu-a", 200, 0.2, prompt_tokens=100, completion_tokens=50)
    record("llama3:70b", "gpu-a", 200, 0.7)
    record(None, None, 400, 0.001, error_type="invalid_request")  # body without a model
    record("gpt-5-turbo", None, 404, 0.002, error_type="no_backend")  # unknown model
    record("llama3:70b", "gpu-b", 502, 1.5, error_type="backend_error")  # backend 500
    record("mistral:7b", "gpu-a", 504, 30.0, error_type="timeout")
    record(
        "llama3:70b", "gpu-a", 200, 3.0, fallback_from="llama3:70b", fallback_to="mistral:7b"
    )
    record(  # a stream with usage in its final event
        "mistral:7b",
        "gpu-a",
        200,
        12.0,
        prompt_tokens=20,
        completion_tokens=700,
        time_to_first_token=0.3,
    )
    record(  # the client left mid-stream
        "mistral:7b", "gpu-a", 499, 4.0, error_type="client_disconnect", time_to_first_token=0.08
    )
    record(  # the upstream failed after the 200 was sent
        "llama3:70b", "gpu-b", 200, 6.0, error_type="backend_error", time_to_first_token=0.6
    )
    collector.record_health_check("gpu-a", 0.05)
    collector.record_health_check("gpu-a", 0.3)
    collector.record_health_check("cpu.c", 7.0)


def _key(name: str, labels: Mapping[str, str]) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """The :data:`Samples` key of one series."""
    return _key(name, labels)


def add_histogram(
    out: Samples,
    name: str,
    labels: Mapping[str, str],
    bounds: Iterable[float],
    observations: list[float],
) -> None:
    """Expected samples of one histogram series (le as Prometheus formats floats)."""
    for bound in bounds:
        le = repr(float(bound))
        out[_key(f"{name}_bucket", {**labels, "le": le})] = sum(o <= bound for o in observations)
    out[_key(f"{name}_bucket", {**labels, "le": "+Inf"})] = len(observations)
    out[_key(f"{name}_count", labels)] = len(observations)
    out[_key(f"{name}_sum", labels)] = sum(observations)


def expected_scenario() -> Samples:
    """Every sample :func:`record_scenario` must produce, gauges included."""
    out: Samples = {}
    for (model, backend, status), n in {
        ("llama3_70b", "gpu_a", "200"): 3,
        ("unknown", "none", "400"): 1,
        ("unknown", "none", "404"): 1,
        ("llama3_70b", "gpu_b", "502"): 1,
        ("mistral_7b", "gpu_a", "504"): 1,
        ("mistral_7b", "gpu_a", "200"): 1,
        ("mistral_7b", "gpu_a", "499"): 1,
        ("llama3_70b", "gpu_b", "200"): 1,
    }.items():
        labels = {"model": model, "backend": backend, "status": status}
        out[_key("nexus_requests_total", labels)] = n
    for (error_type, model), n in {
        ("invalid_request", "unknown"): 1,
        ("no_backend", "unknown"): 1,
        ("backend_error", "llama3_70b"): 2,
        ("timeout", "mistral_7b"): 1,
        ("client_disconnect", "mistral_7b"): 1,
    }.items():
        out[_key("nexus_errors_total", {"error_type": error_type, "model": model})] = n
    out[_key("nexus_fallbacks_total", {"from_model": "llama3_70b", "to_model": "mistral_7b"})] = 1
    for (model, backend), obs in {
        ("llama3_70b", "gpu_a"): [0.2, 0.7, 3.0],
        ("unknown", "none"): [0.001, 0.002],
        ("llama3_70b", "gpu_b"): [1.5, 6.0],
        ("mistral_7b", "gpu_a"): [30.0, 12.0, 4.0],
    }.items():
        labels = {"model": model, "backend": backend}
        add_histogram(out, "nexus_request_duration_seconds", labels, DURATION_BOUNDS, obs)
    for (model, backend), obs in {
        ("mistral_7b", "gpu_a"): [0.3, 0.08],
        ("llama3_70b", "gpu_b"): [0.6],
    }.items():
        labels = {"model": model, "backend": backend}
        add_histogram(out, "nexus_time_to_first_token_seconds", labels, TTFT_BOUNDS, obs)
    for (model, backend, kind), tokens in {
        ("llama3_70b", "gpu_a", "prompt"): [100],
        ("llama3_70b", "gpu_a", "completion"): [50],
        ("mistral_7b", "gpu_a", "prompt"): [20],
        ("mistral_7b", "gpu_a", "completion"): [700],
    }.items():
        labels = {"model": model, "backend": backend, "type": kind}
        add_histogram(out, "nexus_tokens_total", labels, TOKEN_BOUNDS, [float(t) for t in tokens])
    for backend, obs in {"gpu_a": [0.05, 0.3], "cpu_c": [7.0]}.items():
        add_histogram(
            out, "nexus_backend_latency_seconds", {"backend": backend}, DURATION_BOUNDS, obs
        )
    out[_key("nexus_backends_total", {})] = 3
    out[_key("nexus_backends_healthy", {})] = 2
    out[_key("nexus_models_available", {})] = 2
    for backend, n in {"gpu_a": 2, "gpu_b": 0, "cpu_c": 1}.items():
        out[_key("nexus_pending_requests", {"backend": backend})] = n
    out[_key("nexus_build_info", {"version": nexus.__version__})] = 1
    out[_key("nexus_log_events_dropped_total", {})] = 0
    out[_key("nexus_dashboard_subscribers", {})] = 0
    return out


def samples_of(families: Iterable[Any]) -> Samples:
    """Parsed families -> samples, failing on a duplicate series."""
    out: Samples = {}
    for family in families:
        for sample in family.samples:
            key = _key(sample.name, sample.labels)
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def parse_text(body: bytes) -> Samples:
    """Samples of a Prometheus text exposition."""
    return samples_of(text_string_to_metric_families(body.decode("utf-8")))


def label_values(collector: MetricsCollector, label: str) -> set[str]:
    """Every value ``label`` takes in the collector's exposition."""
    values = set()
    for _, labels in parse_text(collector.render()):
        value = dict(labels).get(label)
        if value is not None:
            values.add(value)
    return values
