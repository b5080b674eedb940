"""Benchmark: what open dashboards cost the gateway under load.

``PYTHONPATH=. .venv/bin/python -m benchmarks.bench_dashboard [--quick] [--reps N]``

The mock backend and the real gateway run as processes (``twistd nexus-mock``,
``twistd nexus``), started and pinned as ``benchmarks.run`` does (mock, wrk and
this script on CPU 0, the gateway alone on CPU 1). wrk drives non-streaming chat
completions at c64 through the gateway with 0 and with 20 open ``GET /v1/events``
streams, the runs interleaved (alternating order) and repeated; the figure is the
median req/s of each. The 20 subscribers are read by one thread of this script,
as fast as the events come (what open browser tabs do): each receives every
``stats`` event and the request batches, up to 50 requests every 0.5 s.

A third mode, "stalled", opens 20 streams that are never read (a browser that
vanished without closing its connection): they must not slow the gateway nor
grow its memory, and are dropped once their bounded queue is full (the gauge
``nexus_dashboard_subscribers`` shows how many are left).

Prints a markdown table and writes it, with the raw figures as JSON, to
``benchmarks/results/dashboard.md`` (git-ignored). ``run()`` returns the figures.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._procs import (
    BenchError,
    Proc,
    WrkResult,
    run_wrk,
)
from benchmarks.run import (
    DEFAULT,
    HOST,
    QUICK,
    RESULTS,
    Suite,
    gateway_toml,
    log,
    standalone,
)

#: Open event streams in the "20 dashboards" mode.
SUBSCRIBERS = 20
#: wrk connections.
CONCURRENCY = 64
#: The target: throughput with 20 dashboards open within 5 % of none.
TARGET_RATIO = 0.95


def _get_events(port: int, receive_buffer: int | None = None) -> socket.socket:
    """A connected socket that has sent ``GET /v1/events`` (the response is not read here)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # a small window: a stalled reader fills up quickly
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((HOST, port))
    sock.sendall(
        b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    )
    return sock


class Readers:
    """``n`` event streams read by one thread as fast as they come, their data thrown away."""

    def __init__(self, port: int, n: int) -> None:
        self.sockets = [_get_events(port) for _ in range(n)]
        self.bytes = 0
        self.requests = 0
        self.closed = 0
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        for sock in self.sockets:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="readers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._selector.unregister(sock)
                    self.closed += 1
                    continue
                self.bytes += len(data)
                self.requests += data.count(b"event: request\n")

    def close(self) -> None:
        """Stop reading and close every stream."""
        self._stop.set()
        self._thread.join(5)
        self._selector.close()
        for sock in self.sockets:
            sock.close()


class Stalled:
    """``n`` event streams that are never read (browsers that vanished)."""

    def __init__(self, port: int, n: int) -> None:
        self.sockets = [_get_events(port, receive_buffer=4096) for _ in range(n)]

    def close(self) -> None:
        """Close every stream."""
        for sock in self.sockets:
            sock.close()


