"""Worker mode (contract section 12): 1 and 2 workers, what sharing costs, a projection.

Run: ``python -m benchmarks.bench_workers [--quick]`` (``make bench`` runs it too).

- In process: the cost a worker pays per request for the shared view (shipping its own
  record; applying another worker's), the supervisor's cost per forwarded record.
- Real ``twistd nexus``: c64 non-streaming through ``workers = 1`` (one process, pinned
  to the gateway's CPU, as the rest of the suite) and ``workers = 2`` (supervisor and
  both workers on both CPUs; the mock and wrk stay on the load CPU, so on this 2-core
  machine the second worker shares a core with them). Interleaved runs. Requests per
  worker come from the JSON request log (its ``worker`` field): the kernel's balance.
- Scrapes of the 20 x 10 fleet (every pair with traffic) through 1 and 2 workers:
  ``/metrics`` on a fresh connection each, p50/p95.
- A projection for 4/8/16 cores from the measured per-request costs (see ``project``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._procs import (
    Proc,
    free_port,
    wait_until,
)
from benchmarks.run import (
    DEFAULT,
    FLEET_BACKENDS,
    FLEET_MODELS,
    HOST,
    QUICK,
    RESULTS,
    Suite,
    clean_env,
    gateway_toml,
    log,
    percentile,
    run_wrk,
    standalone,
    twistd,
)

CONCURRENCY = 64
#: Records a worker ships per reactor turn in the micro-benchmark (a loaded turn's few).
BATCH = 8


# -- in process ------------------------------------------------------------------------------


def _records(n: int) -> list[Any]:
    from nexus.tracking import RequestRecord

    out = []
    for i in range(n):
        record = RequestRecord(
            started=0.0, request_id=f"{i:032x}", client="127.0.0.1", model="bench-model",
            actual_model="bench-model", backend="mock", backend_type="openai", attempts=1,
            route_reason="smart: mock (score 87.5)", prompt_tokens=10, completion_tokens=5,
            worker=1,
        )
        record.finish(200, 0.0021)
        out.append(record)
    return out


def micro(calls: int = 20_000, repeat: int = 3) -> dict[str, float]:
    """µs per request: ship one's own record, apply another's, forward one (supervisor)."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from nexus.config import load_config
    from nexus.service import build_gateway
    from nexus.workers.channel import dumps, record_fields
    from nexus.workers.supervisor import Worker, WorkerChannel, WorkerPool
    from nexus.workers.worker import WorkerLink

    config, _ = load_config(None, environ={})
    records = _records(calls)
    out: dict[str, float] = {}

    def best(run: Any) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return 1e6 * min(times) / calls

    clock = Clock()
    worker_gateway = build_gateway(config, clock)
    link = WorkerLink(worker_gateway, clock, on_start=lambda _: None)
    link.makeConnection(StringTransport())

    def ship() -> None:
        for i, record in enumerate(records):
            link.record(record)
            if i % BATCH == BATCH - 1:
                link.flush()
        link.flush()
        link.transport.clear()  # type: ignore[attr-defined]

    out["ship_us"] = best(ship)
    batches = [
        dumps([record_fields(r) for r in records[i : i + BATCH]])
        for i in range(0, calls, BATCH)
    ]

    def apply() -> None:
        for data in batches:
            link.records(data)

    out["apply_us"] = best(apply)
    supervisor_gateway = build_gateway(config, clock)
    pool = WorkerPool(supervisor_gateway, clock, 2, None)
    channels = []
    for index in (1, 2):
        channel = WorkerChannel(pool, Worker(pool, index))
        channel.makeConnection(StringTransport())
        channels.append(channel)
    pool.channels = channels

    def forward() -> None:
        for data in batches:
            pool.forward_records(channels[0], data)
        channels[1].transport.clear()  # type: ignore[attr-defined]

    out["forward_us"] = best(forward)
    return out


# -- real gateways ---------------------------------------------------------------------------


