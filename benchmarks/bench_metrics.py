"""Benchmark: recording a request, rendering ``/metrics`` and ``/v1/stats``.

A fleet of 20 backends x 10 models (and 100 x 10 for the render target), every
backend serving every model, with traffic on every pair: successes with tokens
and time to first token, client errors, backend errors, timeouts, disconnects,
fallbacks, plus health checks. Compared with prometheus_client's
``generate_latest`` on the same data (the baseline the renderer replaces).

Run with ``python -m benchmarks.bench_metrics`` from the repository root (the
baseline's prometheus_client bridge lives in ``tests``); ``run()`` returns the
numbers for a larger benchmark suite.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest

from nexus.config import BackendConfig
from nexus.metrics import MetricsCollector
from nexus.registry import HEALTHY, BackendRegistry
from nexus.tracking import RequestRecord
from tests.prometheus_bridge import prometheus_registry

MODELS = 10
RECORD_CALLS = 200_000
# One request per outcome kind: (status, error_type, tokens and ttft?, fallback?)
OUTCOMES: tuple[tuple[int, str | None, bool, bool], ...] = (
    (200, None, True, False),
    (200, None, True, True),
    (200, "backend_error", True, False),
    (400, "invalid_request", False, False),
    (499, "client_disconnect", False, False),
    (502, "backend_error", False, False),
    (503, "no_healthy_backend", False, False),
    (504, "timeout", False, False),
)


def _finished(
    model: str | None, backend: str | None, status: int, duration: float, **fields: Any
) -> RequestRecord:
    """A finished record, as the server layer hands it to the collector."""
    return RequestRecord(
        started=0.0,
        model=model,
        backend=backend,
        status=status,
        duration=duration,
        finished=True,
        **fields,
    )


def build(backends: int, models: int = MODELS, seed: int = 0) -> MetricsCollector:
    """A collector over ``backends`` x ``models`` with traffic on every pair."""
    rng = random.Random(seed)
    names = [f"model-{i:02d}:{rng.choice(['7b', '13b', '70b'])}" for i in range(models)]
    registry = BackendRegistry(
        [
            BackendConfig(name=f"backend-{i:03d}", url="http://127.0.0.1:1", models=tuple(names))
            for i in range(backends)
        ],
        fallbacks={names[0]: (names[1],)},
    )
    for backend in registry.backends:
        backend.status = HEALTHY
        backend.pending = rng.randint(0, 10)
    collector = MetricsCollector(registry)
    for backend in registry.backends:
        collector.record_health_check(backend.name, rng.uniform(0.001, 0.2))
        for model in names:
            for status, error, tokens, fallback in OUTCOMES:
                collector.record_request(
                    _finished(
                        model,
                        backend.name,
                        status,
                        rng.lognormvariate(0.0, 1.5),
                        error_type=error,
                        fallback_from=model if fallback else None,
                        fallback_to=names[1] if fallback else None,
                        prompt_tokens=rng.randint(10, 4000) if tokens else None,
                        completion_tokens=rng.randint(1, 2000) if tokens else None,
                        time_to_first_token=rng.uniform(0.02, 3.0) if tokens else None,
                    )
                )
        collector.record_request(_finished(None, None, 400, 0.0005, error_type="invalid_request"))
    return collector


def _timed(
    fn: Callable[[], object], repeat: int, before: Callable[[], object] | None = None
) -> list[float]:
    """Seconds per call of ``fn``, ``repeat`` times (``before`` runs untimed each time)."""
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _p95(times: list[float]) -> float:
    return sorted(times)[int(len(times) * 0.95)]


def _touch_all(collector: MetricsCollector) -> Callable[[], None]:
    """A function recording one request on every pair (so every series is dirty)."""
    records = [
        _finished(s.model, s.backend, 200, 0.42, prompt_tokens=100)
        for s in collector.iter_pairs()
        if s.backend != "none"
    ]

    def touch() -> None:
        for record in records:
            collector.record_request(record)

    return touch


def _touch_few(collector: MetricsCollector, n: int = 5) -> Callable[[], None]:
    """A function recording requests on ``n`` pairs only (a quiet scrape interval)."""
    records = [
        _finished(s.model, s.backend, 200, 0.42)
        for s in collector.iter_pairs()
        if s.backend != "none"
    ][:n]

    def touch() -> None:
        for record in records:
            collector.record_request(record)

    return touch


def bench_record(collector: MetricsCollector, calls: int = RECORD_CALLS) -> dict[str, float]:
    """Microseconds per record_request with a warm cache (best of 5 runs), three shapes.

    The records are built beforehand: the request path has its record from the
    start, so building one is not part of recording it.
    """
    pairs = [(s.model, s.backend) for s in collector.iter_pairs() if s.backend != "none"]
    n = calls // 5
    shapes: dict[str, list[RequestRecord]] = {
        "record_request_us": [_finished(m, b, 200, 0.42) for m, b in pairs],
        "record_request_tokens_ttft_us": [
            _finished(
                m,
                b,
                200,
                1.7,
                prompt_tokens=512,
                completion_tokens=256,
                time_to_first_token=0.3,
            )
            for m, b in pairs
        ],
        "record_request_error_us": [
            _finished(m, b, 502, 0.9, error_type="backend_error") for m, b in pairs
        ],
    }
    record = collector.record_request
    out = {}
    for name, shape in shapes.items():
        records = [shape[i % len(shape)] for i in range(n)]

        def loop(records: list[RequestRecord] = records) -> None:
            for r in records:
                record(r)

        out[name] = min(_timed(loop, 5)) / n * 1e6
    return out


def bench_render(collector: MetricsCollector, prefix: str, repeat: int = 30) -> dict[str, float]:
    """Milliseconds per /metrics render (all dirty, few dirty), stats and the baseline."""
    all_dirty = _touch_all(collector)
    few_dirty = _touch_few(collector)
    collector.render()  # warm the prefixes and caches
    out: dict[str, float] = {}
    for name, om, gz in (("text", False, False), ("openmetrics_gzip", True, True)):
        dirty = _timed(lambda om=om, gz=gz: collector.render(om, gz), repeat, all_dirty)
        steady = _timed(lambda om=om, gz=gz: collector.render(om, gz), repeat, few_dirty)
        out[f"{prefix}_render_{name}_all_dirty_ms"] = statistics.median(dirty) * 1e3
        out[f"{prefix}_render_{name}_steady_ms"] = statistics.median(steady) * 1e3
        out[f"{prefix}_render_{name}_steady_p95_ms"] = _p95(steady) * 1e3
    baseline_registry = prometheus_registry(collector)
    baseline = _timed(lambda: generate_latest(baseline_registry), max(5, repeat // 3))
    out[f"{prefix}_generate_latest_ms"] = statistics.median(baseline) * 1e3
    stats = _timed(collector.stats_json, repeat)
    out[f"{prefix}_stats_ms"] = statistics.median(stats) * 1e3
    out[f"{prefix}_stats_p95_ms"] = _p95(stats) * 1e3
    out[f"{prefix}_samples"] = float(
        sum(len(m.samples) for m in baseline_registry.collect())
    )
    out[f"{prefix}_body_bytes"] = float(len(collector.render()))
    out[f"{prefix}_gzip_bytes"] = float(len(collector.render(True, True)))
    return out


def run() -> dict[str, float]:
    """Every number, keyed by name (µs for recording, ms for rendering)."""
    results: dict[str, float] = {}
    small = build(20)
    results.update(bench_record(small))
    results.update(bench_render(small, "fleet20x10"))
    results.update(bench_render(build(100), "fleet100x10", repeat=20))
    return results


def main() -> None:
    """Print the numbers."""
    for name, value in run().items():
        print(f"{name:48s} {value:12.3f}")


if __name__ == "__main__":
    main()