def subscribers_gauge(port: int) -> float:
    """``nexus_dashboard_subscribers`` of the gateway on ``port``."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("nexus_dashboard_subscribers "):
                return float(line.split()[1])
    raise BenchError("no nexus_dashboard_subscribers in /metrics")


def wait_for_gauge(port: int, value: float, seconds: float = 10.0) -> None:
    """Wait until the gateway counts ``value`` open event streams."""
    deadline = time.monotonic() + seconds
    while subscribers_gauge(port) != value:
        if time.monotonic() > deadline:
            raise BenchError(f"the gateway never counted {value:g} event streams")
        time.sleep(0.05)


def bench_record(calls: int = 100_000, repeat: int = 3) -> float:
    """µs per ``LiveView.record`` (the dashboard's recorder), best of ``repeat``, in-process."""
    from twisted.internet.task import Clock

    from nexus.config import BackendConfig
    from nexus.dashboard.live import LiveView
    from nexus.metrics import MetricsCollector
    from nexus.registry import BackendRegistry
    from nexus.tracking import RequestRecord

    registry = BackendRegistry([BackendConfig(name="mock", url="http://127.0.0.1:1")])
    view = LiveView(registry, MetricsCollector(registry), Clock())
    records = []
    for i in range(calls):
        record = RequestRecord(started=0.0, request_id=f"{i:032x}", model="m", backend="mock")
        record.finish(200, 0.03 + (i % 100) * 1e-4)
        records.append(record)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for record in records:
            view.record(record)
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(suite: Suite, reps: int, seconds: float, warm_s: float) -> dict[str, Any]:
    """Run every mode against a gateway of its own; return the figures.

    Starts the suite's mock unless it runs already (``benchmarks.run`` can call this
    in the middle of its own run), and stops its gateway at the end.
    """
    if suite.mock is None:
        suite.start_mock()
    toml = gateway_toml(0, [("mock", suite.mock_url)]).replace("tcp:0:", "tcp:@PORT@:")
    log("dashboards: starting a gateway ...")
    gw, port = suite.start_gateway("gateway-dashboard", toml, 1)
    try:
        return _measure(suite, gw, port, reps, seconds, warm_s)
    finally:
        suite.procs.stop(gw)


def _measure(
    suite: Suite, gw: Proc, port: int, reps: int, seconds: float, warm_s: float
) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/v1/chat/completions"
    cpu = suite.cpus.load
    log("warming up ...")
    run_wrk(url, CONCURRENCY, warm_s, cpu)
    runs: dict[str, list[tuple[WrkResult, float, dict[str, Any]]]] = {
        "none": [], "readers": [], "stalled": []}
    for rep in range(reps):
        order = ("none", "readers", "stalled") if rep % 2 == 0 else ("stalled", "readers", "none")
        for mode in order:
            log(f"c{CONCURRENCY}, dashboards: {mode} ({rep + 1}/{reps}) ...")
            extra: dict[str, Any] = {}
            clients: Readers | Stalled | None = None
            if mode == "readers":
                clients = Readers(port, SUBSCRIBERS)
            elif mode == "stalled":
                clients = Stalled(port, SUBSCRIBERS)
            try:
                if clients is not None:
                    wait_for_gauge(port, SUBSCRIBERS)
                rss0, cpu0 = gw.rss_kb(), gw.cpu_seconds()
                with suite.watch(None, gw) as foreign:
                    result = run_wrk(url, CONCURRENCY, seconds, cpu)
                extra["foreign_cpu"] = dict(foreign)
                extra["gateway_cpu_s"] = gw.cpu_seconds() - cpu0
                extra["rss_growth_kb"] = gw.rss_kb() - rss0
                extra["open_after"] = subscribers_gauge(port)
                if isinstance(clients, Readers):
                    extra["bytes_per_subscriber"] = clients.bytes / SUBSCRIBERS
                    extra["request_events_per_subscriber"] = clients.requests / SUBSCRIBERS
                    extra["closed_by_gateway"] = clients.closed
            finally:
                if clients is not None:
                    clients.close()
            wait_for_gauge(port, 0)
            runs[mode].append((result, extra["gateway_cpu_s"], extra))
    out: dict[str, Any] = {}
    for mode, results in runs.items():
        requests = sum(r.requests for r, _, _ in results)
        out[mode] = {
            "rps": _median([r.rps for r, _, _ in results]),
            "all_rps": [round(r.rps, 1) for r, _, _ in results],
            "p50_ms": _median([r.p50_ms for r, _, _ in results]),
            "p99_ms": _median([r.p99_ms for r, _, _ in results]),
            "errors": sum(r.errors + r.bad_status for r, _, _ in results),
            "gateway_cpu_us": 1e6 * sum(c for _, c, _ in results) / requests
            if requests else float("nan"),
            "runs": [extra for _, _, extra in results],
        }
    # The machine's speed drifts over a run (a virtual machine's neighbours): each mode
    # is compared with the "none" run of the same repetition, seconds apart, and the
    # median of those ratios is the figure.
    for mode in ("readers", "stalled"):
        pairs = list(zip(runs[mode], runs["none"], strict=True))
        out[f"ratio_{mode}"] = _median([r.rps / n.rps for (r, _, _), (n, _, _) in pairs])
        out[f"cpu_ratio_{mode}"] = _median(
            [(rc / r.requests) / (nc / n.requests) for (r, rc, _), (n, nc, _) in pairs]
        )
    out["rss_kb_end"] = gw.rss_kb()
    out["record_us"] = bench_record()
    return out


def report(r: dict[str, Any], reps: int, seconds: float) -> str:
    """The figures as a markdown table."""
    none, readers, stalled = r["none"], r["readers"], r["stalled"]

    def runs_of(mode: dict[str, Any], key: str) -> list[Any]:
        return [extra.get(key) for extra in mode["runs"]]

    kb = [round(b / 1024) for b in runs_of(readers, "bytes_per_subscriber")]
    events = [round(e) for e in runs_of(readers, "request_events_per_subscriber")]
    left = [int(v) for v in runs_of(stalled, "open_after")]
    growth = [round(v / 1024, 1) for v in runs_of(stalled, "rss_growth_kb")]
    met = "yes" if r["ratio_readers"] >= TARGET_RATIO else "**no**"
    lines = [
        f"c{CONCURRENCY} non-streaming through Nexus, {reps} interleaved runs of {seconds:g} s "
        "per mode, medians:",
        "",
        "| open dashboards (`/v1/events`) | req/s | req/s vs none (paired) | p50 / p99 (ms) "
        "| gateway CPU per request, µs (vs none, paired) | errors |",
        "|---|---|---|---|---|---|",
        f"| none | {none['rps']:,.0f} | 1 | {none['p50_ms']:.2f} / {none['p99_ms']:.2f} "
        f"| {none['gateway_cpu_us']:.0f} | {none['errors']} |",
        f"| {SUBSCRIBERS}, reading | {readers['rps']:,.0f} | {r['ratio_readers']:.3f} "
        f"| {readers['p50_ms']:.2f} / {readers['p99_ms']:.2f} "
        f"| {readers['gateway_cpu_us']:.0f} ({r['cpu_ratio_readers']:.3f}) "
        f"| {readers['errors']} |",
        f"| {SUBSCRIBERS}, stalled (never read) | {stalled['rps']:,.0f} "
        f"| {r['ratio_stalled']:.3f} | {stalled['p50_ms']:.2f} / {stalled['p99_ms']:.2f} "
        f"| {stalled['gateway_cpu_us']:.0f} ({r['cpu_ratio_stalled']:.3f}) "
        f"| {stalled['errors']} |",
        "",
        f"- Target: {SUBSCRIBERS} open dashboards within 5 % of none: "
        f"{r['ratio_readers']:.3f} of it (the median of each run's req/s over the \"none\" run "
        f"of the same repetition), {met}. Every run (req/s): none {none['all_rps']}, "
        f"reading {readers['all_rps']}, stalled {stalled['all_rps']}.",
        f"- Each reading subscriber received {kb} KiB per run, {events} request events "
        "(at most 50 per 0.5 s batch).",
        f"- Stalled subscribers still open after each run: {left} of {SUBSCRIBERS} (the "
        f"others were dropped, their queues full); gateway RSS growth over the run: {growth} MB.",
        f"- Gateway RSS at the end: {r['rss_kb_end'] / 1024:.1f} MB.",
        f"- Recording one finished request for the dashboard (charts' bucket, ring of the last "
        f"requests), in-process: {r['record_us']:.2f} µs.",
    ]
    shares = [run.get("foreign_cpu", {}) for mode in (none, readers, stalled)
              for run in mode["runs"]]
    gateway_cpu = [s["gateway_cpu"] for s in shares if "gateway_cpu" in s]
    load_cpu = [s["load_cpu"] for s in shares if "load_cpu" in s]
    if gateway_cpu:
        lines.append(
            f"- Noise: other programs used at most {100 * max(gateway_cpu):.0f} % of the "
            f"gateway's CPU and {100 * max(load_cpu):.0f} % of the load CPU during a run."
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="one short run per mode")
    parser.add_argument("--reps", type=int, default=None,
                        help="interleaved runs per mode (default 3; --quick: 1)")
    parser.add_argument("--output", type=Path, default=RESULTS / "dashboard.md",
                        help="where to write the markdown report (default: %(default)s)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else DEFAULT
    reps = max(1, args.reps if args.reps is not None else plan.reps)
    return standalone(
        "dashboard", plan, args.output,
        lambda suite: run(suite, reps, plan.run_s, plan.warm_s),
        lambda r: report(r, reps, plan.run_s),
    )


if __name__ == "__main__":
    raise SystemExit(main())
