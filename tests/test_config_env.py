"""``NEXUS_*`` variables and file keys that set nothing: warned about, with the closest name."""

from __future__ import annotations

from typing import Any

import pytest

from nexus.config import ENV_NOT_SETTINGS, Config, ConfigError, load_config, parse_config

#: (variable, the warning about it)
UNKNOWN_VARIABLES: list[tuple[str, str]] = [
    (
        "NEXUS_SERVER_LISTN",
        "environment: unknown variable NEXUS_SERVER_LISTN (ignored; did you mean "
        "NEXUS_SERVER_LISTEN?)",
    ),
    (
        "NEXUS_LISTEN",
        "environment: unknown variable NEXUS_LISTEN (ignored; did you mean NEXUS_SERVER_LISTEN?)",
    ),
    (
        "NEXUS_SERVER_API_KEY",
        "environment: unknown variable NEXUS_SERVER_API_KEY (ignored; did you mean "
        "NEXUS_SERVER_API_KEYS?)",
    ),
    (
        "NEXUS_HEALTHCHECK_ENABLED",
        "environment: unknown variable NEXUS_HEALTHCHECK_ENABLED (ignored; did you mean "
        "NEXUS_HEALTH_CHECK_ENABLED?)",
    ),
    (
        "NEXUS_ROUTING_STRATEGIE",
        "environment: unknown variable NEXUS_ROUTING_STRATEGIE (ignored; did you mean "
        "NEXUS_ROUTING_STRATEGY?)",
    ),
    (
        "NEXUS_LOG_LEVEL",
        "environment: unknown variable NEXUS_LOG_LEVEL (ignored; did you mean "
        "NEXUS_LOGGING_LEVEL?)",
    ),
    (
        "NEXUS_LOGGING_REQUEST",
        "environment: unknown variable NEXUS_LOGGING_REQUEST (ignored; did you mean "
        "NEXUS_LOGGING_REQUESTS?)",
    ),
    (
        # The contract names discovery.enabled's variable NEXUS_DISCOVERY.
        "NEXUS_DISCOVERY_ENABLED",
        "environment: unknown variable NEXUS_DISCOVERY_ENABLED (ignored; did you mean "
        "NEXUS_DISCOVERY?)",
    ),
    ("NEXUS_COLOUR", "environment: unknown variable NEXUS_COLOUR (ignored)"),
    ("NEXUS_", "environment: unknown variable NEXUS_ (ignored)"),
    (
        "NEXUS_ROUTING_WEIGHTS",
        "environment: NEXUS_ROUTING_WEIGHTS: routing.weights cannot be set from the environment, "
        "only in the file (ignored)",
    ),
    (
        "NEXUS_ROUTING_WEIGHTS_PRIORITY",
        "environment: NEXUS_ROUTING_WEIGHTS_PRIORITY: routing.weights.priority cannot be set "
        "from the environment, only in the file (ignored)",
    ),
    (
        "NEXUS_ROUTING_ALIASES",
        "environment: NEXUS_ROUTING_ALIASES: routing.aliases cannot be set from the environment, "
        "only in the file (ignored)",
    ),
    (
        "NEXUS_BACKENDS",
        "environment: NEXUS_BACKENDS: backends cannot be set from the environment, only in the "
        "file (ignored)",
    ),
]


@pytest.mark.parametrize(
    ("var", "warning"), UNKNOWN_VARIABLES, ids=[v for v, _ in UNKNOWN_VARIABLES]
)
def test_unknown_nexus_variable_is_warned(var: str, warning: str) -> None:
    assert parse_config({}, "nexus.toml", {var: "1"}) == (Config(), [warning])


#: Variables that other tools read, or settings still to come: never warned about.
NOT_SETTINGS = [
    "NEXUS_URL",
    "NEXUS_API_KEY",
    "NEXUS_TEST_LEAVING_CLIENTS",
    "NEXUS_SOAK_REQUESTS",
    "NEXUS_SOAK_SECONDS",
    "NEXUS_SOAK_REPORT",
    "NEXUS_BENCH_MODELS",
    "NEXUS_BENCH_STREAM",
]


