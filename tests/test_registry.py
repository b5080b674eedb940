"""The backend registry: a fleet that grows and shrinks, and which models are available."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus.config import BackendConfig
from nexus.registry import (
    HEALTHY,
    SOURCE_CONFIG,
    SOURCE_MDNS,
    UNHEALTHY,
    UNKNOWN,
    BackendRegistry,
    format_timestamp,
)


def cfg(name: str, *models: str, type: str = "generic") -> BackendConfig:
    return BackendConfig(name=name, url=f"http://{name}.invalid:8000", type=type, models=models)


def names(registry: BackendRegistry) -> list[str]:
    return [b.name for b in registry.backends]


def test_a_new_backend_starts_unknown_from_the_config() -> None:
    backend = BackendRegistry([cfg("a", "m", type="ollama")]).get("a")
    assert (backend.status, backend.source, backend.type) == (UNKNOWN, SOURCE_CONFIG, "ollama")
    assert (backend.last_check, backend.last_error) == (None, None)
    assert backend.models == {"m"}


def test_add_keeps_the_fleet_sorted_and_indexed() -> None:
    registry = BackendRegistry([cfg("b", "m"), cfg("d", "m")])
    added = registry.add(cfg("c", "m", "new:7b"), source=SOURCE_MDNS)
    assert names(registry) == ["b", "c", "d"]
    assert isinstance(registry.backends, tuple)
    assert registry.get("c") is added and "c" in registry
    assert (added.status, added.source) == (UNKNOWN, SOURCE_MDNS)
    assert [b.name for b in registry.by_model["m"]] == ["b", "c", "d"]
    assert registry.by_model["new:7b"] == (added,)
    assert registry.is_known_model("new:7b")
    assert registry.counts() == {"total": 3, HEALTHY: 0, UNHEALTHY: 0, UNKNOWN: 3}


def test_add_refuses_a_taken_name_and_an_unknown_source() -> None:
    registry = BackendRegistry([cfg("a", "m")])
    before = registry.get("a")
    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.add(cfg("a", "other"))
    with pytest.raises(ValueError, match="unknown backend source 'zeroconf'"):
        registry.add(cfg("b", "m"), source="zeroconf")
    assert names(registry) == ["a"] and registry.get("a") is before
    assert not registry.is_known_model("other")


def test_remove_forgets_the_backend_and_its_models() -> None:
    registry = BackendRegistry(
        [cfg("a", "shared", "only-a"), cfg("b", "shared")],
        aliases={"gpt-4": "only-a"},
    )
    for backend in registry.backends:
        backend.status = HEALTHY
    removed = registry.remove("a")
    assert removed.name == "a"
    assert names(registry) == ["b"] and "a" not in registry
    assert [b.name for b in registry.by_model["shared"]] == ["b"]
    assert "only-a" not in registry.by_model
    assert registry.available_models() == {"shared": ["b"]}
    assert registry.available_aliases() == {}
    # An alias still names it, so requests for it are a 503, not a 404.
    assert registry.is_known_model("only-a")
    with pytest.raises(KeyError):
        registry.get("a")
    with pytest.raises(KeyError):
        registry.remove("a")


def test_removed_then_added_again_is_a_fresh_backend() -> None:
    registry = BackendRegistry([cfg("a", "m")])
    old = registry.get("a")
    old.status, old.pending = HEALTHY, 3
    registry.remove("a")
    new = registry.add(cfg("a", "m"))
    assert new is not old and (new.status, new.pending) == (UNKNOWN, 0)


def test_available_means_listed_by_a_healthy_backend_now() -> None:
    registry = BackendRegistry(
        [cfg("up", "llama3:8b", "shared"), cfg("down", "secret:1b", "shared"), cfg("new", "x")],
        aliases={"gpt-4": "llama3:8b", "gpt-5": "secret:1b", "fast": "gpt-4"},
    )
    registry.get("up").status = HEALTHY
    registry.get("down").status = UNHEALTHY
    assert registry.available_models() == {"llama3:8b": ["up"], "shared": ["up"]}
    assert sorted(registry.available_model_names()) == ["llama3:8b", "shared"]
    assert registry.is_available("shared") and not registry.is_available("secret:1b")
    assert not registry.is_available("x")  # unknown status: not yet
    assert registry.available_aliases() == {"gpt-4": "llama3:8b", "fast": "llama3:8b"}
    registry.get("down").status = HEALTHY
    assert registry.available_models()["shared"] == ["down", "up"]
    assert registry.available_aliases()["gpt-5"] == "secret:1b"


def test_a_model_of_an_alias_name_is_not_listed_as_an_alias() -> None:
    registry = BackendRegistry([cfg("a", "gpt-4"), cfg("b", "llama3")], aliases={"gpt-4": "llama3"})
    for backend in registry.backends:
        backend.status = HEALTHY
    assert registry.resolve_alias("gpt-4") == "gpt-4"
    assert registry.available_aliases() == {}
    registry.get("a").status = UNHEALTHY
    assert registry.resolve_alias("gpt-4") == "llama3"
    assert registry.available_aliases() == {"gpt-4": "llama3"}


fleets = st.lists(
    st.tuples(
        st.sampled_from([HEALTHY, UNHEALTHY, UNKNOWN]),
        st.frozensets(st.sampled_from(["m0", "m1", "m2", "m3"]), max_size=3),
    ),
    max_size=5,
)


@given(fleets)
def test_every_view_of_available_models_agrees(fleet: list[tuple[str, frozenset[str]]]) -> None:
    registry = BackendRegistry([cfg(f"b{i}", *sorted(ms)) for i, (_, ms) in enumerate(fleet)])
    for backend, (status, _) in zip(registry.backends, fleet, strict=True):
        backend.status = status
    healthy_ids = {
        m: [f"b{i}" for i, (s, ms) in enumerate(fleet) if s == HEALTHY and m in ms]
        for m in ("m0", "m1", "m2", "m3")
    }
    expected = {m: ids for m, ids in healthy_ids.items() if ids}
    assert registry.available_models() == expected
    assert sorted(registry.available_model_names()) == sorted(expected)
    assert {m for m in ("m0", "m1", "m2", "m3") if registry.is_available(m)} == set(expected)


def test_timestamps_are_rfc3339_utc() -> None:
    assert format_timestamp(None) is None
    assert format_timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
