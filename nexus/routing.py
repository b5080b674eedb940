"""Routing: which backends may serve a request for a model, best first.

The router is a pure, synchronous decision over the registry's live state
(contract section 4): resolve aliases, keep the healthy backends that list the
model and support what the request needs, fall back to other models when there
are none, then order the candidates by the configured strategy. The request
path tries ``candidates[0]`` first and retries down the list.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter

import attrs

from nexus.config import MAX_ALIAS_HOPS, STRATEGIES, RoutingConfig, Weights
from nexus.errors import InvalidRequest, ModelNotFound, NoHealthyBackend
from nexus.registry import Backend, BackendRegistry

#: How many model names a 404 message lists before "… and N more".
MAX_LISTED_MODELS = 20
#: Longest client-supplied model name echoed back in an error message.
MAX_ECHOED_NAME = 100

#: The request field a client would change to drop each need (the error's ``param``).
_NEED_PARAM = {"vision": "messages", "tools": "tools", "json_mode": "response_format"}

_NO_NEEDS: frozenset[str] = frozenset()
_by_name = attrgetter("config.name")


@attrs.frozen
class RouteDecision:
    """Where a request goes.

    ``model`` is the name sent to the backend (after alias and fallback);
    ``candidates`` are the backends to try, best first (the first, then retries);
    ``fallback_from`` is the resolved model whose fallback serves, if any;
    ``route_reason`` says why, e.g. ``smart:beta:87.5`` (strategy, backend, score),
    ``fallback:qwen2:7b:priority_only:beta`` or ``alias:gpt-4:round_robin:beta``.
    """

    requested_model: str
    model: str
    candidates: tuple[Backend, ...]
    fallback_from: str | None = None
    route_reason: str = ""


def request_needs(body: object) -> frozenset[str]:
    """The capabilities a chat request body needs: a subset of ``config.CAPABILITIES``.

    ``vision`` when a message has an ``image_url`` content part, ``tools`` when
    ``tools`` is a non-empty list, ``json_mode`` when ``response_format`` asks for
    ``json_object``. Never raises: any JSON value is accepted.
    """
    if not isinstance(body, Mapping):
        return _NO_NEEDS
    needs: set[str] = set()
    messages = body.get("messages")
    if isinstance(messages, list) and _has_image(messages):
        needs.add("vision")
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        needs.add("tools")
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_object":
        needs.add("json_mode")
    return frozenset(needs) if needs else _NO_NEEDS


def _has_image(messages: list[object]) -> bool:
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "image_url":
                return True
    return False


def resolve_alias(model: str, registry: BackendRegistry) -> str:
    """Follow ``model`` through the aliases, at most ``MAX_ALIAS_HOPS`` hops.

    A name that a healthy backend serves directly stops the walk: a real model
    wins over an alias of the same name. Cycles cannot loop (the hops are bounded).
    The registry decides (:meth:`BackendRegistry.resolve_alias`).
    """
    return registry.resolve_alias(model)


def unserved_targets(registry: BackendRegistry) -> list[str]:
    """One line per alias or fallback target that no backend lists, for a start-up warning.

    "Lists" means discovered or named in a backend's ``models`` floor, healthy or
    not: such a target can never serve, which is almost always a typo.
    """
    listed = registry.by_model
    problems = []
    for alias in sorted(registry.aliases):
        target = alias
        for _ in range(MAX_ALIAS_HOPS):
            target = registry.aliases.get(target, target)
        if target not in listed:
            problems.append(f"alias {alias!r} leads to {target!r}, which no backend lists")
    for model, chain in sorted(registry.fallbacks.items()):
        for fallback in chain:
            if fallback not in listed and fallback not in registry.aliases:
                problems.append(f"fallback {fallback!r} of {model!r} is a model no backend lists")
    return problems


def score(backend: Backend, weights: Weights) -> float:
    """The smart strategy's score of ``backend`` (0 to 100 for sane inputs; higher is better).

    A backend without latency samples counts as fast, so new backends get tried.
    """
    latency = backend.avg_latency_ms
    return (
        weights.priority * (100 - min(backend.priority, 100))
        + weights.load * (100 - min(backend.pending, 100))
        + weights.latency * (100.0 - (0.0 if latency is None else min(latency / 10.0, 100.0)))
    ) / 100.0


def _candidates(
    backends: Sequence[Backend], model: str, needs: frozenset[str]
) -> tuple[list[Backend], bool]:
    """Healthy backends of ``model`` that support ``needs``, and whether any were healthy."""
    healthy = [b for b in backends if b.healthy]
    if not needs or not healthy:
        return healthy, bool(healthy)
    return [b for b in healthy if b.supports(model, needs)], True


def _show(name: str) -> str:
    # The name comes from the client: keep error messages bounded.
    return name if len(name) <= MAX_ECHOED_NAME else name[:MAX_ECHOED_NAME] + "…"


_Order = Callable[[str, list[Backend]], tuple[tuple[Backend, ...], str]]


class Router:
    """Decides a route for each request from the registry's live state.

    ``rng`` drives the ``random`` strategy (inject a seeded one in tests).
    Round robin keeps one rotation counter per served model.
    """

    def __init__(
        self,
        registry: BackendRegistry,
        config: RoutingConfig,
        rng: random.Random | None = None,
    ) -> None:
        if config.strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {config.strategy!r}")
        self.registry = registry
        self.config = config
        self._rng = rng if rng is not None else random.Random()
        self._turns: dict[str, int] = {}
        orders: dict[str, _Order] = {
            "smart": self._smart,
            "round_robin": self._round_robin,
            "priority_only": self._priority_only,
            "random": self._random,
        }
        self._order = orders[config.strategy]
        weights = config.weights
        self._weights = (float(weights.priority), float(weights.load), float(weights.latency))

    def resolve_alias(self, model: str) -> str:
        """``model`` after alias resolution against the registry (see ``resolve_alias``)."""
        return resolve_alias(model, self.registry)

    def decide(self, model: str, needs: frozenset[str] = _NO_NEEDS) -> RouteDecision:
        """Route a request for ``model`` needing ``needs``.

        Raises ``ModelNotFound`` (404) for a model nothing knows,
        ``NoHealthyBackend`` (503) for a known model with no healthy backend even
        after fallbacks, and ``InvalidRequest`` (400) when healthy backends exist
        but none supports ``needs``.
        """
        registry = self.registry
        resolved = resolve_alias(model, registry) if model in registry.aliases else model
        by_model = registry.by_model
        candidates, any_healthy = _candidates(by_model.get(resolved, ()), resolved, needs)
        # An alias taken shows in the reason: "alias:gpt-4:smart:beta:87.5".
        via = f"alias:{model}:" if resolved != model else ""
        if candidates:
            order, reason = self._order(resolved, candidates)
            return RouteDecision(model, resolved, order, None, via + reason)
        # One level of fallbacks: a fallback's own fallbacks are not followed.
        for fallback in registry.fallbacks.get(resolved, ()):
            if fallback == resolved:
                continue
            candidates, healthy = _candidates(by_model.get(fallback, ()), fallback, needs)
            any_healthy = any_healthy or healthy
            if candidates:
                order, reason = self._order(fallback, candidates)
                reason = f"{via}fallback:{fallback}:{reason}"
                return RouteDecision(model, fallback, order, resolved, reason)
        if any_healthy:
            raise self._unsupported(model, resolved, needs)
        if registry.is_known_model(model) or registry.is_known_model(resolved):
            raise NoHealthyBackend(self._unavailable_message(model, resolved))
        raise ModelNotFound(self._not_found_message(model), param="model")

    # Strategies: each gets the served model and its (non-empty) candidates, in
    # registry order, and returns the full ordering plus the route reason.

    def _smart(self, model: str, candidates: list[Backend]) -> tuple[tuple[Backend, ...], str]:
        w_priority, w_load, w_latency = self._weights
        keyed: list[tuple[float, str, Backend]] = []
        append = keyed.append
        for b in candidates:
            # score() inlined, with min() spelled as comparisons (same results,
            # a third of the cost): this loop is the router's hot path.
            config = b.config
            priority = config.priority
            if priority > 100:
                priority = 100
            pending = b.pending
            if pending > 100:
                pending = 100
            latency = b.avg_latency_ms
            if latency is None:
                latency = 0.0
            else:
                latency /= 10.0
                if latency > 100.0:
                    latency = 100.0
            s = (
                w_priority * (100 - priority)
                + w_load * (100 - pending)
                + w_latency * (100.0 - latency)
            ) / 100.0
            # Names are unique, so the Backend itself is never compared.
            append((-s, config.name, b))
        keyed.sort()
        best_score, best_name, _ = keyed[0]
        return tuple([k[2] for k in keyed]), f"smart:{best_name}:{-best_score:.1f}"

    def _round_robin(
        self, model: str, candidates: list[Backend]
    ) -> tuple[tuple[Backend, ...], str]:
        candidates.sort(key=_by_name)
        turn = self._turns.get(model, 0)
        self._turns[model] = turn + 1
        start = turn % len(candidates)
        order = (*candidates[start:], *candidates[:start])
        return order, f"round_robin:{order[0].name}"

    def _priority_only(
        self, model: str, candidates: list[Backend]
    ) -> tuple[tuple[Backend, ...], str]:
        candidates.sort(key=lambda b: (b.priority, b.name))
        return tuple(candidates), f"priority_only:{candidates[0].name}"

    def _random(self, model: str, candidates: list[Backend]) -> tuple[tuple[Backend, ...], str]:
        # Shuffle a name-sorted list so a seeded rng gives the same order every run.
        candidates.sort(key=_by_name)
        self._rng.shuffle(candidates)
        return tuple(candidates), f"random:{candidates[0].name}"

    # Error messages: off the hot path.

    def _unsupported(self, model: str, resolved: str, needs: frozenset[str]) -> InvalidRequest:
        healthy = [
            (b, m)
            for m in (resolved, *self.registry.fallbacks.get(resolved, ()))
            for b in self.registry.by_model.get(m, ())
            if b.healthy
        ]
        missing = sorted(
            n for n in needs if not any(b.supports(m, frozenset((n,))) for b, m in healthy)
        )
        if missing:
            what = " or ".join(missing)
        else:
            # Each need is met somewhere, but never all of them by one backend.
            missing = sorted(needs)
            what = " and ".join(missing) + " together"
        shown = f"'{_show(model)}'"
        if resolved != model:
            shown += f" (alias of '{_show(resolved)}')"
        return InvalidRequest(
            f"No backend serving {shown} supports {what}",
            param=_NEED_PARAM.get(missing[0]),
        )

    def _unavailable_message(self, model: str, resolved: str) -> str:
        shown = f"'{_show(model)}'"
        if resolved != model:
            shown += f" (alias of '{_show(resolved)}')"
        tail = " or its fallbacks" if self.registry.fallbacks.get(resolved) else ""
        return f"No healthy backend serves the model {shown}{tail}"

    def _not_found_message(self, model: str) -> str:
        registry = self.registry
        names = sorted({*registry.available_model_names(), *registry.available_aliases()})
        if not names:
            return f"The model '{_show(model)}' does not exist; no models are available right now"
        listed = ", ".join(names[:MAX_LISTED_MODELS])
        if len(names) > MAX_LISTED_MODELS:
            listed += f" … and {len(names) - MAX_LISTED_MODELS} more"
        return f"The model '{_show(model)}' does not exist. Available models: {listed}"