def _both_cpus(argv: list[str]) -> list[str]:
    """Run on every CPU of the machine (this process is pinned to the load CPU)."""
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(os.getppid())))
    if shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", cpus, *argv]


def start_gateway(
    suite: Suite, name: str, toml: str, healthy: int, workers: int
) -> tuple[Proc, int]:
    """A gateway with ``workers``: one process on the gateway CPU, or N on every CPU."""
    if workers == 1:
        return suite.start_gateway(name, toml, healthy)
    port = free_port()
    config = suite.workdir / f"{name}.toml"
    config.write_text(toml.replace("@PORT@", str(port)))
    argv = _both_cpus([twistd(), "-n", "--pidfile=", "nexus", "--config", str(config),
                       "--workers", str(workers)])
    proc = suite.procs.start(name, argv, clean_env())

    def ready(answer: Any) -> bool:
        return bool(answer.get("backends", {}).get("healthy") == healthy)

    wait_until(proc, f"http://{HOST}:{port}/health", ready, 60, f"{name} to be healthy")
    return proc, port


def family(proc: Proc) -> list[int]:
    """The gateway's processes: the supervisor and its workers."""
    pids = [proc.pid]
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    return pids + [int(c) for c in children]


def cpu_of(pids: Sequence[int]) -> dict[int, float]:
    from benchmarks._procs import cpu_seconds

    out = {}
    for pid in pids:
        try:
            out[pid] = cpu_seconds(pid)
        except (OSError, ValueError):
            out[pid] = 0.0
    return out


def per_worker(log_path: Path, since: int) -> dict[int, int]:
    """Requests per worker in the JSON request log written after offset ``since``."""
    counts: dict[int, int] = {}
    with open(log_path, "rb") as f:
        f.seek(since)
        for line in f:
            if b'"nexus.requests"' not in line:
                continue
            try:
                worker = json.loads(line).get("worker", 0)
            except ValueError:
                continue
            counts[worker] = counts.get(worker, 0) + 1
    return counts


def throughput(suite: Suite, reps: int, seconds: float, warm_s: float) -> dict[str, Any]:
    """c64 through 1 and 2 workers, interleaved."""
    toml = gateway_toml(0, [("mock", suite.mock_url)]).replace("tcp:0:", "tcp:@PORT@:")
    toml += '\n[logging]\nformat = "json"\n'
    gateways = {n: start_gateway(suite, f"gateway-w{n}", toml, 1, n) for n in (1, 2)}
    try:
        for n, (_, port) in gateways.items():
            log(f"workers: warming up {n} ...")
            run_wrk(f"http://{HOST}:{port}/v1/chat/completions", 16, warm_s, suite.cpus.load)
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for rep in range(reps):
            for n in ((1, 2) if rep % 2 == 0 else (2, 1)):
                proc, port = gateways[n]
                pids = family(proc)
                log(f"workers: c{CONCURRENCY} through {n} worker(s) ({rep + 1}/{reps}) ...")
                since = proc.log.stat().st_size
                assert suite.mock is not None
                cpu0, mock0, t0 = cpu_of(pids), suite.mock.cpu_seconds(), time.monotonic()
                res = run_wrk(f"http://{HOST}:{port}/v1/chat/completions", CONCURRENCY,
                              seconds, suite.cpus.load)
                wall = time.monotonic() - t0
                cpu1 = cpu_of(pids)
                time.sleep(0.5)  # the last lines reach the log
                runs[n].append({
                    "rps": res.rps, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
                    "requests": res.requests, "errors": res.errors + res.bad_status,
                    "cpu_s": {str(p): cpu1[p] - cpu0[p] for p in pids},
                    "mock_cpu_s": suite.mock.cpu_seconds() - mock0,
                    "wall_s": wall,
                    "per_worker": per_worker(proc.log, since),
                })
    finally:
        for proc, _ in gateways.values():
            suite.procs.stop(proc)
    out: dict[str, Any] = {}
    for n, rs in runs.items():
        requests = sum(r["requests"] for r in rs)
        total_cpu = sum(sum(r["cpu_s"].values()) for r in rs)
        supervisor_cpu = sum(next(iter(r["cpu_s"].values())) for r in rs) if n > 1 else 0.0
        worker_cpu = total_cpu - supervisor_cpu
        shares = [
            max(r["per_worker"].values()) / max(1, sum(r["per_worker"].values()))
            for r in rs if r["per_worker"]
        ]
        out[str(n)] = {
            "rps": statistics.median(r["rps"] for r in rs),
            "all_rps": [round(r["rps"], 1) for r in rs],
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "cpu_us_per_request": 1e6 * total_cpu / requests if requests else float("nan"),
            "worker_cpu_us_per_request": 1e6 * worker_cpu / requests if requests else float("nan"),
            "supervisor_cpu_us_per_request": 1e6 * supervisor_cpu / requests
            if requests else float("nan"),
            "busiest_worker_share": statistics.median(shares) if shares else float("nan"),
            "per_worker": [r["per_worker"] for r in rs],
        }
    out["ratio"] = statistics.median(
        b["rps"] / a["rps"] for a, b in zip(runs[1], runs[2], strict=True)
    )
    return out


