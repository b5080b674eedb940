"""The backend registry: what each backend is, serves and is doing right now.

The registry is the one live view of the fleet. The health poller writes
status and model lists into it, the request path counts in-flight attempts
and latencies, and the router and the metrics read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from nexus.config import BackendConfig, Config

UNKNOWN = "unknown"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"

#: Weight of the newest sample in a backend's latency moving average.
LATENCY_EMA_ALPHA = 0.2


@attrs.define(eq=False)
class Backend:
    """Live state of one backend; identity is its ``name``."""

    config: BackendConfig
    status: str = UNKNOWN
    models: frozenset[str] = attrs.field(default=frozenset())
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    pending: int = 0
    avg_latency_ms: float | None = None
    last_error: str | None = None

    def __attrs_post_init__(self) -> None:
        if not self.models:
            self.models = frozenset(self.config.models)

    @property
    def name(self) -> str:
        """The backend id used everywhere (labels, headers, stats)."""
        return self.config.name

    @property
    def priority(self) -> int:
        """Configured priority; lower is preferred."""
        return self.config.priority

    @property
    def healthy(self) -> bool:
        """Whether requests may be routed here."""
        return self.status == HEALTHY

    def supports(self, model: str, needs: frozenset[str]) -> bool:
        """Whether this backend's ``model`` may serve a request needing ``needs``.

        A model without a capability entry is assumed to support everything.
        """
        if not needs:
            return True
        caps = self.config.model_capabilities.get(model)
        return caps is None or needs <= caps

    def record_latency(self, duration_ms: float) -> None:
        """Fold one request duration into the moving average."""
        if self.avg_latency_ms is None:
            self.avg_latency_ms = duration_ms
        else:
            self.avg_latency_ms += LATENCY_EMA_ALPHA * (duration_ms - self.avg_latency_ms)


class BackendRegistry:
    """All configured backends plus the model names the gateway knows.

    ``by_model`` indexes backends (healthy or not) by the models they list; it
    is rebuilt whenever a model list changes, so the router never scans the
    whole fleet.
    """

    def __init__(
        self,
        backends: Iterable[BackendConfig],
        aliases: Mapping[str, str] | None = None,
        fallbacks: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.backends: tuple[Backend, ...] = tuple(
            sorted((Backend(config=b) for b in backends), key=lambda b: b.name)
        )
        self._by_name = {b.name: b for b in self.backends}
        self.aliases: Mapping[str, str] = dict(aliases or {})
        self.fallbacks: Mapping[str, tuple[str, ...]] = {
            k: tuple(v) for k, v in (fallbacks or {}).items()
        }
        self._routing_names = frozenset(self.aliases) | frozenset(self.aliases.values())
        for model, chain in self.fallbacks.items():
            self._routing_names |= {model, *chain}
        self.by_model: dict[str, tuple[Backend, ...]] = {}
        self.known_models: frozenset[str] = frozenset()
        self.reindex()

    @classmethod
    def from_config(cls, config: Config) -> BackendRegistry:
        """Build the registry a configuration describes."""
        return cls(config.backends, config.routing.aliases, config.routing.fallbacks)

    def get(self, name: str) -> Backend:
        """The backend with id ``name`` (KeyError if none)."""
        return self._by_name[name]

    def reindex(self) -> None:
        """Recompute ``by_model`` and ``known_models`` after a model list changed."""
        index: dict[str, list[Backend]] = {}
        for backend in self.backends:
            for model in backend.models:
                index.setdefault(model, []).append(backend)
        self.by_model = {m: tuple(bs) for m, bs in index.items()}
        self.known_models = frozenset(index) | self._routing_names

    def set_models(self, backend: Backend, models: Iterable[str]) -> None:
        """Replace a backend's discovered models; configured models stay as a floor."""
        new = frozenset(models) | frozenset(backend.config.models)
        if new != backend.models:
            backend.models = new
            self.reindex()

    def is_known_model(self, name: str) -> bool:
        """Whether any backend, alias or fallback names ``name``."""
        return name in self.known_models

    def available_models(self) -> dict[str, list[str]]:
        """Model id -> ids of healthy backends serving it, for models served now."""
        out: dict[str, list[str]] = {}
        for model, backends in self.by_model.items():
            ids = [b.name for b in backends if b.healthy]
            if ids:
                out[model] = ids
        return out

    def counts(self) -> dict[str, int]:
        """How many backends are in each status, plus ``total``."""
        counts = {"total": len(self.backends), HEALTHY: 0, UNHEALTHY: 0, UNKNOWN: 0}
        for backend in self.backends:
            counts[backend.status] += 1
        return counts
