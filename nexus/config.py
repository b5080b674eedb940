"""Configuration values (contract section 2).

The classes here are the whole configuration as the rest of the gateway
sees it: frozen ``attrs`` values, built once at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

STRATEGIES = ("smart", "round_robin", "priority_only", "random")
BACKEND_TYPES = ("ollama", "vllm", "llamacpp", "lmstudio", "exo", "openai", "generic")
CAPABILITIES = ("vision", "tools", "json_mode")


class ConfigError(Exception):
    """A configuration that must not start: the message names the file and the key."""


@attrs.frozen
class ServerConfig:
    """``[server]``."""

    listen: str = "tcp:8000"
    request_timeout_seconds: float = 300.0
    max_body_bytes: int = 10 * 1024 * 1024


@attrs.frozen
class HealthCheckConfig:
    """``[health_check]``."""

    enabled: bool = True
    interval_seconds: float = 30.0
    timeout_seconds: float = 5.0
    failure_threshold: int = 3
    recovery_threshold: int = 2


@attrs.frozen
class Weights:
    """``[routing.weights]``: the smart strategy's weights, summing to 100."""

    priority: float = 50.0
    load: float = 30.0
    latency: float = 20.0


@attrs.frozen
class RoutingConfig:
    """``[routing]``."""

    strategy: str = "smart"
    max_retries: int = 2
    weights: Weights = attrs.Factory(Weights)
    aliases: Mapping[str, str] = attrs.Factory(dict)
    fallbacks: Mapping[str, tuple[str, ...]] = attrs.Factory(dict)


@attrs.frozen
class BackendConfig:
    """One ``[[backends]]`` entry.

    ``model_capabilities`` maps a model name to what it supports (a subset of
    ``CAPABILITIES``); a model not in the map is assumed to support everything.
    """

    name: str
    url: str
    type: str = "generic"
    priority: int = 50
    api_key_env: str | None = None
    models: tuple[str, ...] = ()
    model_capabilities: Mapping[str, frozenset[str]] = attrs.Factory(dict)


@attrs.frozen
class Config:
    """The whole configuration."""

    server: ServerConfig = attrs.Factory(ServerConfig)
    health_check: HealthCheckConfig = attrs.Factory(HealthCheckConfig)
    routing: RoutingConfig = attrs.Factory(RoutingConfig)
    backends: tuple[BackendConfig, ...] = ()
