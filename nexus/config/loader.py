"""Loading the configuration: TOML file, ``NEXUS_*`` environment overrides, validation.

One mechanism checks everything: the validator walks the attrs fields and their types, so a
field added to a value class is validated, warned about and (if scalar) overridable from the
environment without new code here. What types cannot say (ranges, choices, URLs, sums, cycles)
lives in the two tables ``_RULES`` and ``_TABLE_CHECKS`` below.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType, UnionType
from typing import Any, NoReturn, Union, get_args, get_origin
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.cols import is_mapping
from cattrs.gen import make_mapping_structure_fn

from nexus.config.values import (
    BACKEND_TYPES,
    CAPABILITIES,
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

ENV_PREFIX = "NEXUS_"

#: ``NEXUS_*`` variables that are not settings but are read by something else, so they are never
#: warned about as unknown. A name ending in ``_`` stands for every name that starts with it.
#: Settings of sections still to come are listed until their section exists (then they are
#: settings, and their entry here can go).
ENV_NOT_SETTINGS: tuple[str, ...] = (
    "NEXUS_URL",  # the ``nexus`` command line client: the gateway to ask (contract 11)
    "NEXUS_API_KEY",  # the ``nexus`` command line client: its key (contract 11)
    "NEXUS_TEST_",  # test suite knobs (tests/faults, tox.ini passenv)
    "NEXUS_SOAK_",  # the soak test's size and report (tests/test_soak.py, tox.ini passenv)
    "NEXUS_BENCH_",  # the benchmark's wrk script (benchmarks/post.lua)
)

_ENV_TRUE = frozenset({"true", "1", "yes"})
_ENV_FALSE = frozenset({"false", "0", "no"})
_SCALARS: dict[type, tuple[str, str]] = {
    # type -> (how to name one, how to name several) in messages
    bool: ("a boolean (true or false)", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

_KeyPath = tuple[str | int, ...]
_Rule = Callable[[Any], Any]


class _Invalid(Exception):
    """A value's problem; whoever catches it knows where the value came from."""


def load_config(
    path: str | None, environ: Mapping[str, str] | None = None
) -> tuple[Config, list[str]]:
    """Read ``path`` (TOML; None for defaults only), apply ``NEXUS_*`` overrides, validate.

    Returns the configuration and warnings to show the operator (unknown keys and the like).
    Raises ConfigError, with a one-line message naming the file and key, on any problem.
    ``environ`` defaults to ``os.environ``.
    """
    if path is None:
        return parse_config({}, "defaults", environ)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {_one_line(str(e))}") from None
    return parse_config(data, path, environ)


def parse_config(
    data: Mapping[str, object], source: str, environ: Mapping[str, str] | None = None
) -> tuple[Config, list[str]]:
    """Validate already-parsed TOML ``data`` (from ``source``, used in messages) into a Config.

    Applies ``NEXUS_*`` overrides from ``environ`` (default ``os.environ``) on top of ``data``;
    returns the configuration and the warnings, or raises ConfigError.
    """
    env = os.environ if environ is None else environ
    merged, origins = _apply_environment(data, env)
    validator = _Validator(source, origins, env)
    clean = validator.table(Config, merged, ())
    warnings = validator.warnings + _environment_warnings(env)
    return _converter.structure(clean, Config), warnings


