"""Configuration values (contract section 2): constants and the frozen classes.

These classes are the whole configuration as the rest of the gateway sees it. Every field
carries its help text (``metadata["help"]``, and an ``"example"`` where the default shows
nothing useful): ``nexus.config.reference`` turns them into the settings tables of
docs/configuration.md and the commented file that ``nexus config init`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

STRATEGIES = ("smart", "round_robin", "priority_only", "random")
BACKEND_TYPES = ("ollama", "vllm", "llamacpp", "lmstudio", "exo", "openai", "generic")
CAPABILITIES = ("vision", "tools", "json_mode")
LOG_FORMATS = ("text", "json")
#: The names of ``twisted.logger.LogLevel``'s constants, lowest first.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

#: Longest alias chain accepted (``a -> b -> c -> d`` is 3 hops).
MAX_ALIAS_HOPS = 3

#: Loopback only: serving other hosts is a choice (warned about without API keys).
DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"


class ConfigError(Exception):
    """A configuration that must not start: the message names the file and the key."""


def doc(
    text: str, example: object = None, env_adds: bool = False, env: str | None = None
) -> dict[str, object]:
    """A field's metadata: its help text, and what the reference shows for it.

    ``example`` is shown (commented out) for a setting whose default is unset, required or an
    empty table; ``env_adds`` says that its environment variable adds to the file's values
    instead of replacing them; ``env`` names its variable when the contract gives it another
    name than ``NEXUS_<SECTION>_<KEY>``.
    """
    return {"help": text, "example": example, "env_adds": env_adds, "env": env}


@attrs.frozen
class ServerConfig:
    """``[server]``."""

    listen: str = attrs.field(
        default=DEFAULT_LISTEN,
        metadata=doc(
            "Where to listen, as a Twisted strports description (`tcp:8000:interface=0.0.0.0` "
            "for every interface, `ssl:8443:...`, `unix:/run/nexus.sock`). Loopback only by "
            "default; listening beyond it while no API key is set is warned about at start."
        ),
    )
    request_timeout_seconds: float = attrs.field(
        default=300.0,
        metadata=doc(
            "Longest wait for a backend's response headers, and for a whole non-streaming "
            "response; for a stream, the longest silence between events (a stream that keeps "
            "flowing is never cut). Past it: 504."
        ),
    )
    max_body_bytes: int = attrs.field(
        default=10 * 1024 * 1024, metadata=doc("Larger request bodies get 413 (10 MiB).")
    )
    max_concurrent_requests: int = attrs.field(
        default=0,
        metadata=doc(
            "Inference requests in flight at once; more get 503 `service_unavailable` with "
            "`Retry-After: 1`. No limit when 0."
        ),
    )
    max_header_bytes: int = attrs.field(
        default=16384,
        metadata=doc(
            "Request line plus headers, in bytes; larger gets 400 and the connection is closed."
        ),
    )
    max_headers: int = attrs.field(
        default=100, metadata=doc("Header lines per request; more gets 400.")
    )
    idle_timeout_seconds: float = attrs.field(
        default=120.0, metadata=doc("Keep-alive connections idle this long are closed.")
    )
    shutdown_grace_seconds: float = attrs.field(
        default=30.0,
        metadata=doc(
            "On SIGTERM the gateway stops accepting, lets requests in flight finish for this "
            "long, then cuts the rest (recorded as 499)."
        ),
    )
    workers: int | str = attrs.field(
        default=1,
        metadata=doc(
            "Processes serving requests: with more than 1, a supervising process owns the "
            "listening socket and runs this many workers on it, with one health poller and one "
            "exact view of the metrics for all of them (docs/scaling.md). `\"auto\"` = one per "
            "CPU. Changes take effect after a restart."
        ),
    )
    api_keys: tuple[str, ...] = attrs.field(
        default=(),
        metadata=doc(
            "Access control: when any key is set (here, in `api_keys_file` or in the "
            "environment: keys from all three are accepted), every `/v1/*` endpoint but "
            "`/v1/stats` requires `Authorization: Bearer <key>`, else 401 `invalid_api_key`. "
            "Keys are compared in constant time and never logged.",
            env_adds=True,
        ),
    )
    api_keys_file: str | None = attrs.field(
        default=None,
        metadata=doc(
            "A file with more keys, one per line (blank lines and `#` comments skipped), read "
            "at start-up; a missing, unreadable or empty file stops start-up.",
            example="/etc/nexus/api-keys",
        ),
    )
    metrics_token: str | None = attrs.field(
        default=None,
        metadata=doc(
            "When set, `/metrics`, `/v1/stats`, `/v1/history` and the dashboard require "
            "`Authorization: Bearer <token>` (Prometheus: `authorization: {credentials: ...}`; "
            "the dashboard's page asks for it once and keeps it in a cookie); an API key does "
            "not open them. Unset, they are open.",
            example="a-long-random-string",
        ),
    )
    dashboard: bool = attrs.field(
        default=True,
        metadata=doc(
            "Serve the dashboard (docs/dashboard.md): the page at `/` and `/dashboard` and its "
            "live events at `/v1/events`, which need `metrics_token` when it is set (the page "
            "asks for it once), and the page's static files under `/assets/`. `false`: all of "
            "them answer 404."
        ),
    )


@attrs.frozen
class HealthCheckConfig:
    """``[health_check]``."""

    enabled: bool = attrs.field(
        default=True,
        metadata=doc(
            "Poll backends for health and models. Off, every configured backend is taken "
            "as healthy."
        ),
    )
    interval_seconds: float = attrs.field(
        default=30.0, metadata=doc("Time between two rounds of checks.")
    )
    timeout_seconds: float = attrs.field(
        default=5.0, metadata=doc("A check that takes longer has failed.")
    )
    failure_threshold: int = attrs.field(
        default=3, metadata=doc("Failures in a row that turn a healthy backend unhealthy.")
    )
    recovery_threshold: int = attrs.field(
        default=2, metadata=doc("Successes in a row that turn an unhealthy backend healthy.")
    )


@attrs.frozen
class Weights:
    """``[routing.weights]``: the smart strategy's weights, summing to 100."""

    priority: float = attrs.field(
        default=50.0, metadata=doc("Weight of the backend's configured `priority`.")
    )
    load: float = attrs.field(default=30.0, metadata=doc("Weight of its requests in flight."))
    latency: float = attrs.field(default=20.0, metadata=doc("Weight of its recent response time."))


