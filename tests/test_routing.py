"""Tests for nexus.routing: alias resolution, fallbacks, strategies, capability needs."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nexus.config import (
    CAPABILITIES,
    MAX_ALIAS_HOPS,
    STRATEGIES,
    BackendConfig,
    RoutingConfig,
    Weights,
)
from nexus.errors import InvalidRequest, ModelNotFound, NoHealthyBackend
from nexus.registry import HEALTHY, UNHEALTHY, UNKNOWN, Backend, BackendRegistry
from nexus.routing import (
    MAX_LISTED_MODELS,
    RouteDecision,
    Router,
    request_needs,
    resolve_alias,
    score,
    unserved_targets,
)

# -- helpers ------------------------------------------------------------------------------------


def cfg(
    name: str,
    models: Iterable[str],
    priority: int = 50,
    caps: Mapping[str, Iterable[str]] | None = None,
) -> BackendConfig:
    """A backend config with just what routing looks at."""
    return BackendConfig(
        name=name,
        url=f"http://{name}.invalid:8000",
        priority=priority,
        models=tuple(models),
        model_capabilities={m: frozenset(c) for m, c in (caps or {}).items()},
    )


def fleet(
    *configs: BackendConfig,
    aliases: Mapping[str, str] | None = None,
    fallbacks: Mapping[str, Sequence[str]] | None = None,
    status: str = HEALTHY,
) -> BackendRegistry:
    """A registry whose backends all start in ``status``."""
    registry = BackendRegistry(configs, aliases, fallbacks)
    for backend in registry.backends:
        backend.status = status
    return registry


def router(
    registry: BackendRegistry, strategy: str = "smart", weights: Weights | None = None
) -> Router:
    """A router with a seeded rng (the registry supplies aliases and fallbacks)."""
    config = RoutingConfig(strategy=strategy, weights=weights or Weights())
    return Router(registry, config, rng=random.Random(1234))


def names(decision: RouteDecision) -> list[str]:
    return [b.name for b in decision.candidates]


# -- request_needs ------------------------------------------------------------------------------


def test_needs_none_for_plain_chat() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert request_needs(body) == frozenset()


def test_needs_vision_from_image_part() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ]
    }
    assert request_needs(body) == {"vision"}


def test_needs_all_three() -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "response_format": {"type": "json_object"},
    }
    assert request_needs(body) == {"vision", "tools", "json_mode"}


@pytest.mark.parametrize(
    "body",
    [
        {"tools": []},
        {"tools": {"a": 1}},
        {"tools": None},
        {"response_format": {"type": "text"}},
        {"response_format": "json_object"},
        {"response_format": {"type": ["json_object"]}},
        {"messages": [{"content": [{"type": "text", "text": "image_url"}]}]},
        {"messages": [{"content": {"type": "image_url"}}]},
        {"messages": {"content": [{"type": "image_url"}]}},
        {"messages": ["image_url", None, 3, [{"type": "image_url"}]]},
        {"messages": [{"content": ["image_url", None, {"type": {"image_url": 1}}]}]},
    ],
)
def test_needs_ignores_shapes_that_ask_for_nothing(body: dict[str, object]) -> None:
    assert request_needs(body) == frozenset()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=25,
)
# Values that look almost like requests, so the inner branches get exercised.
parts = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text"]) | json_values})
messages = st.lists(
    st.fixed_dictionaries({"content": st.lists(parts | json_values, max_size=3) | json_values})
    | json_values,
    max_size=3,
)
near_bodies = st.fixed_dictionaries(
    {},
    optional={
        "messages": messages | json_values,
        "tools": json_values,
        "response_format": st.fixed_dictionaries({"type": st.just("json_object") | json_values})
        | json_values,
    },
)


@given(json_values | near_bodies)
def test_needs_never_raises(body: object) -> None:
    assert request_needs(body) <= frozenset(CAPABILITIES)


# -- alias resolution ---------------------------------------------------------------------------


def test_alias_resolves_chain() -> None:
    registry = fleet(cfg("a", ["llama3:70b"]), aliases={"x": "y", "y": "z", "z": "llama3:70b"})
    assert resolve_alias("x", registry) == "llama3:70b"
    assert router(registry).resolve_alias("x") == "llama3:70b"
    assert resolve_alias("llama3:70b", registry) == "llama3:70b"


def test_alias_stops_after_three_hops_and_on_cycles() -> None:
    # Config validation rejects both; the router must still terminate.
    chain = {"m0": "m1", "m1": "m2", "m2": "m3", "m3": "m4", "m4": "m5"}
    assert resolve_alias("m0", fleet(aliases=chain)) == "m3"
    assert resolve_alias("a", fleet(aliases={"a": "b", "b": "a"})) == "b"
    assert resolve_alias("a", fleet(aliases={"a": "a"})) == "a"


def test_direct_model_wins_over_alias_of_same_name() -> None:
    registry = fleet(
        cfg("direct", ["gpt-4"]),
        cfg("target", ["llama3:70b"]),
        aliases={"gpt-4": "llama3:70b"},
    )
    decision = router(registry).decide("gpt-4")
    assert decision.model == "gpt-4"
    assert names(decision) == ["direct"]


def test_alias_used_when_direct_backend_is_unhealthy() -> None:
    registry = fleet(
        cfg("direct", ["gpt-4"]),
        cfg("target", ["llama3:70b"]),
        aliases={"gpt-4": "llama3:70b"},
    )
    registry.get("direct").status = UNHEALTHY
    decision = router(registry).decide("gpt-4")
    assert (decision.requested_model, decision.model) == ("gpt-4", "llama3:70b")
    assert names(decision) == ["target"]
    assert decision.fallback_from is None


def test_direct_wins_at_an_intermediate_hop() -> None:
    registry = fleet(cfg("mid", ["b"]), cfg("end", ["c"]), aliases={"a": "b", "b": "c"})
    assert router(registry).decide("a").model == "b"


alias_names = st.sampled_from([f"n{i}" for i in range(6)])


@given(
    aliases=st.dictionaries(alias_names, alias_names, max_size=6),
    served=st.frozensets(alias_names),
    start=alias_names,
)
def test_alias_resolution_terminates_within_three_hops(
    aliases: dict[str, str], served: frozenset[str], start: str
) -> None:
    registry = fleet(cfg("b", sorted(served)), aliases=aliases)
    reachable = [start]
    for _ in range(MAX_ALIAS_HOPS):
        reachable.append(aliases.get(reachable[-1], reachable[-1]))
    result = resolve_alias(start, registry)
    assert result in reachable
    # It only stops on an alias that is not served when the hops ran out.
    if result in aliases and result not in served:
        assert result == reachable[MAX_ALIAS_HOPS]


# -- errors: 404, 503, 400 ----------------------------------------------------------------------


def test_unknown_model_is_404_listing_available_models() -> None:
    registry = fleet(
        cfg("a", ["llama3:8b", "mistral:7b"]),
        cfg("down", ["secret:1b"]),
        aliases={"gpt-4": "llama3:8b", "gpt-5": "secret:1b"},
    )
    registry.get("down").status = UNHEALTHY
    with pytest.raises(ModelNotFound) as info:
        router(registry).decide("nope")
    err = info.value
    assert err.status == 404
    assert err.param == "model"
    assert err.to_dict()["error"]["code"] == "model_not_found"  # type: ignore[index]
    assert "'nope'" in err.message
    assert "gpt-4, llama3:8b, mistral:7b" in err.message
    assert "secret" not in err.message and "gpt-5" not in err.message


def test_404_list_is_truncated() -> None:
    models = [f"model-{i:02d}" for i in range(MAX_LISTED_MODELS + 7)]
    with pytest.raises(ModelNotFound) as info:
        router(fleet(cfg("a", models))).decide("x" * 10_000)
    message = info.value.message
    assert "model-19" in message and "model-20" not in message
    assert message.endswith("… and 7 more")
    assert len(message) < 1000


def test_404_with_nothing_available() -> None:
    with pytest.raises(ModelNotFound, match="no models are available"):
        router(fleet(cfg("a", ["m"]), status=UNKNOWN)).decide("other")


@pytest.mark.parametrize("status", [UNHEALTHY, UNKNOWN])
def test_known_model_without_healthy_backend_is_503(status: str) -> None:
    registry = fleet(cfg("a", ["m"]), cfg("b", ["m"]), status=status)
    with pytest.raises(NoHealthyBackend) as info:
        router(registry).decide("m")
    assert info.value.status == 503
    assert "'m'" in info.value.message


def test_alias_and_fallback_names_count_as_known() -> None:
    registry = fleet(
        cfg("a", ["m"]),
        aliases={"gpt-4": "ghost"},
        fallbacks={"m": ["standby"]},
        status=UNHEALTHY,
    )
    r = router(registry)
    for name in ["gpt-4", "ghost", "m", "standby"]:
        with pytest.raises(NoHealthyBackend):
            r.decide(name)
    with pytest.raises(NoHealthyBackend, match="alias of 'ghost'"):
        r.decide("gpt-4")
    with pytest.raises(NoHealthyBackend, match="or its fallbacks"):
        r.decide("m")


def test_missing_capability_is_400_naming_it() -> None:
    registry = fleet(cfg("a", ["llava"], caps={"llava": ["tools"]}))
    with pytest.raises(InvalidRequest) as info:
        router(registry).decide("llava", frozenset({"vision"}))
    assert info.value.status == 400
    assert info.value.message == "No backend serving 'llava' supports vision"
    assert info.value.param == "messages"


def test_needs_met_separately_but_not_together() -> None:
    registry = fleet(
        cfg("a", ["m"], caps={"m": ["vision"]}),
        cfg("b", ["m"], caps={"m": ["tools"]}),
    )
    with pytest.raises(InvalidRequest, match="tools and vision together"):
        router(registry).decide("m", frozenset({"vision", "tools"}))


def test_capability_filter_keeps_capable_backends_only() -> None:
    registry = fleet(
        cfg("a", ["m"], caps={"m": ["tools"]}),
        cfg("b", ["m"], caps={"m": ["tools", "vision"]}),
        cfg("c", ["m"]),  # no entry: assumed to support everything
    )
    assert names(router(registry, "priority_only").decide("m", frozenset({"vision"}))) == [
        "b",
        "c",
    ]
    assert names(router(registry, "priority_only").decide("m")) == ["a", "b", "c"]


def test_unhealthy_capable_backend_still_gives_503_not_400() -> None:
    registry = fleet(cfg("a", ["m"], caps={"m": ["vision"]}))
    registry.get("a").status = UNHEALTHY
    with pytest.raises(NoHealthyBackend):
        router(registry).decide("m", frozenset({"vision"}))


# -- fallbacks ----------------------------------------------------------------------------------


def test_fallback_serves_when_primary_has_no_healthy_backend() -> None:
    registry = fleet(
        cfg("alpha", ["llama3:70b"]),
        cfg("beta", ["qwen2:7b"], priority=10),
        cfg("gamma", ["qwen2:7b"], priority=20),
        fallbacks={"llama3:70b": ["mistral:7b", "qwen2:7b"]},
    )
    registry.get("alpha").status = UNHEALTHY
    decision = router(registry, "priority_only").decide("llama3:70b")
    assert decision == RouteDecision(
        requested_model="llama3:70b",
        model="qwen2:7b",
        candidates=(registry.get("beta"), registry.get("gamma")),
        fallback_from="llama3:70b",
        route_reason="fallback:qwen2:7b:priority_only:beta",
    )


def test_fallback_keyed_by_resolved_model() -> None:
    registry = fleet(
        cfg("a", ["big"]),
        cfg("b", ["small"]),
        aliases={"gpt-4": "big"},
        fallbacks={"big": ["small"]},
    )
    registry.get("a").status = UNHEALTHY
    decision = router(registry).decide("gpt-4")
    assert (decision.model, decision.fallback_from) == ("small", "big")


def test_fallbacks_are_one_level() -> None:
    registry = fleet(
        cfg("a", ["m"]),
        cfg("b", ["f1"]),
        cfg("c", ["f2"]),
        fallbacks={"m": ["f1"], "f1": ["f2"]},
    )
    registry.get("a").status = UNHEALTHY
    registry.get("b").status = UNHEALTHY
    with pytest.raises(NoHealthyBackend):
        router(registry).decide("m")


def test_fallback_that_supports_the_need_serves() -> None:
    registry = fleet(
        cfg("a", ["text"], caps={"text": ["tools"]}),
        cfg("b", ["llava"], caps={"llava": ["vision"]}),
        fallbacks={"text": ["llava"]},
    )
    decision = router(registry).decide("text", frozenset({"vision"}))
    assert (decision.model, names(decision)) == ("llava", ["b"])
    assert router(registry).decide("text").model == "text"


# -- strategies ---------------------------------------------------------------------------------


def test_smart_score_and_route_reason() -> None:
    registry = fleet(cfg("alpha", ["m"], priority=50), cfg("beta", ["m"], priority=25))
    alpha, beta = registry.get("alpha"), registry.get("beta")
    alpha.pending, alpha.avg_latency_ms = 3, 120.0
    weights = Weights(50, 30, 20)
    assert score(beta, weights) == 87.5  # (50*75 + 30*100 + 20*100) / 100
    assert score(alpha, weights) == pytest.approx((50 * 50 + 30 * 97 + 20 * 88) / 100)
    decision = router(registry).decide("m")
    assert names(decision) == ["beta", "alpha"]
    assert decision.route_reason == "smart:beta:87.5"


def test_smart_clamps_and_treats_no_latency_as_fast() -> None:
    registry = fleet(cfg("slow", ["m"], priority=500), cfg("new", ["m"], priority=500))
    slow, new = registry.get("slow"), registry.get("new")
    slow.pending, slow.avg_latency_ms = 10_000, 1e9
    assert score(slow, Weights()) == 0.0
    assert score(new, Weights()) == 50.0  # only load and latency count: (30*100 + 20*100)/100
    decision = router(registry).decide("m")
    assert names(decision) == ["new", "slow"]
    assert decision.route_reason == "smart:new:50.0"


def test_smart_weights_change_the_winner() -> None:
    registry = fleet(cfg("near", ["m"], priority=10), cfg("idle", ["m"], priority=70))
    registry.get("near").pending = 90
    assert names(router(registry).decide("m"))[0] == "near"
    by_load = router(registry, weights=Weights(priority=10, load=80, latency=10))
    assert names(by_load.decide("m"))[0] == "idle"


def test_smart_ties_go_to_lowest_name() -> None:
    registry = fleet(*(cfg(n, ["m"]) for n in ["delta", "alpha", "charlie", "bravo"]))
    assert names(router(registry).decide("m")) == ["alpha", "bravo", "charlie", "delta"]


def test_round_robin_rotates_per_model() -> None:
    registry = fleet(cfg("a", ["m", "n"]), cfg("b", ["m", "n"]), cfg("c", ["m"]))
    r = router(registry, "round_robin")
    assert names(r.decide("m")) == ["a", "b", "c"]
    assert names(r.decide("m")) == ["b", "c", "a"]
    assert names(r.decide("n")) == ["a", "b"]
    decision = r.decide("m")
    assert names(decision) == ["c", "a", "b"]
    assert decision.route_reason == "round_robin:c"
    assert names(r.decide("m")) == ["a", "b", "c"]
    assert names(r.decide("n")) == ["b", "a"]


def test_round_robin_skips_unhealthy_backends() -> None:
    registry = fleet(cfg("a", ["m"]), cfg("b", ["m"]), cfg("c", ["m"]))
    registry.get("b").status = UNHEALTHY
    r = router(registry, "round_robin")
    firsts = [r.decide("m").candidates[0].name for _ in range(4)]
    assert firsts == ["a", "c", "a", "c"]


def test_priority_only_orders_by_priority_then_name() -> None:
    registry = fleet(
        cfg("d", ["m"], priority=5),
        cfg("c", ["m"], priority=1),
        cfg("b", ["m"], priority=5),
        cfg("a", ["m"], priority=9),
    )
    registry.get("c").pending = 99  # load does not matter here
    decision = router(registry, "priority_only").decide("m")
    assert names(decision) == ["c", "b", "d", "a"]
    assert decision.route_reason == "priority_only:c"


def test_random_uses_the_injected_rng() -> None:
    registry = fleet(*(cfg(f"b{i}", ["m"]) for i in range(8)))
    first = Router(registry, RoutingConfig(strategy="random"), rng=random.Random(7))
    second = Router(registry, RoutingConfig(strategy="random"), rng=random.Random(7))
    orders = [names(first.decide("m")) for _ in range(20)]
    assert orders == [names(second.decide("m")) for _ in range(20)]
    assert all(sorted(o) == [f"b{i}" for i in range(8)] for o in orders)
    assert len({o[0] for o in orders}) > 1
    assert first.decide("m").route_reason.startswith("random:b")


def test_the_router_follows_the_fleet_as_it_changes() -> None:
    registry = fleet(cfg("a", ["m"]))
    r = router(registry, "priority_only")
    added = registry.add(cfg("b", ["m", "n"], priority=10))
    assert names(r.decide("m")) == ["a"]  # unknown until its first check
    with pytest.raises(NoHealthyBackend):
        r.decide("n")
    added.status = HEALTHY
    assert names(r.decide("m")) == ["b", "a"]
    assert names(r.decide("n")) == ["b"]
    registry.remove("b")
    assert names(r.decide("m")) == ["a"]
    with pytest.raises(ModelNotFound, match=r"Available models: m$"):
        r.decide("n")  # nothing lists it any more


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match="fastest"):
        Router(fleet(), RoutingConfig(strategy="fastest"))


def test_decision_is_frozen() -> None:
    decision = router(fleet(cfg("a", ["m"]))).decide("m")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        decision.model = "other"  # type: ignore[misc]


# -- properties over random fleets --------------------------------------------------------------

MODELS = ["m0", "m1", "m2", "m3"]
BACKEND_NAMES = [f"be-{c}" for c in "abcdefgh"]


model_sets = st.frozensets(st.sampled_from(MODELS))
capability_maps = st.dictionaries(
    st.sampled_from(MODELS), st.frozensets(st.sampled_from(CAPABILITIES))
)
backend_states = st.tuples(
    model_sets,
    capability_maps,
    st.integers(-10, 200),  # priority
    st.sampled_from([HEALTHY, HEALTHY, UNHEALTHY, UNKNOWN]),
    st.integers(0, 150),  # pending
    st.none() | st.floats(0, 5000),  # avg_latency_ms
)


@st.composite
def live_fleets(
    draw: st.DrawFn, min_size: int = 1, all_serve: str | None = None
) -> BackendRegistry:
    """A registry of up to 8 backends in random live states (fallbacks: m0 -> m1, m2)."""
    states = draw(st.lists(backend_states, min_size=min_size, max_size=len(BACKEND_NAMES)))
    # Shuffled names, so registry order and tie-breaks are exercised.
    chosen = draw(st.permutations(BACKEND_NAMES))
    configs = []
    for name, (models, caps, priority, *_) in zip(chosen, states, strict=False):
        served = models | {all_serve} if all_serve else models
        configs.append(cfg(name, sorted(served), priority, caps))
    registry = BackendRegistry(configs, {}, {"m0": ("m1", "m2")})
    for name, (*_, status, pending, latency) in zip(chosen, states, strict=False):
        backend = registry.get(name)
        backend.status, backend.pending, backend.avg_latency_ms = status, pending, latency
    return registry


def capable(registry: BackendRegistry, model: str, needs: frozenset[str]) -> set[Backend]:
    return {b for b in registry.by_model.get(model, ()) if b.healthy and b.supports(model, needs)}


needs_sets = st.frozensets(st.sampled_from(CAPABILITIES))


@given(
    registry=live_fleets(),
    strategy=st.sampled_from(STRATEGIES),
    model=st.sampled_from([*MODELS, "nope"]),
    needs=needs_sets,
)
def test_decide_returns_every_capable_backend_and_nothing_else(
    registry: BackendRegistry, strategy: str, model: str, needs: frozenset[str]
) -> None:
    try:
        decision = router(registry, strategy).decide(model, needs)
    except InvalidRequest:
        tried = [model, *registry.fallbacks.get(model, ())]
        assert any(b.healthy for m in tried for b in registry.by_model.get(m, ()))
        assert not any(capable(registry, m, needs) for m in tried)
        return
    except NoHealthyBackend:
        assert registry.is_known_model(model)
        return
    except ModelNotFound:
        assert not registry.is_known_model(model)
        return
    assert decision.candidates
    assert len(set(decision.candidates)) == len(decision.candidates)
    assert set(decision.candidates) == capable(registry, decision.model, needs)
    for backend in decision.candidates:
        assert backend.healthy
        assert decision.model in backend.models
        assert backend.supports(decision.model, needs)
    assert decision.route_reason.split(":")[-1 if strategy != "smart" else -2] == (
        decision.candidates[0].name
    )
    if strategy == "smart":
        # The inlined hot-path score agrees with score(): order and reason.
        keys = [(-score(b, Weights()), b.name) for b in decision.candidates]
        assert keys == sorted(keys)
        assert decision.route_reason.endswith(f":{-keys[0][0]:.1f}")


@given(registry=live_fleets(), needs=needs_sets)
def test_fallback_only_when_primary_has_no_capable_backend(
    registry: BackendRegistry, needs: frozenset[str]
) -> None:
    try:
        decision = router(registry).decide("m0", needs)
    except (InvalidRequest, NoHealthyBackend):
        assert not any(capable(registry, m, needs) for m in ["m0", "m1", "m2"])
        return
    if capable(registry, "m0", needs):
        assert (decision.model, decision.fallback_from) == ("m0", None)
        assert not decision.route_reason.startswith("fallback:")
    else:
        expected = "m1" if capable(registry, "m1", needs) else "m2"
        assert (decision.model, decision.fallback_from) == (expected, "m0")
        assert decision.route_reason.startswith(f"fallback:{expected}:smart:")


improvements = st.sampled_from(["priority", "pending", "latency"])


@given(
    registry=live_fleets(min_size=2, all_serve="m3"),
    data=st.data(),
    what=improvements,
    weights=st.sampled_from([Weights(), Weights(100, 0, 0), Weights(0, 50, 50), Weights(1, 1, 98)]),
)
def test_smart_improving_a_backend_never_lowers_its_rank(
    registry: BackendRegistry, data: st.DataObject, what: str, weights: Weights
) -> None:
    for backend in registry.backends:
        backend.status = HEALTHY
    r = router(registry, weights=weights)
    target = data.draw(st.sampled_from(registry.backends))
    before = r.decide("m3").candidates.index(target)
    if what == "priority":
        new = data.draw(st.integers(-10, target.priority))
        target.config = attrs.evolve(target.config, priority=new)
    elif what == "pending":
        target.pending = data.draw(st.integers(0, target.pending))
    else:
        old = target.avg_latency_ms
        target.avg_latency_ms = data.draw(st.none() | st.floats(0, old if old is not None else 0))
    after = r.decide("m3").candidates.index(target)
    assert after <= before
    # The order is by score, descending.
    scores = [score(b, weights) for b in r.decide("m3").candidates]
    assert scores == sorted(scores, reverse=True)


@given(n=st.integers(1, 8), k=st.integers(1, 5), skew=st.integers(0, 3))
def test_round_robin_is_even_over_k_rounds(n: int, k: int, skew: int) -> None:
    registry = fleet(*(cfg(f"b{i}", ["m", "other"]) for i in range(n)))
    r = router(registry, "round_robin")
    for _ in range(skew):  # another model's traffic must not disturb this one's rotation
        r.decide("other")
    firsts: Counter[str] = Counter()
    for _ in range(k * n):
        decision = r.decide("m")
        assert sorted(names(decision)) == sorted(b.name for b in registry.backends)
        firsts[decision.candidates[0].name] += 1
    assert firsts == {f"b{i}": k for i in range(n)}


@given(registry=live_fleets(all_serve="m3"))
def test_priority_only_orders_by_priority(registry: BackendRegistry) -> None:
    assume(capable(registry, "m3", frozenset()))
    decision = router(registry, "priority_only").decide("m3")
    keys = [(b.priority, b.name) for b in decision.candidates]
    assert keys == sorted(keys)


# -- start-up warnings --------------------------------------------------------------------------


def test_unserved_alias_and_fallback_targets_are_named() -> None:
    registry = fleet(
        cfg("a", ["llama3:70b", "mistral:7b"]),
        aliases={"gpt-4": "llama3:70b", "gpt-3": "gpt-4", "typo": "lama3:70b"},
        fallbacks={"llama3:70b": ("mistral:7b", "gone:1b", "gpt-4")},
        status=UNHEALTHY,  # listed is enough: health changes, a typo does not
    )
    assert unserved_targets(registry) == [
        "alias 'typo' leads to 'lama3:70b', which no backend lists",
        "fallback 'gone:1b' of 'llama3:70b' is a model no backend lists",
    ]
    registry.set_models(registry.get("a"), ["lama3:70b", "gone:1b"])
    assert unserved_targets(registry) == []
