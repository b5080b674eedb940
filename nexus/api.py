"""The HTTP API (contract section 1): which path is served by what.

Inference paths are served as exchanges by the server layer (``nexus.server``)
with the handlers here; everything else goes through Klein routes. The work
happens in ``nexus.proxy``, ``nexus.metrics`` and the registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound

from nexus import __version__
from nexus.access import AccessPolicy
from nexus.admission import Admission
from nexus.endpoints import ENDPOINTS, Endpoint
from nexus.errors import InvalidRequest, MethodNotAllowed, ModelNotFound, NotFound, Unauthorized
from nexus.metrics import MetricsCollector, MetricsResource, StatsResource
from nexus.proxy import InferenceProxy, requested_model
from nexus.registry import HEALTHY, Backend, BackendRegistry, format_timestamp
from nexus.requestlog import HISTORY_SIZE, RequestLog
from nexus.routing import Router
from nexus.server import Exchange, Handler, NexusRequest, Outcome, error_response

if TYPE_CHECKING:
    from nexus.dashboard import Dashboard

def _json(request: Request, status: int, payload: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode("utf-8")


class NexusAPI:
    """The routes of the gateway. ``now`` is a monotonic clock in seconds."""

    app = Klein()
    #: The dashboard (contract section 9); None when ``[server] dashboard = false``.
    dashboard: Dashboard | None = None

    def __init__(
        self,
        registry: BackendRegistry,
        router: Router,
        proxy: InferenceProxy,
        collector: MetricsCollector,
        admission: Admission,
        request_log: RequestLog,
        now: Callable[[], float],
        wall_clock: Callable[[], float],
        access: AccessPolicy | None = None,
    ) -> None:
        self.access = access or AccessPolicy()
        self.request_log = request_log
        self.admission = admission
        self.registry = registry
        self.router = router
        self.proxy = proxy
        self.collector = collector
        self.now = now
        self.wall_clock = wall_clock
        self.started = now()
        self.created = int(wall_clock())
        self.metrics_resource = MetricsResource(collector)
        self.stats_resource = StatsResource(collector)
        #: Fires when the numbers here include every request finished before now: once the
        #: site's waiting records are written in one process (``NexusSite.synced``); after a
        #: round trip to every worker in worker mode (``nexus.workers``).
        self.synced: Callable[[], Deferred[None]] = lambda: succeed(None)
        #: The handler of each inference path.
        self.inference: dict[bytes, Handler] = {
            path: partial(self.infer, endpoint) for path, endpoint in ENDPOINTS.items()
        }

    # -- inference ---------------------------------------------------------------

    async def infer(self, endpoint: Endpoint, exchange: Exchange) -> Outcome:
        """``POST`` to an inference endpoint: admitted, then proxied."""
        self._admit(exchange)
        return await self.proxy.handle(exchange, endpoint)

    def _admit(self, exchange: Exchange) -> None:
        """Refuse an exchange that lacks a key, or that the gateway cannot take now."""
        if not self.access.allows_api(exchange.authorization):
            exchange.record.model = requested_model(exchange.body)  # the log says what was asked
            raise Unauthorized(
                "Missing or invalid API key; send it as 'Authorization: Bearer <key>'."
            )
        self.admission.admit(exchange)

    # -- everything else -----------------------------------------------------------

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: Any) -> bytes:
        """Models servable now, plus aliases whose target is servable."""
        if not self.access.allows_api(request.requestHeaders.getRawHeaders(b"authorization")):
            return error_response(request, Unauthorized("Missing or invalid API key."))
        entries = self._model_entries()
        data = [entries[k] for k in sorted(entries)]
        return _json(request, 200, {"object": "list", "data": data})

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def model(self, request: Any, model_id: str) -> bytes:
        """One model as ``/v1/models`` lists it (aliases too), or 404 ``model_not_found``."""
        if not self.access.allows_api(request.requestHeaders.getRawHeaders(b"authorization")):
            return error_response(request, Unauthorized("Missing or invalid API key."))
        entry = self._model_entries().get(model_id)
        if entry is None:
            shown = model_id if len(model_id) <= 100 else model_id[:100] + "..."
            return error_response(request, ModelNotFound(
                f"The model '{shown}' is not served now; GET /v1/models lists those that are.",
                param="model",
            ))
        return _json(request, 200, entry)

    def _model_entries(self) -> dict[str, dict[str, Any]]:
        """Every model servable now, and every alias whose target is, by id."""
        entries: dict[str, dict[str, Any]] = {
            model: {
                "id": model,
                "object": "model",
                "created": self.created,
                "owned_by": "nexus",
                "backends": backends,
            }
            for model, backends in self.registry.available_models().items()
        }
        for alias, target in self.registry.available_aliases().items():
            entries.setdefault(alias, {**entries[target], "id": alias, "alias_of": target})
        return entries

    @app.route("/health", methods=["GET"])
    async def health(self, request: Any) -> bytes:
        """Gateway and fleet health: 200 when healthy or degraded, 503 when unhealthy."""
        await self.synced()
        counts = self.registry.counts()
        total, healthy = counts["total"], counts[HEALTHY]
        if total and healthy == total:
            status = "healthy"
        elif healthy:
            status = "degraded"
        else:
            status = "unhealthy"
        return _json(
            request,
            503 if status == "unhealthy" else 200,
            {
                "status": status,
                "version": __version__,
                "uptime_seconds": int(self.now() - self.started),
                "backends": counts,
                "models": len(self.registry.available_model_names()),
                "fleet": [fleet_entry(backend) for backend in self.registry.backends],
            },
        )

    @app.route("/metrics", methods=["GET", "HEAD"])
    async def metrics(self, request: Request) -> Any:
        """Prometheus exposition."""
        refused = self._metrics_guard(request)
        if refused is not None:
            return refused
        await self.synced()
        return self.metrics_resource

    @app.route("/v1/stats", methods=["GET", "HEAD"])
    async def stats(self, request: Request) -> Any:
        """The same numbers as JSON."""
        refused = self._metrics_guard(request)
        if refused is not None:
            return refused
        await self.synced()
        return self.stats_resource

    @app.route("/v1/history", methods=["GET"])
    async def history(self, request: Any) -> bytes:
        """The last finished inference requests, newest first (``?limit=N``, N <= 100)."""
        refused = self._metrics_guard(request)
        if refused is not None:
            return refused
        values = request.args.get(b"limit")
        limit = HISTORY_SIZE
        if values is not None:
            text = values[-1].decode("ascii", "replace")
            if not (len(text) <= 3 and text.isascii() and text.isdigit()
                    and 1 <= int(text) <= HISTORY_SIZE):
                return error_response(request, InvalidRequest(
                    f"'limit' must be a whole number from 1 to {HISTORY_SIZE}.", param="limit"
                ))
            limit = int(text)
        await self.synced()
        return _json(request, 200, {"object": "list", "data": self.request_log.recent(limit)})

    def _metrics_guard(self, request: Any) -> bytes | None:
        if self.access.allows_metrics(request.requestHeaders.getRawHeaders(b"authorization")):
            return None
        return error_response(request, Unauthorized("Missing or invalid metrics token."))

    # -- the dashboard (contract section 9; nexus.dashboard does the work) ----------------

    @app.route("/", methods=["GET", "HEAD"])
    @app.route("/dashboard", methods=["GET", "HEAD"])
    async def dashboard_page(self, request: Any) -> Any:
        """The dashboard's page (the token form first when a metrics token is set)."""
        if self.dashboard is None:
            return _no_dashboard(request)
        await self.synced()
        return self.dashboard.page(request, self.access)

    @app.route("/dashboard/login", methods=["POST"])
    def dashboard_login(self, request: Any) -> Any:
        """The token form's answer: a session cookie, back to the page."""
        if self.dashboard is None:
            return _no_dashboard(request)
        return self.dashboard.login(request, self.access)

    @app.route("/v1/events", methods=["GET"])
    def dashboard_events(self, request: Any) -> Any:
        """Server-Sent Events: ``request``, ``backend`` and ``stats`` (every 2 s)."""
        if self.dashboard is None:
            return _no_dashboard(request)
        return self.dashboard.events(request, self.access)

    @app.route("/assets/<path:name>", methods=["GET", "HEAD"])
    def dashboard_asset(self, request: Any, name: str) -> Any:
        """The page's static files."""
        if self.dashboard is None:
            return _no_dashboard(request)
        return self.dashboard.asset(request, name)

    @app.handle_errors(WerkzeugNotFound)
    def not_found(self, request: Any, failure: Any) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return error_response(request, NotFound(f"Unknown path: {path}"))

    @app.handle_errors(WerkzeugMethodNotAllowed)
    def method_not_allowed(self, request: Any, failure: Any) -> bytes:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        return error_response(request, MethodNotAllowed(f"{method} is not allowed on {path}"))