@attrs.frozen
class RoutingConfig:
    """``[routing]``."""

    strategy: str = attrs.field(
        default="smart",
        metadata=doc(
            "`smart` (score by priority, load and latency), `round_robin`, `priority_only` "
            "(lowest `priority` wins) or `random`."
        ),
    )
    max_retries: int = attrs.field(
        default=2,
        metadata=doc(
            "Extra attempts on the next best backend after a connection failure, timeout, 5xx "
            "or unparsable answer. A backend's 4xx is never retried."
        ),
    )
    weights: Weights = attrs.field(
        factory=Weights,
        metadata=doc(
            "Weights of the `smart` strategy: the three must sum to 100 (keys left out keep "
            "their defaults and count in the sum)."
        ),
    )
    aliases: Mapping[str, str] = attrs.field(
        factory=dict,
        metadata=doc(
            '`alias = "target"`: a request for the alias is served as the target model. An '
            f"alias may point at another alias, up to {MAX_ALIAS_HOPS} hops (`a -> b -> c -> "
            "d`); an alias pointing at itself, a cycle or a longer chain stops start-up. A "
            "model that a healthy backend serves under the alias's own name is served directly.",
            example={"gpt-4": "llama3:70b"},
        ),
    )
    fallbacks: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict,
        metadata=doc(
            '`model = ["other", ...]`: when no healthy backend serves `model` (after alias '
            "resolution), the listed models are tried in order. One level: a fallback's own "
            "fallbacks are not followed.",
            example={"llama3:70b": ["mistral:7b"]},
        ),
    )


@attrs.frozen
class LoggingConfig:
    """``[logging]``: the gateway's log (docs/logging.md)."""

    format: str = attrs.field(
        default="text",
        metadata=doc(
            "`text`: Twisted's classic lines, a request on one readable line. `json`: every line "
            "the gateway writes to its log is one JSON object (`timestamp`, `level`, `namespace`, "
            "`message`; a request's fields as top-level keys)."
        ),
    )
    level: str = attrs.field(
        default="info",
        metadata=doc(
            "Least severe level written. At `debug`, requests to `/health`, `/metrics`, "
            "`/v1/stats` and `/v1/models` get a line each too (never at `info`)."
        ),
    )
    requests: bool = attrs.field(
        default=True,
        metadata=doc(
            "Write one request-log event per finished inference request (namespace "
            "`nexus.requests`); `false` turns the request log off (`/v1/history` still answers)."
        ),
    )
    content_preview: bool = attrs.field(
        default=False,
        metadata=doc(
            "Add `prompt_preview` (the first 100 characters of the last user message) to "
            "request-log events; warned about at start. Keys, bodies and `Authorization` values "
            "are never logged otherwise."
        ),
    )