def scrapes(suite: Suite, count: int) -> dict[str, Any]:
    """``/metrics`` of the 20 x 10 fleet through 1 and 2 workers: p50/p95 (ms)."""
    backends = [(f"fleet-backend-{i:02d}", suite.mock_url) for i in range(FLEET_BACKENDS)]
    toml = gateway_toml(0, backends, FLEET_MODELS, strategy="round_robin")
    toml = toml.replace("tcp:0:", "tcp:@PORT@:")
    out: dict[str, Any] = {}
    for n in (1, 2):
        proc, port = start_gateway(suite, f"gateway-fleet-w{n}", toml, FLEET_BACKENDS, n)
        base = f"http://{HOST}:{port}"
        try:
            log(f"workers: fleet traffic through {n} worker(s) ...")
            run_wrk(f"{base}/v1/chat/completions", 16, 3.0, suite.cpus.load, models=FLEET_MODELS)
            times: dict[str, list[float]] = {"/metrics": [], "/v1/stats": []}
            size = 0
            for _ in range(count):
                for path, got in times.items():
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(base + path, timeout=10) as resp:
                        body = resp.read()
                    got.append((time.perf_counter() - t0) * 1000.0)
                    if path == "/metrics":
                        size = len(body)
            out[str(n)] = {
                "metrics_p50_ms": statistics.median(times["/metrics"]),
                "metrics_p95_ms": percentile(times["/metrics"], 95),
                "stats_p50_ms": statistics.median(times["/v1/stats"]),
                "stats_p95_ms": percentile(times["/v1/stats"], 95),
                "metrics_bytes": size,
            }
        finally:
            suite.procs.stop(proc)
    return out


# -- the projection --------------------------------------------------------------------------


def project(own_us: float, shared_us: float,
            cores: Sequence[int] = (2, 4, 8, 16)) -> dict[str, float]:
    """Requests/s of N workers on N cores, from per-request costs measured here.

    ``own_us``: CPU per request of one process serving it (the 1-worker run: everything
    a request costs the gateway). ``shared_us``: CPU one *other* process spends on a
    request's record (the supervisor's measured CPU per request in the 2-worker run:
    it receives, applies and forwards every record, cold caches and wake-ups included;
    a worker applying another's record does a subset of that). With N workers, every
    request costs ``own_us`` once, plus ``shared_us`` in each of the N - 1 other workers
    and in the supervisor, all on the same N cores:
    ``R(N) = N / (own_us + N x shared_us)``. Backends, clients and the network are on
    other machines; the kernel spreads connections evenly (measured: see the balance).
    """
    out = {str(n): n / ((own_us + n * shared_us) * 1e-6) for n in cores}
    n = 2
    while n / ((own_us + n * shared_us) * 1e-6) < 10_000 and n < 1024:
        n += 1
    out["cores_for_10k"] = float(n)
    out["ceiling"] = 1e6 / shared_us  # N -> infinity: every core busy with others' records
    return out


