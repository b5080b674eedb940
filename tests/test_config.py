"""Tests for nexus.config: loading, validation, environment overrides."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus.config import (
    MAX_ALIAS_HOPS,
    BackendConfig,
    Config,
    ConfigError,
    DiscoveryConfig,
    HealthCheckConfig,
    LoggingConfig,
    RoutingConfig,
    ServerConfig,
    Weights,
    listen_warnings,
    load_config,
    parse_config,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLE = DOCS / "nexus.example.toml"

#: Stands for a keys file that exists (``keys_file`` fixture) in the table below.
KEYS_FILE = "<keys file>"

ENV_VARS = {
    "NEXUS_SERVER_LISTEN": ("tcp:9000", ("server", "listen"), "tcp:9000"),
    "NEXUS_SERVER_REQUEST_TIMEOUT_SECONDS": ("12.5", ("server", "request_timeout_seconds"), 12.5),
    "NEXUS_SERVER_MAX_BODY_BYTES": ("2048", ("server", "max_body_bytes"), 2048),
    "NEXUS_HEALTH_CHECK_ENABLED": ("no", ("health_check", "enabled"), False),
    "NEXUS_HEALTH_CHECK_INTERVAL_SECONDS": ("7", ("health_check", "interval_seconds"), 7.0),
    "NEXUS_HEALTH_CHECK_TIMEOUT_SECONDS": ("0.5", ("health_check", "timeout_seconds"), 0.5),
    "NEXUS_HEALTH_CHECK_FAILURE_THRESHOLD": ("5", ("health_check", "failure_threshold"), 5),
    "NEXUS_HEALTH_CHECK_RECOVERY_THRESHOLD": ("4", ("health_check", "recovery_threshold"), 4),
    "NEXUS_ROUTING_STRATEGY": ("random", ("routing", "strategy"), "random"),
    "NEXUS_ROUTING_MAX_RETRIES": ("0", ("routing", "max_retries"), 0),
    "NEXUS_SERVER_MAX_CONCURRENT_REQUESTS": ("8", ("server", "max_concurrent_requests"), 8),
    "NEXUS_SERVER_MAX_HEADER_BYTES": ("4096", ("server", "max_header_bytes"), 4096),
    "NEXUS_SERVER_MAX_HEADERS": ("20", ("server", "max_headers"), 20),
    "NEXUS_SERVER_IDLE_TIMEOUT_SECONDS": ("9", ("server", "idle_timeout_seconds"), 9.0),
    "NEXUS_SERVER_SHUTDOWN_GRACE_SECONDS": ("3", ("server", "shutdown_grace_seconds"), 3.0),
    "NEXUS_SERVER_API_KEYS": (" k1, k2 ,", ("server", "api_keys"), ("k1", "k2")),
    "NEXUS_SERVER_API_KEYS_FILE": (KEYS_FILE, ("server", "api_keys_file"), KEYS_FILE),
    "NEXUS_SERVER_METRICS_TOKEN": ("tok", ("server", "metrics_token"), "tok"),
    "NEXUS_SERVER_DASHBOARD": ("false", ("server", "dashboard"), False),
    "NEXUS_LOGGING_FORMAT": ("json", ("logging", "format"), "json"),
    "NEXUS_LOGGING_LEVEL": ("debug", ("logging", "level"), "debug"),
    "NEXUS_LOGGING_REQUESTS": ("false", ("logging", "requests"), False),
    "NEXUS_LOGGING_CONTENT_PREVIEW": ("yes", ("logging", "content_preview"), True),
    "NEXUS_DISCOVERY": ("false", ("discovery", "enabled"), False),
    "NEXUS_DISCOVERY_SERVICE_TYPES": (
        "_llm._tcp.local., _vllm._tcp.local",
        ("discovery", "service_types"),
        ("_llm._tcp.local.", "_vllm._tcp.local."),
    ),
    "NEXUS_DISCOVERY_GRACE_PERIOD_SECONDS": ("5", ("discovery", "grace_period_seconds"), 5.0),
    "NEXUS_DISCOVERY_INTERFACES": (
        "127.0.0.1,::1", ("discovery", "interfaces"), ("127.0.0.1", "::1")
    ),
}


def parse(data: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Config:
    """Parse ``data`` as if read from ``nexus.toml``, with no warnings expected."""
    config, warnings = parse_config(data, "nexus.toml", environ or {})
    assert warnings == []
    return config


def backend(**fields: object) -> dict[str, object]:
    return {"name": "a", "url": "http://127.0.0.1:1", **fields}


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "api-keys"
    path.write_text("sk-from-file\n")
    return str(path)


def env_case(var: str, keys_file: str) -> tuple[str, tuple[str, str], object]:
    """``ENV_VARS[var]`` with the keys file placeholder made real."""
    text, where, expected = ENV_VARS[var]
    if text == KEYS_FILE:
        return keys_file, where, keys_file
    return text, where, expected


# ---- defaults and the example file


def test_no_file_gives_defaults() -> None:
    assert load_config(None, {}) == (Config(), [])


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "nexus.toml"
    path.write_text("")
    assert load_config(str(path), {}) == (Config(), [])


def test_example_file_loads_as_documented() -> None:
    # As it is, in an environment without any of its variables: no error, no warning.
    config, warnings = load_config(str(EXAMPLE), {})
    assert warnings == []
    assert listen_warnings(config.server) == []
    assert config == Config(
        server=ServerConfig(listen="tcp:8000:interface=127.0.0.1"),
        health_check=HealthCheckConfig(),
        routing=RoutingConfig(
            strategy="smart",
            max_retries=2,
            weights=Weights(50, 30, 20),
            aliases={"gpt-4": "llama3:70b", "gpt-4o": "gpt-4", "gpt-3.5-turbo": "mistral:7b"},
            fallbacks={"llama3:70b": ("mistral:7b", "llama3:8b")},
        ),
        logging=LoggingConfig(format="text", level="info", requests=True, content_preview=False),
        backends=(
            BackendConfig(
                name="ollama-local",
                url="http://127.0.0.1:11434",
                type="ollama",
                priority=10,
                models=("llama3:70b", "llama3:8b"),
                model_capabilities={
                    "llama3:70b": frozenset({"tools", "json_mode"}),
                    "llama3:8b": frozenset(),
                },
            ),
            BackendConfig(
                name="vllm-gpu",
                url="http://10.0.0.5:8000",  # trailing / dropped
                type="vllm",
                priority=50,
                models=("mistral:7b",),
            ),
        ),
    )


def test_example_file_starts_without_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``twistd -n nexus --config docs/nexus.example.toml`` as it is, up to listening."""
    from twisted.internet.testing import MemoryReactorClock

    from nexus.service import makeService

    for var in [v for v in os.environ if v.startswith("NEXUS_")]:
        monkeypatch.delenv(var)
    service = makeService({"config": str(EXAMPLE)}, reactor=MemoryReactorClock())
    assert service.gateway.config.server.listen == "tcp:8000:interface=127.0.0.1"
    assert "warning" not in capsys.readouterr().out


