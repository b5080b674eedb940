"""MetricsCollector: exact values through every exposition, caches, odd input."""

from __future__ import annotations

import gzip
import math
import zlib
from functools import partial

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

import nexus
from nexus.config import BackendConfig
from nexus.metrics import MetricsCollector
from nexus.metrics.families import FAMILIES
from nexus.registry import HEALTHY, BackendRegistry
from nexus.tracking import RequestRecord
from tests.prometheus_bridge import prometheus_registry
from tests.test_metrics_support import (
    DURATION_BOUNDS,
    Samples,
    add_histogram,
    expected_scenario,
    key,
    label_values,
    make_collector,
    parse_text,
    record_request,
    record_scenario,
    samples_of,
)


def _approx(samples: Samples) -> dict[object, object]:
    return {k: pytest.approx(v, abs=1e-9) for k, v in samples.items()}


@pytest.fixture
def scenario() -> MetricsCollector:
    collector, _ = make_collector()
    record_scenario(collector)
    return collector


def test_every_sample_equals_what_was_recorded(scenario: MetricsCollector) -> None:
    expected = expected_scenario()
    assert parse_text(scenario.render()) == _approx(expected)
    registry = prometheus_registry(scenario)
    for (name, labels), value in expected.items():
        assert registry.get_sample_value(name, dict(labels)) == pytest.approx(value), name


def test_our_text_parses_like_generate_latest(scenario: MetricsCollector) -> None:
    ours = list(parse_prometheus(scenario.render().decode()))
    theirs = list(parse_prometheus(generate_latest(prometheus_registry(scenario)).decode()))
    assert [(f.name, f.type, f.documentation) for f in ours] == [
        (f.name, f.type, f.documentation) for f in theirs
    ]
    assert samples_of(ours) == samples_of(theirs)
    # prometheus_client adds no `_created` series for our custom collector.
    assert not any(name.endswith("_created") for name, _ in samples_of(theirs))


def test_every_family_has_help_and_type_even_when_empty() -> None:
    collector, _ = make_collector()
    text = collector.render().decode()
    for family in FAMILIES:
        assert f"# HELP {family.name} " in text
        assert f"# TYPE {family.name} {family.type}\n" in text
    families = {f.name: f for f in parse_prometheus(text)}
    assert len(families) == 14
    assert families["nexus_requests"].samples == []
    assert families["nexus_pending_requests"].samples  # gauges are always there
    assert families["nexus_build_info"].samples  # and so is the version


@pytest.mark.parametrize("openmetrics", [False, True])
def test_build_info_names_the_running_version(openmetrics: bool) -> None:
    collector, _ = make_collector()
    body = collector.render(openmetrics=openmetrics).decode()
    assert "# TYPE nexus_build_info gauge\n" in body
    parse = parse_openmetrics if openmetrics else parse_prometheus
    samples = samples_of(parse(body))
    assert samples[key("nexus_build_info", version=nexus.__version__)] == 1
    assert [name for name, _ in samples if name == "nexus_build_info"] == ["nexus_build_info"]


