"""The dashboard over HTTP: the page, the token form, the static files, the event stream.

Access is the rule of ``/v1/stats``: open while ``[server] metrics_token`` is unset;
with a token, ``Authorization: Bearer <token>`` or the session cookie that the token
form sets (``HttpOnly; SameSite=Strict``). The cookie holds an HMAC of the token, not
the token: it opens the dashboard only, and a new token invalidates it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from nexus.access import AccessPolicy
from nexus.dashboard.assets import (
    CACHE_REVALIDATE,
    CACHE_VERSIONED,
    Asset,
    load_assets,
    matches,
)
from nexus.dashboard.live import LiveView
from nexus.dashboard.page import CSP, render_login, render_page
from nexus.errors import NotFound, Overloaded, Unauthorized
from nexus.metrics import MetricsCollector
from nexus.registry import BackendRegistry
from nexus.server import error_response

#: The session cookie's name.
COOKIE = b"nexus_dashboard"
#: How long a browser keeps the session cookie (seconds).
COOKIE_MAX_AGE = 30 * 86400
#: Where the token form may send the browser back to.
PAGES = ("/", "/dashboard")

_HTML = b"text/html; charset=utf-8"
_PAGE_HEADERS = (
    (b"content-type", _HTML),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


def session_value(token: bytes) -> bytes:
    """The session cookie's value for metrics token ``token``."""
    return hmac.new(token, b"nexus dashboard session", hashlib.sha256).hexdigest().encode()


def allowed(request: Request, access: AccessPolicy) -> bool:
    """Whether ``request`` may see the dashboard: the rule of ``/v1/stats``, or the cookie."""
    authorization = request.requestHeaders.getRawHeaders(b"authorization")
    if access.allows_metrics(list(authorization) if authorization is not None else None):
        return True
    token = access.metrics_token
    cookie = request.getCookie(COOKIE)
    return token is not None and cookie is not None and hmac.compare_digest(
        cookie, session_value(token)
    )


class EventsResource(Resource):
    """``GET /v1/events``: one subscriber's Server-Sent Events stream."""

    isLeaf = True

    def __init__(self, live: LiveView) -> None:
        super().__init__()
        self.live = live

    def render_GET(self, request: Request) -> Any:
        """Open the stream (503 when too many are open)."""
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")  # a proxy in front must not buffer it
        subscriber = self.live.subscribe(request)
        if subscriber is None:
            return error_response(
                request, Overloaded("Too many dashboards are open; try again later.")
            )
        return NOT_DONE_YET


class DashboardService(Service):
    """Ends the open event streams when the gateway stops (browsers then reconnect)."""

    name = "dashboard"

    def __init__(self, live: LiveView) -> None:
        self.live = live

    def stopService(self) -> None:
        super().stopService()
        self.live.close()


class Dashboard:
    """The dashboard (contract section 9): its live view and its HTTP answers.

    ``record`` is a recorder for the site; ``service`` a child service of the gateway.
    The API's routes call :meth:`page`, :meth:`login`, :meth:`events` and
    :meth:`asset` with the access policy in force.
    """

    def __init__(
        self,
        registry: BackendRegistry,
        collector: MetricsCollector,
        reactor: IReactorTime,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.live = LiveView(registry, collector, reactor, clock)
        #: The recorder of finished requests (the live view's, without an extra call).
        self.record = self.live.record
        self.assets: dict[str, Asset] = load_assets()
        self.asset_urls = {name: asset.url for name, asset in self.assets.items()}
        self.events_resource = EventsResource(self.live)
        self.service = DashboardService(self.live)

    def subscribers(self) -> int:
        """Open event streams now (``nexus_dashboard_subscribers``)."""
        return len(self.live.hub)

    def page(self, request: Request, access: AccessPolicy) -> bytes:
        """``GET /`` and ``/dashboard``: the page, or the token form (401)."""
        for name, value in _PAGE_HEADERS:
            request.setHeader(name, value)
        if not allowed(request, access):
            request.setResponseCode(401)
            path = request.path.decode("ascii", "replace")
            return render_login(self.asset_urls, path if path in PAGES else "/", failed=False)
        return render_page(self.live.snapshot(), self.live.requests(), self.asset_urls)

    def login(self, request: Request, access: AccessPolicy) -> bytes:
        """``POST /dashboard/login`` (the token form): set the cookie and go to the page."""
        content = request.content
        body = content.read() if content is not None else b""
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        token = form.get("token", [""])[-1].strip()
        back = form.get("next", ["/"])[-1]
        back = back if back in PAGES else "/"
        if access.metrics_token is not None:
            if not token or not access.allows_metrics([b"Bearer " + token.encode("utf-8")]):
                for name, value in _PAGE_HEADERS:
                    request.setHeader(name, value)
                request.setResponseCode(401)
                return render_login(self.asset_urls, back, failed=True)
            request.addCookie(
                COOKIE,
                session_value(access.metrics_token),
                path=b"/",
                max_age=str(COOKIE_MAX_AGE).encode("ascii"),
                httpOnly=True,
                secure=request.isSecure(),
                sameSite="strict",
            )
        request.setResponseCode(303)
        request.setHeader(b"location", back.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"See " + back.encode("ascii") + b"\n"

    def events(self, request: Request, access: AccessPolicy) -> Resource | bytes:
        """``GET /v1/events``: the stream's resource, or 401."""
        if not allowed(request, access):
            return error_response(request, Unauthorized("Missing or invalid metrics token."))
        return self.events_resource

    def asset(self, request: Request, name: str) -> bytes:
        """``GET /assets/<name>``: a static file with its type and caching headers."""
        asset = self.assets.get(name)
        if asset is None:
            return error_response(request, NotFound(f"Unknown path: /assets/{name}"))
        request.setHeader(b"content-type", asset.content_type)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"etag", asset.etag)
        versions = request.args.get(b"v") or []
        current = versions == [asset.version.encode("ascii")]
        request.setHeader(b"cache-control", CACHE_VERSIONED if current else CACHE_REVALIDATE)
        if matches(request.getHeader(b"if-none-match"), asset.etag):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-length", b"%d" % len(asset.body))
        return asset.body