def test_example_file_round_trips_through_plain_data() -> None:
    config, _ = load_config(str(EXAMPLE), {})
    plain = json.loads(json.dumps(cattrs.Converter().unstructure(config), default=sorted))
    assert parse_config(plain, "plain", {}) == (config, [])


def _field_paths(cls: type, prefix: str) -> set[str]:
    out = set()
    for field in attrs.fields(attrs.resolve_types(cls)):
        tp: Any = field.type
        if attrs.has(tp):
            out |= _field_paths(tp, f"{prefix}{field.name}.")
        else:
            out.add(f"{prefix}{field.name}")
    return out


#: A commented-out key of the example file: ``# api_keys_file = "..."``.
COMMENTED_KEY = re.compile(r"^# ([A-Za-z_]+ = )", re.M)


def test_example_file_shows_every_key() -> None:
    # Keys commented out (they need a file or a secret) count as shown.
    data = tomllib.loads(COMMENTED_KEY.sub(r"\1", EXAMPLE.read_text()))
    shown = set()
    for section in ("server", "health_check", "routing", "logging", "discovery"):
        for key, value in data[section].items():
            keys = value if key == "weights" else {}
            shown |= {f"{section}.{key}"} | {f"{section}.{key}.{k}" for k in keys}
    for entry in data["backends"]:
        shown |= {f"backends.{key}" for key in entry}
    expected = _field_paths(Config, "") - {"backends"}
    expected |= _field_paths(BackendConfig, "backends.")
    assert expected <= shown


