"""Benchmark: microseconds per routing decision, per strategy.

A fleet of 100 backends serving 20 models (each model on 5 to 20 backends),
with random priorities, pending counts, latencies and a few unhealthy
backends. Requests cycle through the models, a few of them via aliases.
Run with ``python -m benchmarks.bench_routing``; ``run()`` returns the numbers
for a larger benchmark suite.
"""

from __future__ import annotations

import random
import time

from nexus.config import STRATEGIES, BackendConfig, RoutingConfig
from nexus.registry import HEALTHY, UNHEALTHY, BackendRegistry
from nexus.routing import Router

BACKENDS = 100
MODELS = 20
CALLS = 20_000


def build_registry(seed: int = 0) -> BackendRegistry:
    """The benchmark fleet: 100 backends x 20 models, in a random live state."""
    rng = random.Random(seed)
    models = [f"model-{i:02d}:{rng.choice(['7b', '13b', '70b'])}" for i in range(MODELS)]
    served: dict[int, list[str]] = {i: [] for i in range(BACKENDS)}
    for model in models:
        for i in rng.sample(range(BACKENDS), rng.randint(5, 20)):
            served[i].append(model)
    configs = [
        BackendConfig(
            name=f"backend-{i:03d}",
            url=f"http://10.0.{i // 250}.{i % 250}:8000",
            priority=rng.randint(1, 100),
            models=tuple(served[i]),
            # Some backends declare capabilities, so the needs filter has work to do.
            model_capabilities=(
                {m: frozenset({"tools", "json_mode"}) for m in served[i]} if i % 4 == 0 else {}
            ),
        )
        for i in range(BACKENDS)
    ]
    aliases = {f"alias-{i}": models[i] for i in range(4)}
    registry = BackendRegistry(configs, aliases, {models[0]: (models[1],)})
    for backend in registry.backends:
        backend.status = HEALTHY if rng.random() < 0.9 else UNHEALTHY
        backend.pending = rng.randint(0, 40)
        backend.avg_latency_ms = None if rng.random() < 0.1 else rng.uniform(20.0, 3000.0)
    return registry


def _requests(registry: BackendRegistry) -> list[tuple[str, frozenset[str]]]:
    models = sorted(registry.by_model)
    names = models + sorted(registry.aliases)
    # One request in ten needs tools, like a fleet with some agent traffic.
    return [
        (name, frozenset({"tools"}) if i % 10 == 0 else frozenset())
        for i, name in enumerate(names * 3)
    ]


def time_strategy(strategy: str, calls: int = CALLS, seed: int = 0) -> float:
    """Mean microseconds per ``Router.decide`` call for ``strategy``."""
    registry = build_registry(seed)
    router = Router(registry, RoutingConfig(strategy=strategy), rng=random.Random(seed))
    requests = _requests(registry)
    schedule = [requests[i % len(requests)] for i in range(calls)]
    decide = router.decide
    for model, needs in schedule[:1000]:  # warm up
        decide(model, needs)
    start = time.perf_counter_ns()
    for model, needs in schedule:
        decide(model, needs)
    elapsed = time.perf_counter_ns() - start
    return elapsed / calls / 1000.0


def run(calls: int = CALLS, seed: int = 0) -> dict[str, float]:
    """Microseconds per decision for each strategy (best of three runs)."""
    return {s: min(time_strategy(s, calls, seed) for _ in range(3)) for s in STRATEGIES}


def main() -> None:
    """Print the numbers."""
    print(f"routing: {BACKENDS} backends x {MODELS} models, {CALLS} decisions per strategy")
    for strategy, micros in run().items():
        print(f"  {strategy:<14} {micros:7.2f} us/decision")


if __name__ == "__main__":
    main()
