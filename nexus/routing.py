"""Routing: which backends may serve a request for a model, best first.

The router is a pure, synchronous decision over the registry's live state.
"""

from __future__ import annotations

import attrs

from nexus.config import RoutingConfig
from nexus.errors import ModelNotFound, NoHealthyBackend
from nexus.registry import Backend, BackendRegistry


@attrs.frozen
class RouteDecision:
    """Where a request goes.

    ``model`` is the name sent to the backend (after alias and fallback);
    ``candidates`` are the backends to try, in order (the first, then retries);
    ``fallback_from`` is the resolved model whose fallback served, if any.
    """

    requested_model: str
    model: str
    candidates: tuple[Backend, ...]
    fallback_from: str | None = None
    route_reason: str = ""


class Router:
    """Decides a route for each request (placeholder: first healthy backend)."""

    def __init__(self, registry: BackendRegistry, config: RoutingConfig) -> None:
        self.registry = registry
        self.config = config

    def decide(self, model: str, needs: frozenset[str] = frozenset()) -> RouteDecision:
        """Route a request for ``model``; raise ModelNotFound or NoHealthyBackend."""
        backends = self.registry.by_model.get(model)
        if not backends:
            raise ModelNotFound(f"The model '{model}' does not exist", param="model")
        healthy = tuple(b for b in backends if b.healthy)
        if not healthy:
            raise NoHealthyBackend(f"No healthy backend serves the model '{model}'")
        return RouteDecision(model, model, healthy, None, f"first:{healthy[0].name}")