def test_docs_name_every_environment_variable() -> None:
    text = (DOCS / "configuration.md").read_text()
    for var in ENV_VARS:
        assert var in text
        assert var in EXAMPLE.read_text()


# ---- values that are accepted


def test_values_are_normalised() -> None:
    config = parse(
        {
            "server": {"request_timeout_seconds": 10},
            "routing": {"weights": {"priority": 40, "load": 40.5, "latency": 19.5}},
            "backends": [backend(url="https://example.com/v1/")],
        }
    )
    assert config.server.request_timeout_seconds == 10.0
    assert isinstance(config.server.request_timeout_seconds, float)
    assert config.routing.weights == Weights(40, 40.5, 19.5)
    assert config.backends[0].url == "https://example.com/v1"


def test_discovery_settings() -> None:
    config = parse(
        {
            "discovery": {
                "service_types": ["_llm._tcp.local", "_Ollama-2._tcp.local."],
                "grace_period_seconds": 0,
                "interfaces": ["127.0.0.1", "::1", "fe80::1%2"],
            }
        }
    )
    assert config.discovery == DiscoveryConfig(
        enabled=True,
        service_types=("_llm._tcp.local.", "_Ollama-2._tcp.local."),  # the final dot added
        grace_period_seconds=0.0,
        interfaces=("127.0.0.1", "::1", "fe80::1%2"),
    )
    # Nothing to browse is fine when nothing is browsed.
    off = parse({"discovery": {"enabled": False, "service_types": []}})
    assert off.discovery == DiscoveryConfig(enabled=False, service_types=())
    assert Config().discovery == DiscoveryConfig(
        enabled=True,
        service_types=("_ollama._tcp.local.", "_llm._tcp.local."),
        grace_period_seconds=60.0,
        interfaces=(),
    )


def test_weights_sum_allows_float_rounding() -> None:
    weights = {"priority": 33.3, "load": 33.3, "latency": 33.4}
    assert parse({"routing": {"weights": weights}}).routing.weights == Weights(33.3, 33.3, 33.4)


def test_no_backends_is_allowed() -> None:
    assert parse({"backends": []}).backends == ()


def test_config_tables_are_read_only() -> None:
    config = parse({"routing": {"aliases": {"a": "b"}}})
    with pytest.raises(TypeError):
        config.routing.aliases["c"] = "d"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.routing.fallbacks["c"] = ("d",)  # type: ignore[index]


def test_alias_chain_of_three_hops_is_allowed() -> None:
    aliases = {"a": "b", "b": "c", "c": "d"}
    assert parse({"routing": {"aliases": aliases}}).routing.aliases == aliases


# ---- errors: one line, naming the file and the key

TOO_LONG = {"a": "b", "b": "c", "c": "d", "d": "e"}

