"""The backend registry: what each backend is, serves and is doing right now.

The registry is the one live view of the fleet. The health poller writes
status and model lists into it, the request path counts in-flight attempts
and latencies, and the router and the metrics read it. The fleet can grow and
shrink while the gateway runs (:meth:`BackendRegistry.add`, :meth:`remove`).

It is also the one place that says which models are *available*: listed by at
least one healthy backend now (:meth:`BackendRegistry.available_models` and its
cheaper relatives), and which aliases lead to one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

import attrs
from twisted.logger import Logger

from nexus.config import MAX_ALIAS_HOPS, BackendConfig, Config

UNKNOWN = "unknown"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"

#: ``source`` of a backend from the configuration file.
SOURCE_CONFIG = "config"
#: ``source`` of a backend found by mDNS / DNS-SD discovery.
SOURCE_MDNS = "mdns"
SOURCES = frozenset({SOURCE_CONFIG, SOURCE_MDNS})

#: Told about a backend whose state may have changed: ``(backend, removed)``.
BackendObserver = Callable[["Backend", bool], None]

log = Logger()

#: Weight of the newest sample in a backend's latency moving average.
LATENCY_EMA_ALPHA = 0.2


def format_timestamp(seconds: float | None) -> str | None:
    """A wall-clock time (seconds since the epoch) as RFC 3339 UTC, e.g. ``last_check``.

    Millisecond precision, ``Z`` suffix; None stays None.
    """
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@attrs.define(eq=False)
class Backend:
    """Live state of one backend; identity is its ``name``.

    ``source`` says where it came from (``config`` or ``mdns``). ``last_check``
    is the wall-clock time (epoch seconds) at which the last finished health
    check started, success or failure, None before the first; ``last_error``
    is the last failed check's cause, None once the backend is healthy again.
    """

    config: BackendConfig
    status: str = UNKNOWN
    models: frozenset[str] = attrs.field(default=frozenset())
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    pending: int = 0
    avg_latency_ms: float | None = None
    last_error: str | None = None
    source: str = SOURCE_CONFIG
    #: Optional endpoints (``completions``, ``embeddings``) this backend answered
    #: 404/405/501 for: skipped for them until its next successful model discovery.
    missing_endpoints: set[str] = attrs.field(factory=set)
    last_check: float | None = None
    #: A discovered backend whose service is no longer advertised: ``unknown``, not routed
    #: to and not checked, until the service returns or the backend is removed (mDNS).
    withdrawn: bool = False

    #: Successful model discoveries so far (a worker clears ``missing_endpoints`` on a new one).
    model_discoveries: int = 0
    #: Worker mode (contract section 12): the other workers' in-flight requests to this
    #: backend and their latency averages, as of the last sync (``nexus.workers``).
    pending_elsewhere: int = 0
    latency_elsewhere: tuple[float, ...] = ()

    def __attrs_post_init__(self) -> None:
        if not self.models:
            self.models = frozenset(self.config.models)

    @property
    def name(self) -> str:
        """The backend id used everywhere (labels, headers, stats)."""
        return self.config.name

    @property
    def type(self) -> str:
        """The backend type (``ollama``, ``vllm``, ...), as configured or discovered."""
        return self.config.type

    @property
    def priority(self) -> int:
        """Configured priority; lower is preferred."""
        return self.config.priority

    @property
    def healthy(self) -> bool:
        """Whether requests may be routed here."""
        return self.status == HEALTHY

    @property
    def gateway_pending(self) -> int:
        """Requests in flight to this backend from the whole gateway (every worker)."""
        return max(0, self.pending) + self.pending_elsewhere

    @property
    def gateway_latency_ms(self) -> float | None:
        """The latency moving average, over every worker that has one (None: no sample yet)."""
        if not self.latency_elsewhere:
            return self.avg_latency_ms
        values = [v for v in (self.avg_latency_ms, *self.latency_elsewhere) if v is not None]
        return sum(values) / len(values) if values else None

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
    """All current backends plus the model names the gateway knows.

    ``backends`` is a tuple sorted by id, replaced (never mutated) when the
    fleet changes. ``by_model`` indexes backends (healthy or not) by the models
    they list; it is rebuilt whenever a model list or the fleet changes, so the
    router never scans the whole fleet.
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
        #: Called by :meth:`changed` (the dashboard's live view of the fleet).
        self.observers: list[BackendObserver] = []
        self.reindex()

    @classmethod
    def from_config(cls, config: Config) -> BackendRegistry:
        """Build the registry a configuration describes."""
        return cls(config.backends, config.routing.aliases, config.routing.fallbacks)

    def get(self, name: str) -> Backend:
        """The backend with id ``name`` (KeyError if none)."""
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        """Whether a backend with id ``name`` is registered now."""
        return name in self._by_name

    # -- the fleet -------------------------------------------------------------

    def add(self, config: BackendConfig, source: str = SOURCE_CONFIG) -> Backend:
        """Register a new backend (status ``unknown``) and return it.

        ValueError if a backend with the same name is registered, or ``source``
        is not ``config`` or ``mdns``.
        """
        if source not in SOURCES:
            raise ValueError(f"unknown backend source {source!r}")
        if config.name in self._by_name:
            raise ValueError(f"a backend named {config.name!r} is already registered")
        backend = Backend(config=config, source=source)
        self._by_name[backend.name] = backend
        self.backends = tuple(sorted(self._by_name.values(), key=lambda b: b.name))
        self.reindex()
        self.changed(backend)
        return backend

    def remove(self, name: str) -> Backend:
        """Unregister the backend with id ``name`` and return it (KeyError if none).

        Requests already sent to it finish normally; it is no longer routed to,
        checked, or listed. Its recorded metrics are kept (counters are history).
        """
        backend = self._by_name.pop(name)
        self.backends = tuple(b for b in self.backends if b is not backend)
        self.reindex()
        self.changed(backend, removed=True)
        return backend

    def changed(self, backend: Backend, removed: bool = False) -> None:
        """Tell the observers that ``backend``'s state may have changed (status, check, models).

        Called when a backend is added, removed (``removed``) or health-checked; a
        backend no longer registered is not reported unless it is the removal. A
        failing observer is logged and never stops the others.
        """
        if not removed and self._by_name.get(backend.name) is not backend:
            return
        for observer in self.observers:
            try:
                observer(backend, removed)
            except Exception:
                log.failure("a backend observer failed")

    def reconfigure(self, backend: Backend, config: BackendConfig) -> None:
        """Give a registered backend a changed configuration (a reload), keeping its state.

        A new url is another server: its status goes back to ``unknown`` until checked.
        """
        if config.url != backend.config.url:
            backend.status = UNKNOWN
            backend.consecutive_failures = backend.consecutive_successes = 0
            backend.models = frozenset()
        floor_before = frozenset(backend.config.models)
        backend.config = config
        backend.models = (backend.models - floor_before) | frozenset(config.models)
        self.reindex()

    def set_routing(
        self, aliases: Mapping[str, str], fallbacks: Mapping[str, Iterable[str]]
    ) -> None:
        """Replace the aliases and fallbacks (a reload); known models follow."""
        self.aliases = dict(aliases)
        self.fallbacks = {k: tuple(v) for k, v in fallbacks.items()}
        names = frozenset(self.aliases) | frozenset(self.aliases.values())
        for model, chain in self.fallbacks.items():
            names |= {model, *chain}
        self._routing_names = names
        self.reindex()

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
            # A probe may finish after its backend was removed: no index to fix then.
            if self._by_name.get(backend.name) is backend:
                self.reindex()

    def counts(self) -> dict[str, int]:
        """How many backends are in each status, plus ``total``."""
        counts = {"total": len(self.backends), HEALTHY: 0, UNHEALTHY: 0, UNKNOWN: 0}
        for backend in self.backends:
            counts[backend.status] += 1
        return counts

    # -- models ----------------------------------------------------------------

    def is_known_model(self, name: str) -> bool:
        """Whether any backend, alias or fallback names ``name``."""
        return name in self.known_models

    def is_available(self, model: str) -> bool:
        """Whether a healthy backend lists ``model`` now (the definition of *available*)."""
        return any(b.healthy for b in self.by_model.get(model, ()))

    def available_model_names(self) -> list[str]:
        """Models available now (see :meth:`is_available`), unsorted.

        The names of :meth:`available_models` without building the per-model
        backend lists: what the ``/metrics`` scrape and ``/v1/stats`` use.
        """
        return [m for m, backends in self.by_model.items() if any(b.healthy for b in backends)]

    def available_models(self) -> dict[str, list[str]]:
        """Model id -> ids of the healthy backends serving it, for every available model."""
        out: dict[str, list[str]] = {}
        for model, backends in self.by_model.items():
            ids = [b.name for b in backends if b.healthy]
            if ids:
                out[model] = ids
        return out

    def resolve_alias(self, model: str) -> str:
        """Follow ``model`` through the aliases, at most ``MAX_ALIAS_HOPS`` hops.

        A name that is available stops the walk: a real model wins over an alias
        of the same name. Cycles cannot loop (the hops are bounded).
        """
        aliases = self.aliases
        name = model
        for _ in range(MAX_ALIAS_HOPS):
            target = aliases.get(name)
            if target is None or self.is_available(name):
                break
            name = target
        return name

    def available_aliases(self) -> dict[str, str]:
        """Alias -> the model it resolves to, for aliases whose target is available.

        An alias that is itself an available model's name is not listed (the
        model wins, see :meth:`resolve_alias`).
        """
        out: dict[str, str] = {}
        for alias in self.aliases:
            if self.is_available(alias):
                continue
            target = self.resolve_alias(alias)
            if self.is_available(target):
                out[alias] = target
        return out
