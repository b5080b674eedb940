"""Configuration (contract section 2): the values, their loader, and their reference.

The classes in ``values`` are the whole configuration as the rest of the gateway sees it:
frozen ``attrs`` values, built once at start-up by ``load_config`` (TOML file, then
``NEXUS_*`` environment overrides, then validation; ``loader``). ``reference`` lists every
setting for the docs and ``nexus config init``; ``listen`` warns about an exposed listener.
"""

from __future__ import annotations

from nexus.config.listen import listen_warnings
from nexus.config.loader import (
    ENV_NOT_SETTINGS,
    load_config,
    parse_config,
    read_keys_file,
    workers_setting,
)
from nexus.config.reference import Section, Setting, render_toml, sections, settings
from nexus.config.values import (
    BACKEND_TYPES,
    CAPABILITIES,
    DEFAULT_LISTEN,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_ALIAS_HOPS,
    STRATEGIES,
    BackendConfig,
    Config,
    ConfigError,
    DiscoveryConfig,
    HealthCheckConfig,
    LoggingConfig,
    RoutingConfig,
    ServerConfig,
    Weights,
)

__all__ = [
    "BACKEND_TYPES",
    "CAPABILITIES",
    "DEFAULT_LISTEN",
    "ENV_NOT_SETTINGS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_ALIAS_HOPS",
    "STRATEGIES",
    "BackendConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "HealthCheckConfig",
    "LoggingConfig",
    "RoutingConfig",
    "Section",
    "ServerConfig",
    "Setting",
    "Weights",
    "listen_warnings",
    "load_config",
    "parse_config",
    "read_keys_file",
    "render_toml",
    "sections",
    "settings",
    "workers_setting",
]