INVALID: list[tuple[dict[str, Any], str]] = [
    # types
    ({"server": 5}, "server: expected a table, got integer 5"),
    ({"server": {"listen": 8000}}, "server.listen: expected a string, got integer 8000"),
    ({"server": {"listen": ""}}, "server.listen: must not be empty"),
    (
        {"server": {"request_timeout_seconds": "abc"}},
        "server.request_timeout_seconds: expected a number, got string 'abc'",
    ),
    (
        {"server": {"request_timeout_seconds": True}},
        "server.request_timeout_seconds: expected a number, got boolean true",
    ),
    (
        {"server": {"request_timeout_seconds": float("inf")}},
        "server.request_timeout_seconds: must be a finite number, got inf",
    ),
    (
        {"server": {"max_body_bytes": 1.5}},
        "server.max_body_bytes: expected an integer, got float 1.5",
    ),
    (
        {"health_check": {"enabled": 1}},
        "health_check.enabled: expected a boolean (true or false), got integer 1",
    ),
    (
        {"health_check": {"failure_threshold": True}},
        "health_check.failure_threshold: expected an integer, got boolean true",
    ),
    # ranges
    (
        {"server": {"request_timeout_seconds": 0}},
        "server.request_timeout_seconds: must be greater than 0, got 0",
    ),
    ({"server": {"max_body_bytes": 0}}, "server.max_body_bytes: must be at least 1, got 0"),
    (
        {"health_check": {"interval_seconds": -1}},
        "health_check.interval_seconds: must be greater than 0, got -1",
    ),
    (
        {"health_check": {"timeout_seconds": 0}},
        "health_check.timeout_seconds: must be greater than 0, got 0",
    ),
    (
        {"health_check": {"failure_threshold": 0}},
        "health_check.failure_threshold: must be at least 1, got 0",
    ),
    (
        {"health_check": {"recovery_threshold": 0}},
        "health_check.recovery_threshold: must be at least 1, got 0",
    ),
    ({"routing": {"max_retries": -1}}, "routing.max_retries: must be at least 0, got -1"),
    ({"routing": {"max_retries": 1.0}}, "routing.max_retries: expected an integer, got float 1.0"),
    # routing
    (
        {"routing": {"strategy": "fastest"}},
        "routing.strategy: unknown strategy 'fastest' "
        "(expected one of smart, round_robin, priority_only, random)",
    ),
    (
        {"routing": {"weights": {"priority": 80}}},
        "routing.weights: weights must sum to 100, got 130 (priority 80 + load 30 + latency 20)",
    ),
    (
        {"routing": {"weights": {"priority": 120, "load": -20, "latency": 0}}},
        "routing.weights.load: must be at least 0, got -20",
    ),
    (
        {"routing": {"weights": {"priority": "high"}}},
        "routing.weights.priority: expected a number, got string 'high'",
    ),
    ({"routing": {"aliases": {"a": "a"}}}, "routing.aliases.a: alias 'a' points to itself"),
    ({"routing": {"aliases": {"a": "b", "b": "a"}}}, "routing.aliases: alias cycle a -> b -> a"),
    (
        {"routing": {"aliases": {"x": "a", "a": "b", "b": "c", "c": "a"}}},
        "routing.aliases: alias cycle a -> b -> c -> a",
    ),
    (
        {"routing": {"aliases": TOO_LONG}},
        "routing.aliases.a: alias chain longer than 3 hops: a -> b -> c -> d -> e",
    ),
    (
        {"routing": {"aliases": {"gpt-4": 4}}},
        "routing.aliases.gpt-4: expected a string, got integer 4",
    ),
    ({"routing": {"aliases": {"": "b"}}}, 'routing.aliases."": must not be empty'),
    ({"routing": {"aliases": ["a"]}}, "routing.aliases: expected a table, got an array"),
    (
        {"routing": {"fallbacks": {"llama3:70b": "mistral:7b"}}},
        "routing.fallbacks.\"llama3:70b\": expected an array of strings, got string 'mistral:7b'",
    ),
    (
        {"routing": {"fallbacks": {"llama3:70b": ["mistral:7b", ""]}}},
        'routing.fallbacks."llama3:70b"[1]: must not be empty',
    ),
    # logging
    ({"logging": "json"}, "logging: expected a table, got string 'json'"),
    (
        {"logging": {"format": "xml"}},
        "logging.format: unknown log format 'xml' (expected one of text, json)",
    ),
    (
        {"logging": {"level": "warning"}},
        "logging.level: unknown log level 'warning' "
        "(expected one of debug, info, warn, error, critical)",
    ),
    (
        {"logging": {"level": "INFO"}},
        "logging.level: unknown log level 'INFO' "
        "(expected one of debug, info, warn, error, critical)",
    ),
    ({"logging": {"level": ""}}, "logging.level: must not be empty"),
    (
        {"logging": {"requests": "no"}},
        "logging.requests: expected a boolean (true or false), got string 'no'",
    ),
    (
        {"logging": {"content_preview": 1}},
        "logging.content_preview: expected a boolean (true or false), got integer 1",
    ),
    # backends
    ({"backends": {"name": "a"}}, "backends: expected an array of tables, got a table"),
    ({"backends": ["a"]}, "backends[0]: expected a table, got string 'a'"),
    ({"backends": [{"url": "http://x"}]}, "backends[0].name: required key missing"),
    ({"backends": [{"name": "a"}]}, "backends[0].url: required key missing"),
    ({"backends": [backend(name="")]}, "backends[0].name: must not be empty"),
    ({"backends": [backend(name=1)]}, "backends[0].name: expected a string, got integer 1"),
    (
        {"backends": [backend(), backend(url="http://other")]},
        "backends[1].name: duplicate backend name 'a'",
    ),
    (
        {"backends": [backend(url="ftp://x")]},
        "backends[0].url: must be an http:// or https:// URL with a host, got 'ftp://x'",
    ),
    (
        {"backends": [backend(url="localhost:11434")]},
        "backends[0].url: must be an http:// or https:// URL with a host, got 'localhost:11434'",
    ),
    (
        {"backends": [backend(url="http://")]},
        "backends[0].url: must be an http:// or https:// URL with a host, got 'http://'",
    ),
    (
        {"backends": [backend(url="http://x:port")]},
        "backends[0].url: must be an http:// or https:// URL with a host, got 'http://x:port'",
    ),
    (
        {"backends": [backend(url="http://x/?a=1")]},
        "backends[0].url: must be a base URL without ?query or #fragment, got 'http://x/?a=1'",
    ),
    (
        {"backends": [backend(type="tgi")]},
        "backends[0].type: unknown backend type 'tgi' "
        "(expected one of ollama, vllm, llamacpp, lmstudio, exo, openai, generic)",
    ),
    ({"backends": [backend(priority=-1)]}, "backends[0].priority: must be at least 0, got -1"),
    (
        {"backends": [backend(priority="high")]},
        "backends[0].priority: expected an integer, got string 'high'",
    ),
    ({"backends": [backend(api_key_env="")]}, "backends[0].api_key_env: must not be empty"),
    (
        {"backends": [backend(models="llama3")]},
        "backends[0].models: expected an array of strings, got string 'llama3'",
    ),
    ({"backends": [backend(models=["a", ""])]}, "backends[0].models[1]: must not be empty"),
    (
        {"backends": [backend(model_capabilities={"llava:13b": ["vision", "audio"]})]},
        "backends[0].model_capabilities.\"llava:13b\"[1]: unknown capability 'audio' "
        "(expected one of vision, tools, json_mode)",
    ),
    (
        {"backends": [backend(model_capabilities={"m": "vision"})]},
        "backends[0].model_capabilities.m: expected an array of strings, got string 'vision'",
    ),
    # discovery
    (
        {"discovery": {"enabled": "yes"}},
        "discovery.enabled: expected a boolean (true or false), got string 'yes'",
    ),
    (
        {"discovery": {"service_types": "_llm._tcp.local."}},
        "discovery.service_types: expected an array of strings, got string '_llm._tcp.local.'",
    ),
    *(
        (
            {"discovery": {"service_types": ["_llm._tcp.local.", bad]}},
            "discovery.service_types[1]: must be a DNS-SD service type like _llm._tcp.local., "
            f"got {bad!r}",
        )
        for bad in [
            "_llm._tcp",
            "llm._tcp.local.",
            "_llm._sctp.local.",
            "_llm._tcp.example.com.",
            "_-llm._tcp.local.",
            "_l--m._tcp.local.",
            "_1234._tcp.local.",
            "_a-name-too-long-x._tcp.local.",
            "_ll m._tcp.local.",
        ]
    ),
    (
        {"discovery": {"service_types": []}},
        "discovery.service_types: must name at least one service type (or set "
        "discovery.enabled = false)",
    ),
    (
        {"discovery": {"grace_period_seconds": -1}},
        "discovery.grace_period_seconds: must be at least 0, got -1",
    ),
    (
        {"discovery": {"interfaces": ["127.0.0.1", "eth0"]}},
        "discovery.interfaces[1]: must be an IP address like 127.0.0.1, got 'eth0'",
    ),
    ({"discovery": {"interfaces": [""]}}, "discovery.interfaces[0]: must not be empty"),
]


