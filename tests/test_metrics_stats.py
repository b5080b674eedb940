"""/v1/stats: schema, exact numbers, ordering, and agreement with /metrics."""

from __future__ import annotations

import json

import pytest

from nexus.config import BackendConfig
from nexus.metrics import MetricsCollector, sanitize_label
from nexus.registry import HEALTHY, UNHEALTHY
from tests.test_metrics_support import (
    make_collector,
    parse_text,
    record_request,
    record_scenario,
    validate_stats,
)


@pytest.fixture
def scenario() -> MetricsCollector:
    collector, clock = make_collector()
    record_scenario(collector)
    clock.advance(42.7)
    return collector


def test_stats_are_exactly_what_was_recorded(scenario: MetricsCollector) -> None:
    document = json.loads(scenario.stats_json())
    validate_stats(document)
    assert document == {
        "uptime_seconds": 42,
        "requests": {"total": 10, "success": 5, "errors": 5},
        "backends": [
            {
                "id": "cpu.c",
                "requests": 0,
                "average_latency_ms": 0.0,
                "pending": 1,
                "status": "unhealthy",
                "type": "generic",
                "source": "config",
                "models": ["mistral:7b"],
            },
            {
                "id": "gpu-a",
                "requests": 6,
                "average_latency_ms": 8316.7,
                "pending": 2,
                "status": "healthy",
                "type": "generic",
                "source": "config",
                "models": ["llama3:70b", "mistral:7b"],
            },
            {
                "id": "gpu-b",
                "requests": 2,
                "average_latency_ms": 3750.0,
                "pending": 0,
                "status": "healthy",
                "type": "generic",
                "source": "config",
                "models": ["llama3:70b"],
            },
        ],
        "models": [
            {"name": "llama3:70b", "requests": 5, "average_duration_ms": 2280.0},
            {"name": "mistral:7b", "requests": 3, "average_duration_ms": 15333.3},
            {"name": "unknown", "requests": 2, "average_duration_ms": 1.5},
        ],
    }


def test_a_fresh_gateway_lists_every_backend_and_available_model() -> None:
    collector, _ = make_collector()
    document = json.loads(collector.stats_json())
    validate_stats(document)
    assert document["uptime_seconds"] == 0
    assert document["requests"] == {"total": 0, "success": 0, "errors": 0}
    assert [b["id"] for b in document["backends"]] == ["cpu.c", "gpu-a", "gpu-b"]
    assert all(b["requests"] == 0 and b["average_latency_ms"] == 0.0 for b in document["backends"])
    # Models on healthy backends only (cpu.c is unhealthy but gpu-a has mistral too).
    assert document["models"] == [
        {"name": "llama3:70b", "requests": 0, "average_duration_ms": 0.0},
        {"name": "mistral:7b", "requests": 0, "average_duration_ms": 0.0},
    ]
    assert isinstance(document["backends"][0]["average_latency_ms"], float)


def test_models_sort_by_requests_then_name(scenario: MetricsCollector) -> None:
    for _ in range(3):
        record_request(scenario, "gpt-4", "gpu-a", 200, 1.0)
    names = [(m.name, m.requests) for m in scenario.stats().models]
    assert names == [("llama3:70b", 5), ("gpt-4", 3), ("mistral:7b", 3), ("unknown", 2)]


def test_stats_agree_with_metrics(scenario: MetricsCollector) -> None:
    stats = scenario.stats()
    samples = parse_text(scenario.render())
    # Per model and per backend label: [requests, seconds], summed from /metrics.
    models: dict[str, list[float]] = {}
    backends: dict[str, list[float]] = {}
    total = success = 0.0
    for (name, labels), value in samples.items():
        series = dict(labels)
        if name == "nexus_requests_total":
            total += value
            success += value if series["status"].startswith("2") else 0
            column = 0
        elif name == "nexus_request_duration_seconds_sum":
            column = 1
        else:
            continue
        for table, label in ((models, series["model"]), (backends, series["backend"])):
            table.setdefault(label, [0.0, 0.0])[column] += value
    assert (stats.requests.total, stats.requests.success) == (total, success)
    assert stats.requests.errors == total - success
    assert sum(m.requests for m in stats.models) == total
    rows = [(m.name, m.requests, m.average_duration_ms, models) for m in stats.models]
    rows += [(b.id, b.requests, b.average_latency_ms, backends) for b in stats.backends]
    for raw, requests, average_ms, table in rows:
        count, seconds = table.get(sanitize_label(raw), [0.0, 0.0])
        assert requests == count, raw
        assert average_ms == (round(seconds * 1000 / count, 1) if count else 0.0), raw
    for backend in stats.backends:
        gauge = ("nexus_pending_requests", frozenset({("backend", sanitize_label(backend.id))}))
        assert backend.pending == samples[gauge]


def test_uptime_counts_whole_seconds_from_creation() -> None:
    collector, clock = make_collector()
    clock.advance(0.999)
    assert collector.stats().uptime_seconds == 0
    clock.advance(3600.5)
    assert collector.stats().uptime_seconds == 3601


def test_requests_with_no_backend_are_in_no_backend_row(scenario: MetricsCollector) -> None:
    ids = [b.id for b in scenario.stats().backends]
    assert "none" not in ids
    assert sum(b.requests for b in scenario.stats().backends) == 8


def test_backend_rows_follow_the_fleet_and_say_what_each_lists() -> None:
    collector, _ = make_collector()
    record_scenario(collector)
    registry = collector.registry
    registry.remove("gpu-b")
    box = registry.add(
        BackendConfig(name="box", url="http://127.0.0.1:9", type="ollama"), source="mdns"
    )
    gpu_a = registry.get("gpu-a")
    registry.set_models(gpu_a, ["qwen2:7b"])  # discovered; the configured floor stays
    gpu_a.status = UNHEALTHY  # what it lists stays listed
    document = json.loads(collector.stats_json())
    validate_stats(document)
    rows = {row["id"]: row for row in document["backends"]}
    assert list(rows) == ["box", "cpu.c", "gpu-a"]
    assert rows["box"] == {
        "id": "box",
        "requests": 0,
        "average_latency_ms": 0.0,
        "pending": 0,
        "status": "unknown",
        "type": "ollama",
        "source": "mdns",
        "models": [],
    }
    assert rows["gpu-a"]["models"] == ["llama3:70b", "mistral:7b", "qwen2:7b"]
    assert (rows["gpu-a"]["status"], rows["gpu-a"]["requests"]) == ("unhealthy", 6)
    # The removed backend's requests are still counted, in no row.
    assert document["requests"]["total"] == 10
    assert sum(row["requests"] for row in document["backends"]) == 6
    box.status = HEALTHY
    assert json.loads(collector.stats_json())["backends"][0]["status"] == "healthy"