def read_keys_file(path: str) -> list[str]:
    """The keys in file ``path``, one per line; blank lines and ``#`` comments are skipped.

    Raises ConfigError saying what is wrong with the file (the caller adds which setting
    named it): unreadable, not UTF-8, or without a single key, which would silently leave
    the gateway open.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read {path!r}: not UTF-8 text (byte {e.start})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"{path!r} has no key (one per line; '#' starts a comment)")
    return keys


# ---- environment


@attrs.frozen
class _EnvSetting:
    """A setting that an environment variable can set."""

    section: str
    key: str
    type: Any
    #: The variable's values are added to the file's (a list), instead of replacing them.
    adds: bool


@functools.cache
def _env_fields() -> dict[str, _EnvSetting]:
    """``NEXUS_<SECTION>_<KEY>`` -> setting, for every scalar (or list) field of a section."""
    out: dict[str, _EnvSetting] = {}
    for section in _fields(Config):
        section_type: Any = section.type
        if not attrs.has(section_type):
            continue
        for field in _fields(section_type):
            tp = _env_type(field.type)
            if tp is not None:
                name = field.metadata.get("env") or env_name(section.name, field.name)
                adds = bool(field.metadata.get("env_adds"))
                out[name] = _EnvSetting(section.name, field.name, tp, adds)
    return out


def env_name(*path: str) -> str:
    """The environment variable named after a setting: ``NEXUS_SERVER_LISTEN``."""
    return (ENV_PREFIX + "_".join(path)).upper()


def _env_type(tp: Any) -> Any:
    """The type an environment variable can set for a field of type ``tp``, or None.

    Scalars, optional scalars, and tuples of strings (comma-separated in the variable).
    """
    if tp in _SCALARS or tp == tuple[str, ...]:
        return tp
    if get_origin(tp) in (UnionType, Union):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1 and inner[0] in _SCALARS:
            return inner[0]
        if inner and all(a in _SCALARS for a in inner):
            return str  # ``int | str``: the text as it is, the field's rule reads it
    return None


def _apply_environment(
    data: Mapping[str, object], environ: Mapping[str, str]
) -> tuple[dict[str, object], dict[_KeyPath, str]]:
    """``data`` with environment values laid over it, and which variable set which key."""
    merged = dict(data)
    origins: dict[_KeyPath, str] = {}
    for var, setting in _env_fields().items():
        if var not in environ:
            continue
        try:
            value = _from_env(environ[var], setting.type)
        except _Invalid as e:
            raise ConfigError(f"environment: {var}: {e}") from None
        section, key = setting.section, setting.key
        table = merged.get(section, {})
        # A section that is not a table is the file's error; validation reports it.
        if not isinstance(table, Mapping):
            continue
        if setting.adds and key in table:
            # The file's value still counts, so its errors are still the file's: its items come
            # first and keep their positions (the variable's items are never empty).
            current = table[key]
            if isinstance(current, list | tuple) and isinstance(value, list):
                merged[section] = {**table, key: [*current, *value]}
        else:
            merged[section] = {**table, key: value}
            origins[(section, key)] = var
    return merged, origins


def _from_env(raw: str, tp: type) -> object:
    """Convert an environment variable's text to ``tp``."""
    text = raw.strip()
    if tp is bool:
        if text.lower() in _ENV_TRUE:
            return True
        if text.lower() in _ENV_FALSE:
            return False
        raise _Invalid(f"expected true/false, 1/0 or yes/no, got {raw!r}")
    if tp == tuple[str, ...]:
        return [item.strip() for item in text.split(",") if item.strip()]
    if tp is int or tp is float:
        try:
            return tp(text)
        except ValueError:
            raise _Invalid(f"expected {_SCALARS[tp][0]}, got {raw!r}") from None
    return raw


def _environment_warnings(environ: Mapping[str, str]) -> list[str]:
    """Warnings for ``NEXUS_*`` variables that set nothing, in name order."""
    settable = _env_fields()
    file_only = _file_only_names()
    warnings = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in settable or _not_a_setting(var):
            continue
        if var in file_only:
            warnings.append(
                f"environment: {var}: {file_only[var]} cannot be set from the environment, "
                "only in the file (ignored)"
            )
        else:
            hint = _did_you_mean(var, settable, cutoff=0.75)
            warnings.append(f"environment: unknown variable {var} (ignored{hint})")
    return warnings


def _not_a_setting(var: str) -> bool:
    return any(
        var.startswith(name) if name.endswith("_") else var == name for name in ENV_NOT_SETTINGS
    )


@functools.cache
def _file_only_names() -> dict[str, str]:
    """Variable names that look like a setting no variable can set -> that setting's name."""
    out = {}
    # A setting whose variable has another name (``NEXUS_DISCOVERY``) is not file-only.
    settable = {(s.section, s.key) for s in _env_fields().values()}
    for path in _setting_paths(Config, ()):
        var = env_name(*path)
        if var not in _env_fields() and path not in settable:
            out[var] = ".".join(path)
    return out