@pytest.mark.parametrize(("data", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_configuration_names_file_and_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "nexus.toml", {})
    assert str(info.value) == f"nexus.toml: {message}"


def test_errors_are_one_line_without_chained_causes(tmp_path: Path) -> None:
    path = tmp_path / "nexus.toml"
    path.write_text("[server]\nlisten = \n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in message
    assert "\n" not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nexus.toml"
    path.write_text('[server]\nlisten = "tcp:1"\nlisten = "tcp:2"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: invalid TOML: "):
        load_config(str(path), {})


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "nexus.toml"
    path.write_bytes(b'[server]\nlisten = "\xff"\n')
    with pytest.raises(ConfigError, match=r"nexus.toml: invalid TOML: not UTF-8 text"):
        load_config(str(path), {})


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(info.value) == f"{path}: no such file"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), {})  # a directory
    assert str(info.value).startswith(f"{tmp_path}: cannot read the file: ")


def test_file_errors_name_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[routing]\nstrategy = "fastest"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: routing.strategy: "):
        load_config(str(path), {})


# ---- warnings


def test_unknown_keys_are_warned_and_ignored(tmp_path: Path) -> None:
    path = tmp_path / "nexus.toml"
    path.write_text(
        "[server]\nlisten = 'tcp:1'\nlistn = 'tcp:2'\n"
        "[routing.weights]\nspeed = 1\n"
        "[[backends]]\nname = 'a'\nurl = 'http://x'\nmodles = ['m']\n"
        "[metrics]\nenabled = true\n"
    )
    config, warnings = load_config(str(path), {})
    assert config.server.listen == "tcp:1"
    assert warnings == [
        f"{path}: unknown key 'server.listn' (ignored; did you mean 'server.listen'?)",
        f"{path}: unknown key 'routing.weights.speed' (ignored)",
        f"{path}: unknown key 'backends[0].modles' (ignored; did you mean 'backends[0].models'?)",
        f"{path}: unknown key 'metrics' (ignored)",
    ]


def test_unset_api_key_variable_is_warned() -> None:
    data = {"backends": [backend(api_key_env="A_KEY")]}
    config, warnings = parse_config(data, "nexus.toml", {})
    assert config.backends[0].api_key_env == "A_KEY"
    assert warnings == [
        "nexus.toml: backends[0].api_key_env: environment variable 'A_KEY' is not set"
    ]
    assert parse_config(data, "nexus.toml", {"A_KEY": "k"})[1] == []


# ---- environment


@pytest.mark.parametrize("var", list(ENV_VARS))
def test_environment_overrides_file(var: str, keys_file: str) -> None:
    text, (section, key), expected = env_case(var, keys_file)
    file_value = {"routing": {"strategy": "priority_only"}}.get(section, {})
    data = {"server": {"listen": "tcp:1", "max_body_bytes": 99}, "routing": file_value}
    config = parse(data, {var: text})
    assert getattr(getattr(config, section), key) == expected
    if var != "NEXUS_SERVER_LISTEN":
        assert config.server.listen == "tcp:1"  # the file still counts where env is silent


def test_environment_applies_without_a_file(keys_file: str) -> None:
    cases = [env_case(var, keys_file) for var in ENV_VARS]
    config, warnings = load_config(
        None, dict(zip(ENV_VARS, (text for text, _, _ in cases), strict=True))
    )
    assert warnings == []
    for _, (section, key), expected in cases:
        assert getattr(getattr(config, section), key) == expected


def test_file_overrides_defaults_and_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "nexus.toml"
    path.write_text("[routing]\nmax_retries = 5\nstrategy = 'random'\n")
    config, _ = load_config(str(path), {"NEXUS_ROUTING_MAX_RETRIES": "1"})
    assert config.routing == RoutingConfig(strategy="random", max_retries=1)
    assert config.server == ServerConfig()


def test_environment_replaces_a_bad_file_value() -> None:
    config = parse({"server": {"listen": 8000}}, {"NEXUS_SERVER_LISTEN": "tcp:8000"})
    assert config.server.listen == "tcp:8000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("1", True),
        ("YES", True),
        (" yes ", True),
        ("false", False),
        ("0", False),
        ("No", False),
    ],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    config = parse({}, {"NEXUS_HEALTH_CHECK_ENABLED": text})
    assert config.health_check.enabled is expected


