"""Request metrics: the collector, ``/metrics`` (Prometheus) and ``/v1/stats`` (JSON).

The running gateway owns one :class:`MetricsCollector`; the request path calls
``record_request`` once per finished client request, the health poller calls
``record_health_check``. :class:`MetricsResource` and :class:`StatsResource`
serve the numbers. See ``docs/metrics.md``.
"""

from __future__ import annotations

from nexus.metrics.collector import MetricsCollector
from nexus.metrics.labels import sanitize_label
from nexus.metrics.resource import MetricsResource, StatsResource

__all__ = ["MetricsCollector", "MetricsResource", "StatsResource", "sanitize_label"]