@attrs.frozen
class DiscoveryConfig:
    """``[discovery]``: backends found by mDNS / DNS-SD (docs/discovery.md)."""

    enabled: bool = attrs.field(
        default=True,
        metadata=doc(
            "Browse the local network for inference servers that advertise themselves; each "
            "one found becomes a backend (`source` `mdns`). `--no-discovery` turns it off.",
            env="NEXUS_DISCOVERY",
        ),
    )
    service_types: tuple[str, ...] = attrs.field(
        default=("_ollama._tcp.local.", "_llm._tcp.local."),
        metadata=doc(
            "DNS-SD service types to browse, like `_llm._tcp.local.` (the final `.` may be "
            "left out)."
        ),
    )
    grace_period_seconds: float = attrs.field(
        default=60.0,
        metadata=doc(
            "A service that stops being advertised is `unknown` (not routed to) at once and "
            "removed after this long, unless it comes back."
        ),
    )
    interfaces: tuple[str, ...] = attrs.field(
        default=(),
        metadata=doc(
            "IP addresses of the interfaces to browse on; empty: every interface. Loopback "
            '(`["127.0.0.1"]`) keeps discovery on this machine.'
        ),
    )


@attrs.frozen
class BackendConfig:
    """One ``[[backends]]`` entry.

    ``model_capabilities`` maps a model name to what it supports (a subset of
    ``CAPABILITIES``); a model not in the map is assumed to support everything.
    """

    name: str = attrs.field(
        metadata=doc(
            "Unique, non-empty: the backend id in headers, metrics and stats.",
            example="ollama-local",
        )
    )
    url: str = attrs.field(
        metadata=doc(
            "Base URL, `http://` or `https://` with a host, no `?query` or `#fragment`; a "
            "trailing `/` is dropped.",
            example="http://127.0.0.1:11434",
        )
    )
    type: str = attrs.field(
        default="generic",
        metadata=doc("Decides how health and models are discovered.", example="ollama"),
    )
    priority: int = attrs.field(default=50, metadata=doc("Lower is preferred."))
    api_key_env: str | None = attrs.field(
        default=None,
        metadata=doc(
            "Name of an environment variable whose value is sent as the bearer token to this "
            "backend instead of the client's `Authorization`; warned about at start when it "
            "is not set.",
            example="OLLAMA_API_KEY",
        ),
    )
    models: tuple[str, ...] = attrs.field(
        default=(),
        metadata=doc(
            "Models to assume this backend serves even when discovery does not list them.",
            example=["llama3:70b"],
        ),
    )
    model_capabilities: Mapping[str, frozenset[str]] = attrs.field(
        factory=dict,
        metadata=doc(
            '`model = ["vision", "tools", "json_mode"]`: what a model supports; a model not '
            "listed is assumed to support everything.",
            example={"llava:13b": ["vision"]},
        ),
    )


@attrs.frozen
class Config:
    """The whole configuration."""

    server: ServerConfig = attrs.field(
        factory=ServerConfig,
        metadata=doc("The HTTP server: where it listens, its limits, access control."),
    )
    health_check: HealthCheckConfig = attrs.field(
        factory=HealthCheckConfig,
        metadata=doc(
            "Health checks: a backend starts `unknown` and becomes `healthy` or `unhealthy` "
            "after its first check."
        ),
    )
    routing: RoutingConfig = attrs.field(
        factory=RoutingConfig, metadata=doc("How a request picks its backend.")
    )
    logging: LoggingConfig = attrs.field(
        factory=LoggingConfig,
        metadata=doc("The log: its format, its level, the request log (docs/logging.md)."),
    )
    discovery: DiscoveryConfig = attrs.field(
        factory=DiscoveryConfig,
        metadata=doc(
            "Discovery by mDNS / DNS-SD: servers on the network that advertise themselves "
            "join the fleet, and leave it when they stop (docs/discovery.md)."
        ),
    )
    backends: tuple[BackendConfig, ...] = attrs.field(
        default=(),
        metadata=doc("One table per backend; none is allowed."),
    )
