"""Health polling and model discovery (contract section 3).

Every interval all backends are probed concurrently, each probe bounded by
the configured timeout, so a hung backend never delays the others or the next
round. A probe never raises: whatever happens becomes a success or a failure
of that one backend.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import RequestTransmissionFailed, ResponseFailed

from nexus.config import HealthCheckConfig
from nexus.registry import HEALTHY, UNHEALTHY, UNKNOWN, Backend, BackendRegistry
from nexus.upstream import backend_authorization

log = Logger()


class ProbeFailed(Exception):
    """A health probe got no usable answer; the message says why."""


def _models_from_openai(payload: Any) -> list[str]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ProbeFailed("/v1/models answer has no 'data' list")
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _models_from_ollama(payload: Any) -> list[str]:
    models = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(models, list):
        raise ProbeFailed("/api/tags answer has no 'models' list")
    return [m["name"] for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]


def auth_headers(backend: Backend, environ: Mapping[str, str]) -> dict[bytes, list[bytes]]:
    """The bearer header for a backend with its own ``api_key_env``, else nothing."""
    authorization = backend_authorization(backend.config, environ)
    return {b"Authorization": [authorization]} if authorization else {}


class HealthPoller:
    """Probes every backend, updates the registry, records probe latency.

    ``http`` is a treq ``HTTPClient`` (the shared pool's, or ``StubTreq`` in
    tests); ``clock`` measures latency and bounds each probe; ``wall_clock``
    (seconds since the epoch) stamps each backend's ``last_check``.
    """

    def __init__(
        self,
        registry: BackendRegistry,
        config: HealthCheckConfig,
        http: Any,
        clock: IReactorTime,
        record_latency: Callable[[str, float], None] | None = None,
        environ: Mapping[str, str] = os.environ,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.config = config
        self.http = http
        self.clock = clock
        self.record_latency = record_latency
        self.environ = environ
        self.wall_clock = wall_clock
        #: Fires once the first round of checks is over (the fleet's models are known).
        self.first_round: Deferred[None] = Deferred()

    def check_all(self) -> Deferred[None]:
        """Probe every current backend concurrently; fires when all are done."""
        probes = [
            ensureDeferred(self.check(b)) for b in self.registry.backends if not b.withdrawn
        ]
        return DeferredList(probes, consumeErrors=True).addCallback(self._round_over)

    def _round_over(self, _: object) -> None:
        if not self.first_round.called:
            self.first_round.callback(None)

    async def check(self, backend: Backend) -> None:
        """Probe one backend and apply the result to its status.

        ``last_check`` becomes the time the probe started, set together with the
        outcome (status, ``last_error``), so the three always describe one check.
        """
        started = self.wall_clock()
        try:
            models = await self._probe(backend)
        except Exception as e:  # every failure counts against this backend only
            if backend.withdrawn:  # its service went while probed: it stays unknown
                return
            backend.last_check = started
            self._failed(backend, _describe(e, self.config.timeout_seconds))
        else:
            if backend.withdrawn:
                return
            backend.last_check = started
            self._succeeded(backend, models)
        self.registry.changed(backend)  # observers (the dashboard) see the check at once

    async def _get_json(self, backend: Backend, path: str) -> Any:
        started = self.clock.seconds()
        response = await self.http.get(
            backend.config.url + path,
            headers=auth_headers(backend, self.environ),
            timeout=self.config.timeout_seconds,
            reactor=self.clock,
            allow_redirects=False,
        )
        body = await response.content()
        if self.record_latency is not None:
            try:
                self.record_latency(backend.name, self.clock.seconds() - started)
            except Exception:
                log.failure("recording probe latency failed")
        if response.code != 200:
            raise ProbeFailed(f"GET {path} answered {response.code}")
        try:
            return json.loads(body)
        except ValueError:
            raise ProbeFailed(f"GET {path} answered invalid JSON") from None

    async def _probe(self, backend: Backend) -> list[str] | None:
        kind = backend.config.type
        if kind == "ollama":
            return _models_from_ollama(await self._get_json(backend, "/api/tags"))
        if kind == "llamacpp":
            status = await self._get_json(backend, "/health")
            if not (isinstance(status, dict) and status.get("status") == "ok"):
                raise ProbeFailed(f"/health says {status!r}")
            try:
                return _models_from_openai(await self._get_json(backend, "/v1/models"))
            except Exception as e:
                # Healthy but cannot list: keep the models we know.
                log.debug("{backend}: model list unavailable: {e}", backend=backend.name, e=e)
                return None
        return _models_from_openai(await self._get_json(backend, "/v1/models"))

    def _succeeded(self, backend: Backend, models: list[str] | None) -> None:
        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        if models is not None:
            self.registry.set_models(backend, models)
            backend.missing_endpoints.clear()  # a new discovery: try every endpoint again
            backend.model_discoveries += 1
        if backend.status == UNKNOWN or (
            backend.status == UNHEALTHY
            and backend.consecutive_successes >= self.config.recovery_threshold
        ):
            if backend.status != UNKNOWN:
                log.info("backend {backend} is healthy again", backend=backend.name)
            backend.status = HEALTHY
        if backend.status == HEALTHY:
            # Not before: while it recovers, the operator still sees why it went down.
            backend.last_error = None

    def _failed(self, backend: Backend, why: str) -> None:
        backend.consecutive_successes = 0
        backend.consecutive_failures += 1
        backend.last_error = why
        if backend.status == UNKNOWN or (
            backend.status == HEALTHY
            and backend.consecutive_failures >= self.config.failure_threshold
        ):
            log.warn("backend {backend} is unhealthy: {why}", backend=backend.name, why=why)
            backend.status = UNHEALTHY


def _describe(e: BaseException, timeout: float) -> str:
    """One line saying why a probe failed (``last_error``, the log)."""
    if isinstance(e, ProbeFailed):
        return str(e)
    if isinstance(e, (ResponseFailed, RequestTransmissionFailed)) and e.reasons:
        e = e.reasons[0].value  # the cause, not the client's wrapper around it
    if isinstance(e, (CancelledError, ConnectingCancelledError)):
        # treq's timeout cancels the request.
        return f"no answer within {timeout:g} s"
    name = type(e).__name__
    return f"{name}: {e}" if str(e) else name


class HealthService(TimerService):
    """Runs ``poller.check_all`` every interval, first at start.

    TimerService waits for each round's Deferred before scheduling the next, and
    ``check_all`` never fails, so the loop never stops on its own.
    """

    def __init__(self, poller: HealthPoller, clock: IReactorTime) -> None:
        super().__init__(poller.config.interval_seconds, poller.check_all)
        self.clock = clock
        self.name = "health"