def _no_dashboard(request: Any) -> bytes:
    """``[server] dashboard = false``: the dashboard's paths answer as unknown paths."""
    path = request.path.decode("utf-8", "replace")
    return error_response(request, NotFound(f"Unknown path: {path}"))


def fleet_entry(backend: Backend) -> dict[str, object]:
    """One backend as ``/health``'s ``fleet`` shows it (contract section 1)."""
    latency = backend.gateway_latency_ms
    return {
        "id": backend.name,
        "type": backend.type,
        "status": backend.status,
        "source": backend.source,
        "models": len(backend.models),
        "last_check": format_timestamp(backend.last_check),
        "last_error": backend.last_error,
        "average_latency_ms": None if latency is None else round(latency, 1),
    }


class GatewayResource(Resource):
    """The site's root: every path but an inference ``POST``, through Klein.

    An inference ``POST`` never gets here: ``NexusRequest.process`` hands it to its
    handler directly (Klein's werkzeug matching and the reference cycles it leaves
    per request cost about a quarter of the gateway's CPU per proxied request).
    Another method on an inference path is answered 405 here.
    """

    isLeaf = True

    def __init__(self, api: NexusAPI) -> None:
        super().__init__()
        self.api = api
        self.klein = api.app.resource()

    def render(self, request: NexusRequest) -> object:
        if request.path not in self.api.inference:
            return self.klein.render(request)
        request.setHeader(b"allow", b"POST")
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("ascii", "replace")
        return error_response(request, MethodNotAllowed(f"{method} is not allowed on {path}"))