def _setting_paths(cls: type, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Every table and key under attrs class ``cls``, as paths of names."""
    for field in _fields(cls):
        path = (*prefix, field.name)
        yield path
        item = _table_class(field.type)
        if item is not None:
            yield from _setting_paths(item, path)


def _table_class(tp: Any) -> Any:
    """The attrs class of a table field (``X``) or an array of tables (``tuple[X, ...]``)."""
    if attrs.has(tp):
        return tp
    if get_origin(tp) is tuple and attrs.has(get_args(tp)[0]):
        return get_args(tp)[0]
    return None


def _did_you_mean(name: str, candidates: Iterable[str], cutoff: float) -> str:
    """``"; did you mean X?"`` for the closest of ``candidates`` to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]}?" if close else ""


# ---- rules: what a value's type does not say (each also says itself, for the docs)


@attrs.frozen
class _AtLeast:
    low: int

    def __call__(self, value: float) -> float:
        if value < self.low:
            raise _Invalid(f"must be at least {self.low}, got {_num(value)}")
        return value

    def __str__(self) -> str:
        return f"≥ {self.low}"


@attrs.frozen
class _WorkerCount:
    """``workers``: a positive integer, or ``"auto"`` (one per CPU)."""

    def __call__(self, value: int | str) -> int | str:
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                return "auto"
            if not text.isdigit():
                raise _Invalid(f'must be a positive integer or "auto", got {value!r}')
            value = int(text)
        if value < 1:
            raise _Invalid(f'must be a positive integer or "auto", got {value}')
        return value

    def __str__(self) -> str:
        return 'a positive integer or "auto"'


def workers_setting(value: int | str) -> int | str:
    """``[server] workers`` given elsewhere (``--workers``), checked as the file's is.

    ValueError with the same words as a bad value in the file or the environment.
    """
    try:
        return _WorkerCount()(value)
    except _Invalid as e:
        raise ValueError(str(e)) from None


@attrs.frozen
class _GreaterThan:
    low: int

    def __call__(self, value: float) -> float:
        if value <= self.low:
            raise _Invalid(f"must be greater than {self.low}, got {_num(value)}")
        return value

    def __str__(self) -> str:
        return f"> {self.low}"


@attrs.frozen
class _OneOf:
    choices: tuple[str, ...]
    what: str

    def __call__(self, value: str) -> str:
        if value not in self.choices:
            expected = ", ".join(self.choices)
            raise _Invalid(f"unknown {self.what} {value!r} (expected one of {expected})")
        return value

    def __str__(self) -> str:
        return f"one of {', '.join(self.choices)}"


@attrs.frozen
class _HttpUrl:
    def __call__(self, value: str) -> str:
        """A backend base URL, without its trailing ``/`` (paths are appended to it)."""
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError:
            ok = False
        if not ok or any(c.isspace() for c in value):
            raise _Invalid(f"must be an http:// or https:// URL with a host, got {value!r}")
        if parts.query or parts.fragment:
            raise _Invalid(f"must be a base URL without ?query or #fragment, got {value!r}")
        return value.rstrip("/")

    def __str__(self) -> str:
        return "an http:// or https:// URL"


@attrs.frozen
class _ServiceType:
    def __call__(self, value: str) -> str:
        """A DNS-SD service type as python-zeroconf takes it: ``_name._tcp.local.``."""
        full = value if value.endswith(".") else value + "."
        labels = full.split(".")
        name = labels[0][1:]
        ok = (
            len(labels) == 4
            and labels[0].startswith("_")
            and labels[1] in ("_tcp", "_udp")
            and labels[2:] == ["local", ""]
            and 1 <= len(name) <= 15
            and re.fullmatch(r"[A-Za-z0-9-]+", name) is not None
            and re.search(r"[A-Za-z]", name) is not None
            and not name.startswith("-")
            and not name.endswith("-")
            and "--" not in name
        )
        if not ok:
            raise _Invalid(f"must be a DNS-SD service type like _llm._tcp.local., got {value!r}")
        return full

    def __str__(self) -> str:
        return "a DNS-SD service type"