ENV_INVALID = [
    ("NEXUS_SERVER_MAX_BODY_BYTES", "lots", "expected an integer, got 'lots'"),
    ("NEXUS_SERVER_MAX_BODY_BYTES", "1.5", "expected an integer, got '1.5'"),
    ("NEXUS_SERVER_MAX_BODY_BYTES", "0", "must be at least 1, got 0"),
    ("NEXUS_SERVER_REQUEST_TIMEOUT_SECONDS", "soon", "expected a number, got 'soon'"),
    ("NEXUS_SERVER_REQUEST_TIMEOUT_SECONDS", "-3", "must be greater than 0, got -3"),
    ("NEXUS_SERVER_REQUEST_TIMEOUT_SECONDS", "nan", "must be a finite number, got nan"),
    ("NEXUS_HEALTH_CHECK_ENABLED", "maybe", "expected true/false, 1/0 or yes/no, got 'maybe'"),
    ("NEXUS_HEALTH_CHECK_FAILURE_THRESHOLD", "0", "must be at least 1, got 0"),
    (
        "NEXUS_ROUTING_STRATEGY",
        "fastest",
        "unknown strategy 'fastest' (expected one of smart, round_robin, priority_only, random)",
    ),
    ("NEXUS_SERVER_LISTEN", "", "must not be empty"),
    ("NEXUS_LOGGING_FORMAT", "xml", "unknown log format 'xml' (expected one of text, json)"),
    (
        "NEXUS_LOGGING_LEVEL",
        "verbose",
        "unknown log level 'verbose' (expected one of debug, info, warn, error, critical)",
    ),
    ("NEXUS_LOGGING_REQUESTS", "off", "expected true/false, 1/0 or yes/no, got 'off'"),
    ("NEXUS_DISCOVERY", "off", "expected true/false, 1/0 or yes/no, got 'off'"),
    ("NEXUS_DISCOVERY_INTERFACES", "::1,lo", "must be an IP address like 127.0.0.1, got 'lo'"),
    ("NEXUS_DISCOVERY_GRACE_PERIOD_SECONDS", "-1", "must be at least 0, got -1"),
]