@pytest.mark.parametrize("var", NOT_SETTINGS)
def test_variables_read_elsewhere_are_not_warned(var: str) -> None:
    assert parse_config({}, "nexus.toml", {var: "x"}) == (Config(), [])


def test_ignore_list_is_what_the_tests_cover() -> None:
    for name in ENV_NOT_SETTINGS:
        assert any(
            var == name or (name.endswith("_") and var.startswith(name)) for var in NOT_SETTINGS
        )


def test_other_variables_are_not_looked_at() -> None:
    environ = {"PATH": "/bin", "nexus_server_listen": "x", "XNEXUS_SERVER_LISTEN": "x"}
    assert parse_config({}, "nexus.toml", environ) == (Config(), [])


def test_variable_warnings_follow_the_file_s_in_name_order() -> None:
    environ = {"NEXUS_ZZZ": "1", "NEXUS_AAA": "1"}
    _, warnings = parse_config({"server": {"listn": "x"}}, "nexus.toml", environ)
    assert warnings == [
        "nexus.toml: unknown key 'server.listn' (ignored; did you mean 'server.listen'?)",
        "environment: unknown variable NEXUS_AAA (ignored)",
        "environment: unknown variable NEXUS_ZZZ (ignored)",
    ]


#: (file data, the warning about its unknown key)
UNKNOWN_KEYS: list[tuple[dict[str, Any], str]] = [
    ({"sever": {}}, "unknown key 'sever' (ignored; did you mean 'server'?)"),
    ({"backend": []}, "unknown key 'backend' (ignored; did you mean 'backends'?)"),
    ({"metrics": {}}, "unknown key 'metrics' (ignored)"),
    ({"log": {}}, "unknown key 'log' (ignored; did you mean 'logging'?)"),
    (
        {"logging": {"log_level": "debug"}},
        "unknown key 'logging.log_level' (ignored; did you mean 'logging.level'?)",
    ),
    (
        {"logging": {"preview": True}},
        "unknown key 'logging.preview' (ignored; did you mean 'logging.content_preview'?)",
    ),
    (
        {"server": {"request_timeout": 5}},
        "unknown key 'server.request_timeout' (ignored; did you mean "
        "'server.request_timeout_seconds'?)",
    ),
    (
        {"health_check": {"interval": 5}},
        "unknown key 'health_check.interval' (ignored; did you mean "
        "'health_check.interval_seconds'?)",
    ),
    (
        {"routing": {"weights": {"latencies": 20}}},
        "unknown key 'routing.weights.latencies' "
        "(ignored; did you mean 'routing.weights.latency'?)",
    ),
    (
        {"backends": [{"name": "a", "url": "http://x", "api-key-env": "K"}]},
        "unknown key 'backends[0].api-key-env' (ignored; did you mean 'backends[0].api_key_env'?)",
    ),
    (
        {"routing": {"strategy": "smart", "Strategy": "random"}},
        "unknown key 'routing.Strategy' (ignored; did you mean 'routing.strategy'?)",
    ),
]


@pytest.mark.parametrize(("data", "warning"), UNKNOWN_KEYS, ids=[w for _, w in UNKNOWN_KEYS])
def test_unknown_key_is_warned_with_the_closest_name(data: dict[str, Any], warning: str) -> None:
    _, warnings = parse_config(data, "nexus.toml", {})
    assert warnings == [f"nexus.toml: {warning}"]


@pytest.mark.parametrize(
    ("text", "workers"), [("4", 4), ("auto", "auto"), (" AUTO ", "auto"), ("1", 1)]
)
def test_workers_from_the_environment(text: str, workers: int | str) -> None:
    config, warnings = load_config(None, environ={"NEXUS_SERVER_WORKERS": text})
    assert config.server.workers == workers
    assert warnings == []


@pytest.mark.parametrize("text", ["0", "-2", "many", "1.5"])
def test_bad_workers_from_the_environment_name_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match=r"NEXUS_SERVER_WORKERS: .*positive integer or \"auto\""):
        load_config(None, environ={"NEXUS_SERVER_WORKERS": text})
