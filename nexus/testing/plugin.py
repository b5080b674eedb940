"""``twistd nexus-mock``: its options and the service that runs one mock backend."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage

from nexus.testing.server import MockBackend, ReactorLike
from nexus.testing.settings import (
    BACKEND_TYPES,
    ENDPOINTS,
    FAIL_MODES,
    MISSING_ENDPOINT_STATUSES,
    STREAM_FRAMINGS,
    MockSettings,
)

__all__ = ["MockService", "Options", "makeService"]


class MockService(service.Service):
    """Runs one ``MockBackend`` on a TCP port while the service runs.

    Nothing listens until ``startService``; ``stopService`` stops listening and cuts open
    connections.
    """

    _log = Logger()

    def __init__(self, backend: MockBackend, port: int, interface: str) -> None:
        self.backend = backend
        self.port_number = port
        self.interface = interface

    def startService(self) -> None:
        """Listen (synchronously, so a busy port stops ``twistd`` at start-up) and log the URL."""
        self.backend.listen(self.port_number, self.interface)
        super().startService()
        s = self.backend.settings
        self._log.info(
            "nexus-mock {name} ({type}, models {models}) listening on {url}",
            name=s.name,
            type=s.type,
            models=",".join(s.models),
            url=self.backend.url,
        )

    def stopService(self) -> Deferred[None]:
        """Stop listening and cut open connections."""
        super().stopService()
        return self.backend.stop()


class Options(usage.Options):
    """``twistd nexus-mock`` options."""

    synopsis = "[options]"
    longdesc = "A fake OpenAI / Ollama / llama.cpp inference server for testing Nexus."

    optParameters = [
        ["port", "p", 9001, "TCP port to listen on (0 picks a free one).", int],
        ["interface", "i", "127.0.0.1", "Interface to listen on."],
        ["name", None, "mock", "Backend name (x-mock-backend header, answer text)."],
        ["models", None, "mock-model", "Comma-separated model names."],
        ["type", None, "openai", f"Server type: {'|'.join(BACKEND_TYPES)}."],
        ["latency-ms", None, 0.0, "Delay before inference response headers (ms).", float],
        ["stream-chunks", None, 5, "Content events per stream.", int],
        ["stream-delay-ms", None, 0.0, "Gap between stream events (ms).", float],
        ["first-token-delay-ms", None, 0.0, "Gap before a stream's first content (ms).", float],
        ["stream-framing", None, "chunked", f"Stream body framing: {'|'.join(STREAM_FRAMINGS)}."],
        ["fail", None, None, f"Failure mode: {'|'.join(FAIL_MODES)}."],
        ["fail-count", None, -1, "Inference requests the failure applies to (-1 = all).", int],
        [
            "endpoints",
            None,
            ",".join(ENDPOINTS),
            f"Comma-separated inference endpoints served, out of {','.join(ENDPOINTS)}.",
        ],
        [
            "missing-endpoint-status",
            None,
            404,
            "Status of a request to an endpoint not served: "
            f"{'|'.join(map(str, MISSING_ENDPOINT_STATUSES))}.",
            int,
        ],
        ["embedding-dimensions", None, 8, "Floats per embedding vector.", int],
    ]
    optFlags = [
        ["health-fail", None, "Discovery/health endpoints answer 500."],
        ["flap", None, "Discovery/health endpoints alternate success and 500."],
    ]

    def postOptions(self) -> None:
        """Build ``self["settings"]``, turning any invalid value into a UsageError."""
        models = [m.strip() for m in self["models"].split(",") if m.strip()]
        endpoints = [e.strip() for e in self["endpoints"].split(",") if e.strip()]
        try:
            self["settings"] = MockSettings(
                name=self["name"],
                models=models,
                type=self["type"],
                latency_ms=self["latency-ms"],
                stream_chunks=self["stream-chunks"],
                stream_delay_ms=self["stream-delay-ms"],
                first_token_delay_ms=self["first-token-delay-ms"],
                stream_framing=self["stream-framing"],
                fail=self["fail"],
                fail_count=self["fail-count"],
                health_fail=bool(self["health-fail"]),
                flap=bool(self["flap"]),
                endpoints=endpoints,
                missing_endpoint_status=self["missing-endpoint-status"],
                embedding_dimensions=self["embedding-dimensions"],
            )
        except ValueError as e:
            # Validator messages start with the setting's name: show it as the option.
            name, _, rest = str(e).partition(" ")
            raise usage.UsageError(f"--{name.replace('_', '-')} {rest}") from None
        if not models:
            raise usage.UsageError("--models needs at least one model name")
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError(f"--port must be 0..65535, got {self['port']}")


def makeService(
    options: usage.Options | dict[str, Any], reactor: ReactorLike | None = None
) -> MockService:
    """The ``twistd nexus-mock`` service: one mock backend on ``--interface:--port``.

    Builds the backend only; the port opens when the service starts.
    """
    settings = options["settings"] if "settings" in options else MockSettings()
    backend = MockBackend(settings, reactor)
    return MockService(backend, int(options["port"]), str(options["interface"]))