@pytest.mark.parametrize(("var", "text", "message"), ENV_INVALID)
def test_bad_environment_value_names_the_variable(var: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"listen": "tcp:1"}}, "nexus.toml", {var: text})
    assert str(info.value) == f"environment: {var}: {message}"


def test_unknown_nexus_variables_are_warned_and_ignored() -> None:
    environ = {"NEXUS_SERVER_LISTN": "x", "NEXUS_TEST_FLAG": "1", "NEXUS_ROUTING_WEIGHTS": "x"}
    assert parse_config({}, "nexus.toml", environ) == (
        Config(),
        [
            "environment: NEXUS_ROUTING_WEIGHTS: routing.weights cannot be set from the "
            "environment, only in the file (ignored)",
            "environment: unknown variable NEXUS_SERVER_LISTN "
            "(ignored; did you mean NEXUS_SERVER_LISTEN?)",
        ],
    )


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_ROUTING_MAX_RETRIES", "7")
    assert load_config(None)[0].routing.max_retries == 7


# ---- aliases: property


NAMES = ["a", "b", "c", "d", "e", "f"]


def _oracle_rejects(aliases: dict[str, str]) -> bool:
    """Whether some alias loops or needs more than MAX_ALIAS_HOPS hops (independent walk)."""
    for start in aliases:
        name, hops = start, 0
        while name in aliases:
            name, hops = aliases[name], hops + 1
            if hops > MAX_ALIAS_HOPS:
                return True  # a loop also ends here, since there are finitely many names
    return False


@given(st.dictionaries(st.sampled_from(NAMES), st.sampled_from(NAMES), max_size=len(NAMES)))
def test_accepted_aliases_resolve_within_three_hops(aliases: dict[str, str]) -> None:
    try:
        config = parse({"routing": {"aliases": aliases}})
    except ConfigError as e:
        assert _oracle_rejects(aliases)
        assert str(e).startswith("nexus.toml: routing.aliases")
        return
    assert not _oracle_rejects(aliases)
    resolved = config.routing.aliases
    for start in resolved:
        seen = [start]
        while seen[-1] in resolved:
            seen.append(resolved[seen[-1]])
        assert len(seen) - 1 <= MAX_ALIAS_HOPS
        assert len(set(seen)) == len(seen)
