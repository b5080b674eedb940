"""A collector's series seen through prometheus_client, for tests and the benchmark.

:func:`prometheus_registry` gives a ``CollectorRegistry`` whose one custom
collector reads the same series as the gateway's own renderer, so tests can use
``get_sample_value`` and compare with ``generate_latest`` (also the benchmark's
baseline) without a second copy of the numbers. The gateway itself never builds
one: it renders ``/metrics`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from nexus import __version__
from nexus.metrics.families import (
    BACKEND_LATENCY,
    BACKENDS_HEALTHY,
    BACKENDS_TOTAL,
    BUILD_INFO,
    DASHBOARD_SUBSCRIBERS,
    ERRORS,
    FALLBACKS,
    LOG_EVENTS_DROPPED,
    MODELS_AVAILABLE,
    PENDING_REQUESTS,
    REQUEST_DURATION,
    REQUESTS,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    Family,
)
from nexus.metrics.labels import sanitize_label

if TYPE_CHECKING:
    from nexus.metrics.collector import MetricsCollector


def _buckets(family: Family, counts: Sequence[int]) -> list[tuple[str, float]]:
    return list(zip(family.le_values, accumulate(counts), strict=True))


def _histogram(family: Family) -> HistogramMetricFamily:
    return HistogramMetricFamily(family.name, family.help, labels=family.labels)


class PrometheusBridge(Collector):
    """A prometheus_client collector over a :class:`MetricsCollector`'s series."""

    def __init__(self, collector: MetricsCollector) -> None:
        self._collector = collector

    def describe(self) -> Iterable[Metric]:
        """Nothing to pre-declare: the registry never checks our names for clashes."""
        return ()

    def collect(self) -> Iterator[Metric]:
        """Every family, in the same order and with the same samples as our renderer."""
        c = self._collector
        requests = CounterMetricFamily(REQUESTS.name, REQUESTS.help, labels=REQUESTS.labels)
        duration = _histogram(REQUEST_DURATION)
        ttft = _histogram(TIME_TO_FIRST_TOKEN)
        tokens = _histogram(TOKENS)
        for group in c.pair_groups:
            data = group.merged()
            model, backend = group.key
            for status, n in sorted(data.statuses.items()):
                requests.add_metric([model, backend, status], n)
            duration.add_metric(
                [model, backend], _buckets(REQUEST_DURATION, data.duration), data.duration_sum
            )
            if data.ttft is not None:
                ttft.add_metric(
                    [model, backend], _buckets(TIME_TO_FIRST_TOKEN, data.ttft), data.ttft_sum
                )
            if data.prompt is not None:
                tokens.add_metric(
                    [model, backend, "prompt"], _buckets(TOKENS, data.prompt), data.prompt_sum
                )
            if data.completion is not None:
                tokens.add_metric(
                    [model, backend, "completion"],
                    _buckets(TOKENS, data.completion),
                    data.completion_sum,
                )
        yield requests
        for family, groups in ((ERRORS, c.error_groups), (FALLBACKS, c.fallback_groups)):
            counter = CounterMetricFamily(family.name, family.help, labels=family.labels)
            for count_group in groups:
                counter.add_metric(list(count_group.key), count_group.merged().count)
            yield counter
        yield duration
        yield ttft
        latency = _histogram(BACKEND_LATENCY)
        for health_group in c.health_groups:
            data_h = health_group.merged()
            latency.add_metric(
                list(health_group.key), _buckets(BACKEND_LATENCY, data_h.counts), data_h.sum
            )
        yield latency
        yield tokens
        registry = c.registry
        backends = registry.backends
        yield GaugeMetricFamily(BACKENDS_TOTAL.name, BACKENDS_TOTAL.help, value=len(backends))
        yield GaugeMetricFamily(
            BACKENDS_HEALTHY.name,
            BACKENDS_HEALTHY.help,
            value=sum(1 for b in backends if b.healthy),
        )
        yield GaugeMetricFamily(
            MODELS_AVAILABLE.name,
            MODELS_AVAILABLE.help,
            value=len(registry.available_model_names()),
        )
        pending = GaugeMetricFamily(
            PENDING_REQUESTS.name, PENDING_REQUESTS.help, labels=PENDING_REQUESTS.labels
        )
        totals: dict[str, int] = {}
        for entry in backends:
            label = sanitize_label(entry.name)
            totals[label] = totals.get(label, 0) + max(0, entry.pending)
        for label, n in totals.items():
            pending.add_metric([label], n)
        yield pending
        info = GaugeMetricFamily(BUILD_INFO.name, BUILD_INFO.help, labels=BUILD_INFO.labels)
        info.add_metric([__version__], 1)
        yield info
        yield CounterMetricFamily(
            LOG_EVENTS_DROPPED.name, LOG_EVENTS_DROPPED.help, value=self._collector.log_drops()
        )
        yield GaugeMetricFamily(
            DASHBOARD_SUBSCRIBERS.name,
            DASHBOARD_SUBSCRIBERS.help,
            value=self._collector.dashboard_subscribers(),
        )


def prometheus_registry(collector: MetricsCollector) -> CollectorRegistry:
    """A private ``CollectorRegistry`` reading ``collector``'s series (never the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusBridge(collector))
    return registry