def run(suite: Suite, reps: int, seconds: float, warm_s: float, scrape_count: int
        ) -> dict[str, Any]:
    """Every part; starts the suite's mock unless it runs already."""
    if suite.mock is None:
        suite.start_mock()
    r: dict[str, Any] = {"micro": micro()}
    r["throughput"] = throughput(suite, reps, seconds, warm_s)
    r["scrapes"] = scrapes(suite, scrape_count)
    t = r["throughput"]
    r["projection"] = project(
        t["1"]["cpu_us_per_request"], t["2"]["supervisor_cpu_us_per_request"]
    )
    return r


def report(r: dict[str, Any]) -> str:
    m, t, s, p = r["micro"], r["throughput"], r["scrapes"], r["projection"]
    lines = [
        "| what | 1 worker | 2 workers |",
        "|---|---|---|",
        f"| c{CONCURRENCY} req/s (median) | {t['1']['rps']:,.0f} | {t['2']['rps']:,.0f} "
        f"(x{t['ratio']:.2f}) |",
        f"| all runs | {t['1']['all_rps']} | {t['2']['all_rps']} |",
        f"| p50 / p99 ms | {t['1']['p50_ms']:.1f} / {t['1']['p99_ms']:.1f} | "
        f"{t['2']['p50_ms']:.1f} / {t['2']['p99_ms']:.1f} |",
        f"| gateway CPU per request, all processes | {t['1']['cpu_us_per_request']:.0f} µs | "
        f"{t['2']['cpu_us_per_request']:.0f} µs |",
        f"| of which workers / supervisor | {t['1']['worker_cpu_us_per_request']:.0f} / - | "
        f"{t['2']['worker_cpu_us_per_request']:.0f} / "
        f"{t['2']['supervisor_cpu_us_per_request']:.0f} µs |",
        f"| busiest worker's share of the requests | - | "
        f"{t['2']['busiest_worker_share']:.3f} |",
        f"| errors | {t['1']['errors']} | {t['2']['errors']} |",
        f"| /metrics 20x10 p50 / p95 | {s['1']['metrics_p50_ms']:.2f} / "
        f"{s['1']['metrics_p95_ms']:.2f} ms | {s['2']['metrics_p50_ms']:.2f} / "
        f"{s['2']['metrics_p95_ms']:.2f} ms |",
        f"| /v1/stats 20x10 p50 / p95 | {s['1']['stats_p50_ms']:.2f} / "
        f"{s['1']['stats_p95_ms']:.2f} ms | {s['2']['stats_p50_ms']:.2f} / "
        f"{s['2']['stats_p95_ms']:.2f} ms |",
        "",
        f"Per request, in process: a worker ships its own record {m['ship_us']:.2f} µs, "
        f"applies another worker's {m['apply_us']:.2f} µs; the supervisor applies and "
        f"forwards one {m['forward_us']:.2f} µs.",
        "",
        "| cores (= workers) | projected req/s |",
        "|---|---|",
        *[f"| {n} | {p[n]:,.0f} |" for n in ("2", "4", "8", "16")],
        f"| 10,000 req/s from | {p['cores_for_10k']:.0f} cores |",
        f"| ceiling (N -> infinity) | {p['ceiling']:,.0f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_workers",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short run each")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "workers.md")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else DEFAULT
    reps = max(1, args.reps if args.reps is not None else plan.reps + 1)
    scrapes = 50 if args.quick else 200
    return standalone(
        "workers", plan, args.output,
        lambda suite: run(suite, reps, plan.run_s, plan.warm_s, scrapes), report,
    )


if __name__ == "__main__":
    raise SystemExit(main())