@attrs.frozen
class _IpAddress:
    def __call__(self, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise _Invalid(f"must be an IP address like 127.0.0.1, got {value!r}") from None
        return value

    def __str__(self) -> str:
        return "an IP address"


#: Checks on single values, by (class, field); for a container field, on each item.
_RULES: dict[tuple[type, str], _Rule] = {
    (ServerConfig, "request_timeout_seconds"): _GreaterThan(0),
    (ServerConfig, "max_body_bytes"): _AtLeast(1),
    (ServerConfig, "max_concurrent_requests"): _AtLeast(0),
    (ServerConfig, "max_header_bytes"): _AtLeast(256),
    (ServerConfig, "max_headers"): _AtLeast(1),
    (ServerConfig, "idle_timeout_seconds"): _GreaterThan(0),
    (ServerConfig, "shutdown_grace_seconds"): _AtLeast(0),
    (ServerConfig, "workers"): _WorkerCount(),
    (HealthCheckConfig, "interval_seconds"): _GreaterThan(0),
    (HealthCheckConfig, "timeout_seconds"): _GreaterThan(0),
    (HealthCheckConfig, "failure_threshold"): _AtLeast(1),
    (HealthCheckConfig, "recovery_threshold"): _AtLeast(1),
    (RoutingConfig, "strategy"): _OneOf(STRATEGIES, "strategy"),
    (RoutingConfig, "max_retries"): _AtLeast(0),
    **{(Weights, f.name): _AtLeast(0) for f in attrs.fields(Weights)},
    (LoggingConfig, "format"): _OneOf(LOG_FORMATS, "log format"),
    (LoggingConfig, "level"): _OneOf(LOG_LEVELS, "log level"),
    (DiscoveryConfig, "service_types"): _ServiceType(),
    (DiscoveryConfig, "grace_period_seconds"): _AtLeast(0),
    (DiscoveryConfig, "interfaces"): _IpAddress(),
    (BackendConfig, "url"): _HttpUrl(),
    (BackendConfig, "type"): _OneOf(BACKEND_TYPES, "backend type"),
    (BackendConfig, "priority"): _AtLeast(0),
    (BackendConfig, "model_capabilities"): _OneOf(CAPABILITIES, "capability"),
}


# ---- checks across the keys of one table (run on the validated values)


def _check_server(v: _Validator, values: dict[str, Any], path: _KeyPath) -> None:
    keys_file = values.get("api_keys_file")
    if keys_file is not None:
        try:
            read_keys_file(keys_file)
        except ConfigError as e:
            v.fail((*path, "api_keys_file"), str(e))


def _check_weights(v: _Validator, values: dict[str, Any], path: _KeyPath) -> None:
    weights: dict[str, Any] = {f.name: values.get(f.name, f.default) for f in attrs.fields(Weights)}
    total = sum(weights.values())
    if not math.isclose(total, 100, abs_tol=1e-6):
        terms = " + ".join(f"{name} {_num(w)}" for name, w in weights.items())
        v.fail(path, f"weights must sum to 100, got {_num(total)} ({terms})")


def _check_routing(v: _Validator, values: dict[str, Any], path: _KeyPath) -> None:
    aliases: dict[str, str] = values.get("aliases", {})
    where = (*path, "aliases")
    for alias, target in aliases.items():
        if alias == target:
            v.fail((*where, alias), f"alias {alias!r} points to itself")
    chains = {alias: _alias_chain(aliases, alias) for alias in aliases}
    # Every cycle first: it is the more fundamental mistake, and also makes a long chain.
    for chain in chains.values():
        if chain[-1] in chain[:-1]:
            cycle = chain[chain.index(chain[-1]) :]
            v.fail(where, f"alias cycle {' -> '.join(cycle)}")
    for alias, chain in chains.items():
        if len(chain) - 1 > MAX_ALIAS_HOPS:
            v.fail(
                (*where, alias),
                f"alias chain longer than {MAX_ALIAS_HOPS} hops: {' -> '.join(chain)}",
            )


def _alias_chain(aliases: Mapping[str, str], start: str) -> list[str]:
    """``start`` and the names it resolves through; ends at a non-alias or at a repeat."""
    chain = [start]
    while chain[-1] in aliases:
        chain.append(aliases[chain[-1]])
        if chain[-1] in chain[:-1]:
            break
    return chain


def _check_backend(v: _Validator, values: dict[str, Any], path: _KeyPath) -> None:
    var = values.get("api_key_env")
    if var is not None and var not in v.environ:
        v.warn((*path, "api_key_env"), f"environment variable {var!r} is not set")


def _check_discovery(v: _Validator, values: dict[str, Any], path: _KeyPath) -> None:
    if values.get("enabled", True) and values.get("service_types") == []:
        v.fail(
            (*path, "service_types"),
            "must name at least one service type (or set discovery.enabled = false)",
        )


def _check_config(v: _Validator, values: dict[str, Any], path: _KeyPath) -> None:
    seen: set[str] = set()
    for i, backend in enumerate(values.get("backends", [])):
        if backend["name"] in seen:
            v.fail((*path, "backends", i, "name"), f"duplicate backend name {backend['name']!r}")
        seen.add(backend["name"])


_TABLE_CHECKS: dict[type, Callable[[_Validator, dict[str, Any], _KeyPath], None]] = {
    ServerConfig: _check_server,
    Weights: _check_weights,
    RoutingConfig: _check_routing,
    BackendConfig: _check_backend,
    DiscoveryConfig: _check_discovery,
    Config: _check_config,
}


# ---- the validator


class _Validator:
    """Checks raw data against the attrs classes; returns plain values for cattrs.

    ``origins`` says which keys came from which environment variable, so their errors name
    the variable instead of the file.
    """

    def __init__(
        self, source: str, origins: Mapping[_KeyPath, str], environ: Mapping[str, str]
    ) -> None:
        self.source = source
        self.origins = origins
        self.environ = environ
        self.warnings: list[str] = []

    def where(self, path: _KeyPath) -> str:
        # An item of a list that a variable set (``NEXUS_DISCOVERY_INTERFACES``) is its too.
        for end in range(len(path), 0, -1):
            if path[:end] in self.origins:
                return f"environment: {self.origins[path[:end]]}"
        return f"{self.source}: {_dotted(path)}" if path else self.source

    def fail(self, path: _KeyPath, message: str) -> NoReturn:
        raise ConfigError(f"{self.where(path)}: {message}")

    def warn(self, path: _KeyPath, message: str) -> None:
        self.warnings.append(f"{self.where(path)}: {message}")

    def unknown(self, path: _KeyPath, known: Mapping[str, Any]) -> None:
        """Warn about the unknown key at ``path``, with the closest known one if any."""
        key = path[-1]
        close = difflib.get_close_matches(str(key), list(known), n=1)
        hint = f"; did you mean '{_dotted((*path[:-1], close[0]))}'?" if close else ""
        self.warnings.append(f"{self.source}: unknown key '{_dotted(path)}' (ignored{hint})")

    def table(self, cls: type, raw: object, path: _KeyPath) -> dict[str, Any]:
        """Validate a table for attrs class ``cls``: known keys checked, unknown ones warned."""
        if not isinstance(raw, Mapping):
            self.fail(path, f"expected a table, got {_describe(raw)}")
        fields = {f.name: f for f in _fields(cls)}
        values: dict[str, Any] = {}
        # In the file's order, so that warnings read in the order the operator wrote the keys.
        for key, item in raw.items():
            field = fields.get(key)
            if field is None:
                self.unknown((*path, key), fields)
            else:
                values[key] = self.value(item, field.type, (*path, key), _RULES.get((cls, key)))
        for name, field in fields.items():
            tp: Any = field.type
            default: Any = field.default
            if name in values:
                continue
            if default is attrs.NOTHING:
                self.fail((*path, name), "required key missing")
            if attrs.has(tp):
                values[name] = self.table(tp, {}, (*path, name))
            elif isinstance(default, attrs.Factory):  # type: ignore[arg-type]  # typed as a function
                # Structured like given values, so every table is read-only, not just some.
                values[name] = default.factory()
        check = _TABLE_CHECKS.get(cls)
        if check is not None:
            check(self, values, path)
        return values

    def value(self, raw: object, tp: Any, path: _KeyPath, rule: _Rule | None = None) -> Any:
        """Validate ``raw`` against type ``tp``; ``rule`` applies to each scalar in it."""
        if attrs.has(tp):
            return self.table(tp, raw, path)
        origin, args = get_origin(tp), get_args(tp)
        if origin in (UnionType, Union):  # ``X | None``: TOML has no null, code may pass None
            if raw is None:
                return None
            choices = [a for a in args if a is not type(None)]
            if len(choices) > 1:  # ``int | str``: the rule decides (``workers``)
                if isinstance(raw, bool) or not isinstance(raw, tuple(choices)):
                    wanted = rule or _expected(choices[0])
                    self.fail(path, f"expected {wanted}, got {_describe(raw)}")
                return self.scalar(raw, type(raw), path, rule)
            (tp,) = choices
            return self.value(raw, tp, path, rule)
        if origin in (tuple, frozenset):
            if not isinstance(raw, list | tuple):
                self.fail(path, f"expected {_expected(tp)}, got {_describe(raw)}")
            return [self.value(item, args[0], (*path, i), rule) for i, item in enumerate(raw)]
        if origin is Mapping:
            if not isinstance(raw, Mapping):
                self.fail(path, f"expected {_expected(tp)}, got {_describe(raw)}")
            table = {}
            for key, item in raw.items():
                at = (*path, key)
                table[self.value(key, args[0], at)] = self.value(item, args[1], at, rule)
            return table
        return self.scalar(raw, tp, path, rule)

    def scalar(self, raw: object, tp: type, path: _KeyPath, rule: _Rule | None) -> Any:
        # bool is an int subclass in Python, but ``enabled = 1`` or ``priority = true`` is a typo.
        ok = isinstance(raw, tp) and (tp is bool or not isinstance(raw, bool))
        if tp is float:
            ok = isinstance(raw, int | float) and not isinstance(raw, bool)
        if not ok:
            self.fail(path, f"expected {_expected(tp)}, got {_describe(raw)}")
        if isinstance(raw, float) and not math.isfinite(raw):
            self.fail(path, f"must be a finite number, got {raw!r}")
        if isinstance(raw, str) and not raw.strip():
            self.fail(path, "must not be empty")
        if rule is not None:
            try:
                return rule(raw)
            except _Invalid as e:
                self.fail(path, str(e))
        return raw


# ---- helpers


@functools.cache
def _fields(cls: type) -> tuple[attrs.Attribute[Any], ...]:
    """``cls``'s attrs fields with their annotations resolved to real types."""
    return tuple(attrs.fields(attrs.resolve_types(cls)))


def _expected(tp: Any) -> str:
    """How a message names type ``tp``: "an integer", "an array of strings"..."""
    if attrs.has(tp) or get_origin(tp) is Mapping:
        return "a table"
    if get_origin(tp) in (tuple, frozenset):
        item = get_args(tp)[0]
        return f"an array of {'tables' if attrs.has(item) else _SCALARS[item][1]}"
    return _SCALARS[tp][0]


def _describe(value: object) -> str:
    """A value as the operator wrote it, in TOML words: ``string 'abc'``, ``integer 3``."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"string {text!r}"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return f"{type(value).__name__} {value.isoformat()}"
    return "null" if value is None else type(value).__name__


def _dotted(path: _KeyPath) -> str:
    """``("backends", 0, "url")`` -> ``backends[0].url``; keys quoted as TOML would need."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{toml_key(part)}" if out else toml_key(part)
    return out


def toml_key(key: str) -> str:
    """``key`` as TOML writes it: bare when it can be, else quoted."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _num(value: float) -> str:
    """A number for a message: ``30`` rather than ``30.0``."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _make_converter() -> cattrs.Converter:
    """The converter from validated plain values to the value classes."""
    converter = cattrs.Converter(forbid_extra_keys=True)

    # The config is frozen; its tables should not be mutable behind its back either.
    def read_only_mapping(tp: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
        structure = make_mapping_structure_fn(tp, conv)
        return lambda value, _: MappingProxyType(structure(value, tp))

    converter.register_structure_hook_factory(is_mapping, read_only_mapping)
    # ``workers``: already checked (an int, or "auto"), kept as it is.
    converter.register_structure_hook(int | str, lambda value, _: value)
    return converter


_converter = _make_converter()