def test_families_types_labels_and_buckets_match_the_contract(scenario: MetricsCollector) -> None:
    text = scenario.render().decode()
    types = {
        "nexus_requests_total": "counter",
        "nexus_errors_total": "counter",
        "nexus_fallbacks_total": "counter",
        "nexus_request_duration_seconds": "histogram",
        "nexus_backend_latency_seconds": "histogram",
        "nexus_tokens_total": "histogram",
        "nexus_backends_total": "gauge",
        "nexus_backends_healthy": "gauge",
        "nexus_models_available": "gauge",
        "nexus_pending_requests": "gauge",
        "nexus_time_to_first_token_seconds": "histogram",
        "nexus_build_info": "gauge",
        "nexus_log_events_dropped_total": "counter",
        "nexus_dashboard_subscribers": "gauge",
    }
    for name, kind in types.items():
        assert f"# TYPE {name} {kind}\n" in text
    les = [
        line.split('le="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith('nexus_backend_latency_seconds_bucket{backend="gpu_a"')
    ]
    assert [float(le) for le in les] == [*map(float, DURATION_BOUNDS), math.inf]


def test_openmetrics_parses_with_the_same_samples(scenario: MetricsCollector) -> None:
    body = scenario.render(openmetrics=True).decode()
    assert body.endswith("# EOF\n")
    assert "# TYPE nexus_requests counter\n" in body
    assert "# TYPE nexus_errors counter\n" in body
    assert "# TYPE nexus_tokens_total histogram\n" in body
    assert "# TYPE nexus_backends_total gauge\n" in body
    ours = list(parse_openmetrics(body))
    baseline = om_exposition.generate_latest(prometheus_registry(scenario)).decode()
    theirs = list(parse_openmetrics(baseline))
    assert [(f.name, f.type) for f in ours] == [(f.name, f.type) for f in theirs]
    assert samples_of(ours) == samples_of(theirs)
    assert samples_of(ours) == _approx(expected_scenario())


@pytest.mark.parametrize("openmetrics", [False, True])
def test_gzip_round_trip_is_one_valid_gzip_member(
    scenario: MetricsCollector, openmetrics: bool
) -> None:
    plain = scenario.render(openmetrics=openmetrics)
    packed = scenario.render(openmetrics=openmetrics, gzip=True)
    assert len(packed) < len(plain) / 3
    # One member, checked CRC and length, nothing after it: what curl and Go read.
    inflater = zlib.decompressobj(wbits=31)
    assert inflater.decompress(packed) == plain
    assert inflater.eof and not inflater.unused_data
    # Cached segments stay right after more traffic.
    record_request(scenario, "mistral:7b", "gpu-a", 200, 0.5)
    assert gzip.decompress(scenario.render(openmetrics=openmetrics, gzip=True)) == (
        scenario.render(openmetrics=openmetrics)
    )


def test_render_after_more_traffic_shows_new_values_and_keeps_the_rest(
    scenario: MetricsCollector,
) -> None:
    first = scenario.render().decode().splitlines()
    record_request(scenario, "llama3:70b", "gpu-b", 200, 0.2)
    scenario.registry.get("gpu-b").pending = 7  # gauges are read at scrape time
    second = scenario.render().decode().splitlines()
    changed = {line for line in second if line not in first}
    assert 'nexus_requests_total{model="llama3_70b",backend="gpu_b",status="200"} 2' in changed
    assert (
        'nexus_request_duration_seconds_bucket{model="llama3_70b",backend="gpu_b",le="0.25"} 1'
        in changed
    )
    assert 'nexus_pending_requests{backend="gpu_b"} 7' in changed
    # Every line that changed belongs to the series recorded to, or is that gauge.
    for line in changed:
        assert 'model="llama3_70b",backend="gpu_b"' in line or "gpu_b" in line, line
    assert [line for line in first if "gpu_a" in line] == [
        line for line in second if "gpu_a" in line
    ]
    assert scenario.render().decode().splitlines() == second
    samples = parse_text(scenario.render())
    assert samples == parse_text(generate_latest(prometheus_registry(scenario)))


def _big_fleet(backends: int, models: int) -> BackendRegistry:
    names = tuple(f"m{i}" for i in range(models))
    registry = BackendRegistry(
        [
            BackendConfig(name=f"b{i:02d}", url="http://127.0.0.1:9", models=names)
            for i in range(backends)
        ]
    )
    for backend in registry.backends:
        backend.status = HEALTHY
    return registry


def test_caches_stay_right_across_chunks_and_new_series() -> None:
    collector = MetricsCollector(_big_fleet(20, 10))
    for i in range(0, 20, 2):  # every other backend, so later ones land in between
        for m in range(10):
            record_request(collector, f"m{m}", f"b{i:02d}", 200, 0.01 * (i + m))
    collector.render()
    for i in range(1, 20, 2):
        record_request(collector, "m3", f"b{i:02d}", 200, 2.0, prompt_tokens=5)
    record_request(collector, "m9", "b18", 500, 1.0, error_type="backend_error")
    for openmetrics in (False, True):
        assert parse_text(collector.render()) == parse_text(
            generate_latest(prometheus_registry(collector))
        )
        assert gzip.decompress(collector.render(openmetrics, gzip=True)) == collector.render(
            openmetrics
        )
    assert prometheus_registry(collector).get_sample_value(
        "nexus_requests_total", {"model": "m9", "backend": "b18", "status": "500"}
    ) == 1


def test_colliding_names_merge_into_one_series() -> None:
    registry = BackendRegistry(
        [
            BackendConfig(name="gpu-a", url="http://127.0.0.1:9", models=("llama3:70b",)),
            BackendConfig(name="gpu.a", url="http://127.0.0.1:9", models=("llama3.70b",)),
        ]
    )
    for backend in registry.backends:
        backend.status = HEALTHY
        backend.pending = 2
    collector = MetricsCollector(registry)
    record_request(collector, "llama3:70b", "gpu-a", 200, 0.2, prompt_tokens=10)
    record_request(collector, "llama3.70b", "gpu.a", 200, 0.4, time_to_first_token=0.1)
    record_request(collector, "llama3.70b", "gpu-a", 504, 0.3, error_type="timeout")
    record_request(collector, "llama3:70b", "gpu.a", 504, 0.3, error_type="timeout")
    collector.record_health_check("gpu-a", 0.1)
    collector.record_health_check("gpu.a", 0.2)
    for body in (collector.render(), generate_latest(prometheus_registry(collector))):
        samples = parse_text(body)  # fails on duplicate series
        pair = {"model": "llama3_70b", "backend": "gpu_a"}
        assert samples[key("nexus_requests_total", **pair, status="200")] == 2
        assert samples[key("nexus_requests_total", **pair, status="504")] == 2
        assert samples[key("nexus_request_duration_seconds_count", **pair)] == 4
        assert samples[key("nexus_request_duration_seconds_sum", **pair)] == pytest.approx(1.2)
        assert samples[key("nexus_time_to_first_token_seconds_count", **pair)] == 1
        assert samples[key("nexus_tokens_total_count", **pair, type="prompt")] == 1
        assert samples[key("nexus_errors_total", error_type="timeout", model="llama3_70b")] == 2
        assert samples[key("nexus_backend_latency_seconds_count", backend="gpu_a")] == 2
        assert samples[key("nexus_pending_requests", backend="gpu_a")] == 4
    # /v1/stats keeps the raw names apart.
    stats = collector.stats()
    assert {m.name: m.requests for m in stats.models} == {"llama3:70b": 2, "llama3.70b": 2}
    assert {b.id: b.requests for b in stats.backends} == {"gpu-a": 2, "gpu.a": 2}


def test_models_the_gateway_does_not_know_are_unknown() -> None:
    collector, _ = make_collector()
    record_request(collector, "gpt-4", "gpu-a", 200, 0.1)  # an alias is known
    record_request(collector, "mistral:7b", "gpu-a", 200, 0.1, fallback_from=None, fallback_to="x")
    record_request(collector, "no-such-model", None, 404, 0.1, error_type="no_backend")
    assert label_values(collector, "model") == {"gpt_4", "mistral_7b", "unknown"}
    fallback = {"from_model": "mistral_7b", "to_model": "unknown"}
    assert prometheus_registry(collector).get_sample_value("nexus_fallbacks_total", fallback) == 1


def test_models_appearing_and_disappearing_move_between_series() -> None:
    collector, _ = make_collector()
    record_request(collector, "phi3", "gpu-a", 200, 0.1)
    registry = collector.registry
    registry.set_models(registry.get("gpu-a"), ["phi3"])  # discovered by a health check
    record_request(collector, "phi3", "gpu-a", 200, 0.1)
    record_request(collector, "phi3", "gpu-a", 200, 0.1)
    registry.set_models(registry.get("gpu-a"), [])  # gone again
    record_request(collector, "phi3", "gpu-a", 200, 0.1)
    samples = parse_text(collector.render())
    assert samples[key("nexus_requests_total", model="unknown", backend="gpu_a", status="200")] == 2
    assert samples[key("nexus_requests_total", model="phi3", backend="gpu_a", status="200")] == 2


def test_odd_input_never_raises_and_is_clamped_or_ignored() -> None:
    collector, _ = make_collector()
    record = partial(record_request, collector)
    record("mistral:7b", "gpu-a", 200, -5.0)
    record("mistral:7b", "gpu-a", 200, math.nan)
    record("mistral:7b", "gpu-a", 200, math.inf)
    record("mistral:7b", "gpu-a", 200, "slow")  # type: ignore[arg-type]
    record("mistral:7b", "gpu-a", 200, 1, prompt_tokens="12", completion_tokens=3.5)  # type: ignore[arg-type]
    record("mistral:7b", "gpu-a", 200, 0.0, prompt_tokens=-4, completion_tokens=True)
    record("mistral:7b", "gpu-a", 200, 0.0, time_to_first_token=-1.0)
    record("mistral:7b", "gpu-a", 200, 0.0, time_to_first_token="soon")  # type: ignore[arg-type]
    record(["not", "a", "name"], {"x": 1}, "abc", 0.0, error_type=42)  # type: ignore[arg-type]
    record("mistral:7b", "gpu-a", None, 0.0, error_type="weird")  # type: ignore[arg-type]
    record("mistral:7b", "gpu-a", 1000, 0.0)
    collector.record_health_check("gpu-a", -3.0)
    collector.record_health_check(None, 0.1)  # type: ignore[arg-type]
    samples = parse_text(collector.render())
    assert samples == parse_text(generate_latest(prometheus_registry(collector)))
    value = prometheus_registry(collector).get_sample_value
    labels = {"model": "mistral_7b", "backend": "gpu_a"}
    assert value("nexus_request_duration_seconds_count", labels) == 10
    assert value("nexus_request_duration_seconds_bucket", {**labels, "le": "0.1"}) == 9
    assert value("nexus_request_duration_seconds_sum", labels) == 1.0
    assert value("nexus_tokens_total_count", {**labels, "type": "prompt"}) is None
    assert value("nexus_tokens_total_count", {**labels, "type": "completion"}) is None
    assert value("nexus_time_to_first_token_seconds_bucket", {**labels, "le": "0.05"}) == 1
    assert value("nexus_time_to_first_token_seconds_count", labels) == 1
    assert value("nexus_requests_total", {**labels, "status": "0"}) == 2
    unknown = {"model": "unknown", "backend": "none"}
    assert value("nexus_requests_total", {**unknown, "status": "0"}) == 1
    assert value("nexus_errors_total", {"error_type": "other", "model": "unknown"}) == 1
    assert value("nexus_errors_total", {"error_type": "other", "model": "mistral_7b"}) == 1
    assert value("nexus_backend_latency_seconds_sum", {"backend": "gpu_a"}) == 0.0
    assert value("nexus_backend_latency_seconds_count", {"backend": "none"}) == 1


def test_histogram_bounds_are_inclusive() -> None:
    collector, _ = make_collector()
    expected: Samples = {}
    observations = [0.1, 0.25, 1.0, 300.0, 300.5]
    for seconds in observations:
        record_request(collector, "mistral:7b", "gpu-a", 200, seconds)
    add_histogram(
        expected,
        "nexus_request_duration_seconds",
        {"model": "mistral_7b", "backend": "gpu_a"},
        DURATION_BOUNDS,
        observations,
    )
    samples = parse_text(collector.render())
    for series, value in expected.items():
        assert samples[series] == pytest.approx(value), series


def test_the_fleet_changing_keeps_history_and_moves_the_gauges() -> None:
    collector, _ = make_collector()
    record_scenario(collector)
    registry = collector.registry
    registry.remove("gpu-b")
    box = registry.add(
        BackendConfig(name="box", url="http://127.0.0.1:9", type="ollama", models=("phi3",)),
        source="mdns",
    )
    box.status, box.pending = HEALTHY, 4
    record_request(collector, "phi3", "box", 200, 0.3)
    samples = parse_text(collector.render())
    assert samples == parse_text(generate_latest(prometheus_registry(collector)))
    # Counters are history: the removed backend's series stay.
    gone = {"model": "llama3_70b", "backend": "gpu_b"}
    assert samples[key("nexus_requests_total", **gone, status="502")] == 1
    assert samples[key("nexus_requests_total", **gone, status="200")] == 1
    assert samples[key("nexus_requests_total", model="phi3", backend="box", status="200")] == 1
    # The fleet gauges describe the fleet as it is now.
    assert samples[key("nexus_backends_total")] == 3
    assert samples[key("nexus_backends_healthy")] == 2
    assert samples[key("nexus_models_available")] == 3  # llama3:70b, mistral:7b, phi3
    pending = {
        dict(labels)["backend"]: value
        for (name, labels), value in samples.items()
        if name == "nexus_pending_requests"
    }
    assert pending == {"box": 4, "cpu_c": 1, "gpu_a": 2}


def test_a_record_finished_by_the_server_layer_is_recorded_as_it_is() -> None:
    collector, clock = make_collector()
    record = RequestRecord(started=clock.seconds(), model="mistral:7b")
    record.backend = "gpu-a"
    record.time_to_first_token = 0.2
    record.set_usage(12, 34)
    clock.advance(1.5)
    assert record.finish(200, clock.seconds())
    collector.record_request(record)
    value = prometheus_registry(collector).get_sample_value
    labels = {"model": "mistral_7b", "backend": "gpu_a"}
    assert value("nexus_requests_total", {**labels, "status": "200"}) == 1
    assert value("nexus_request_duration_seconds_sum", labels) == 1.5
    assert value("nexus_time_to_first_token_seconds_sum", labels) == 0.2
    assert value("nexus_tokens_total_sum", {**labels, "type": "prompt"}) == 12
    assert value("nexus_tokens_total_sum", {**labels, "type": "completion"}) == 34
    assert value("nexus_errors_total", {"error_type": "other", "model": "mistral_7b"}) is None
