"""The benchmark suite: ``make bench`` (``python -m benchmarks.run [--quick]``).

Starts the mock backend (``twistd nexus-mock``) and the real gateway
(``twistd nexus``) as processes on 127.0.0.1, drives them with wrk and with
small socket clients, directly and through Nexus, and prints one markdown table
of every figure from the same run (also written to
``benchmarks/results/latest.md``). See ``docs/performance.md``.

On a machine with two or more CPUs the mock, wrk and this script share CPU 0
and the gateway has CPU 1 to itself (``taskset``), so the gateway's numbers do
not depend on what the load generator costs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from benchmarks import _clients, _profile
from benchmarks._procs import (
    ROOT,
    BenchError,
    Proc,
    Processes,
    WrkResult,
    busy_between,
    cpu_busy_fractions,
    cpu_jiffies,
    cpu_model,
    finish_wrk,
    free_port,
    http_json,
    pinned,
    run_wrk,
    start_wrk,
    terminate_on_sigterm,
    wait_until,
)

HOST = "127.0.0.1"
MODEL = "bench-model"
FLEET_BACKENDS = 20
FLEET_MODELS = tuple(f"fleet-model-{i}:7b" for i in range(10))
CONCURRENCY = (1, 16, 64)
#: A lone client's pause after each answer (``lone_requests``).
LONE_PAUSE_MS = 2
#: Events of one mock stream: role, the content chunks, finish, [DONE].
STREAM_CHUNKS = 50
STREAM_EVENTS = STREAM_CHUNKS + 3
PACED_DELAY_MS = 20.0
HELD_STREAMS = 1000
#: How long the mock takes per answer in the "LLM-like" load of the scrape test.
LLM_LATENCY_MS = 50.0
RESULTS = Path(__file__).resolve().parent / "results"
#: Put first on the gateway's PYTHONPATH: its sitecustomize times garbage collections.
GCWATCH = Path(__file__).resolve().parent / "_gcwatch"


@attrs.frozen
class Plan:
    """How long each part runs (seconds) and how many times."""

    run_s: float
    reps: int
    warm_s: float
    stream_reps: int
    paced_streams: int
    paced_concurrency: int
    lag_s: float
    lag_reps: int
    profile_s: float
    #: Loads of the scrape test: "llm" (mock answers in 50 ms), "saturating".
    lag_loads: tuple[str, ...] = ("llm", "saturating")
    #: Run the metrics micro-benchmark in full (its 100 x 10 fleet takes a while).
    micro_full: bool = True


QUICK = Plan(
    run_s=2,
    reps=1,
    warm_s=1,
    stream_reps=1,
    paced_streams=10,
    paced_concurrency=5,
    lag_s=2,
    lag_reps=1,
    profile_s=3,
    lag_loads=("llm",),
    micro_full=False,
)
DEFAULT = Plan(
    run_s=5,
    reps=3,
    warm_s=2,
    stream_reps=2,
    paced_streams=40,
    paced_concurrency=10,
    lag_s=8,
    lag_reps=1,
    profile_s=10,
)


@attrs.frozen
class Cpus:
    """Where each process runs (None: not pinned)."""

    load: int | None
    gateway: int | None


def log(message: str) -> None:
    """Progress on stderr, so stdout is just the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    """The median, NaN for nothing."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile, NaN for nothing."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100.0 * len(ordered)) - 1))]


# -- configuration files ----------------------------------------------------------------------


def gateway_toml(
    port: int,
    backends: Sequence[tuple[str, str]],
    models: Sequence[str] = (),
    strategy: str = "smart",
) -> str:
    """A gateway config: listen on ``port``, health every 5 s, these backends."""
    lines = [
        "[server]",
        f'listen = "tcp:{port}:interface={HOST}:backlog=1024"',
        "request_timeout_seconds = 60",
        "",
        "[health_check]",
        "interval_seconds = 5",
        "",
        "[routing]",
        f'strategy = "{strategy}"',
    ]
    model_list = ", ".join(json.dumps(m) for m in models)
    for name, url in backends:
        lines += ["", "[[backends]]", f'name = "{name}"', f'url = "{url}"', 'type = "openai"']
        if models:
            lines.append(f"models = [{model_list}]")
    return "\n".join(lines) + "\n"


def clean_env() -> dict[str, str]:
    """This environment without NEXUS_* overrides (they would change the gateway's config).

    Discovery is off: a benchmark never browses the network (mDNS) and measures only
    the backends it configures.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_DISCOVERY"] = "false"
    return env


#: A run is "clean" when other programs used at most this share of either CPU.
CLEAN_SHARE = 0.10


def _clean(foreign: dict[str, float], direct: bool) -> bool:
    """Whether a run had its CPUs (for a direct run, just the load CPU) to itself."""
    return all(
        share <= CLEAN_SHARE
        for cpu, share in foreign.items()
        if not (direct and cpu == "gateway_cpu")
    )


def twistd() -> str:
    """The twistd next to this Python (the project's virtualenv)."""
    local = Path(sys.executable).parent / "twistd"
    return str(local) if local.exists() else "twistd"


def chat_body(model: str = MODEL, stream: bool = False) -> bytes:
    """The same ~400-byte body post.lua sends."""
    return json.dumps(
        {
            "model": model,
            "messages": [
                {
                    "role": "system",
                    "content": "You are a concise assistant for the platform team; answer plainly.",
                },
                {
                    "role": "user",
                    "content": "Summarise why an HTTP proxy keeps a pool of persistent connections "
                    "to its upstream servers, in two short sentences for a new engineer.",
                },
            ],
            "temperature": 0.7,
            "max_tokens": 128,
            "top_p": 0.95,
            "user": "nexus-bench",
            "stream": stream,
        }
    ).encode()


# -- the suite --------------------------------------------------------------------------------


class Suite:
    """One benchmark run: its processes, its plan, and every figure it measured."""

    def __init__(
        self, procs: Processes, plan: Plan, cpus: Cpus, workdir: Path, profiler: str
    ) -> None:
        self.procs = procs
        self.plan = plan
        self.cpus = cpus
        self.workdir = workdir
        self.profiler = profiler
        self.r: dict[str, Any] = {}
        self.notes: list[str] = []
        self.mock: Proc | None = None
        self.mock_port = 0

    # -- processes ------------------------------------------------------------------------

    def start_mock(self) -> None:
        """The mock backend on CPU 0, serving the bench model and the fleet's models."""
        self.mock_port = free_port()
        models = ",".join((MODEL, *FLEET_MODELS))
        argv = pinned(
            self.cpus.load,
            [
                twistd(),
                "-n",
                "--pidfile=",
                "nexus-mock",
                "--port",
                str(self.mock_port),
                "--models",
                models,
            ],
        )
        self.mock = self.procs.start("mock", argv, clean_env())
        wait_until(
            self.mock,
            f"{self.mock_url}/v1/models",
            lambda a: bool(a.get("data")),
            30,
            "the mock backend",
        )

    @property
    def mock_url(self) -> str:
        """Base URL of the mock backend."""
        return f"http://{HOST}:{self.mock_port}"

    def configure_mock(self, **settings: Any) -> None:
        """Change the mock's knobs over its control API."""
        http_json(f"{self.mock_url}/_mock/config", settings)

    def start_gateway(
        self,
        name: str,
        toml: str,
        healthy: int,
        extra: Sequence[str] = (),
        settings: Mapping[str, str] | None = None,
    ) -> tuple[Proc, int]:
        """A gateway on CPU 1 with config ``toml``, once ``healthy`` backends are healthy.

        ``settings`` are ``NEXUS_*`` overrides in its environment (none by default).
        """
        port = free_port()
        config = self.workdir / f"{name}.toml"
        config.write_text(toml.replace("@PORT@", str(port)))
        argv = pinned(
            self.cpus.gateway,
            [twistd(), "-n", "--pidfile=", *extra, "nexus", "--config", str(config)],
        )
        env = clean_env()
        env.update(settings or {})
        env["BENCH_GC_FILE"] = str(self.workdir / f"{name}.gc.json")
        proc = self.procs.start(name, argv, env, path=[GCWATCH])

        def ready(answer: Any) -> bool:
            return bool(
                answer.get("status") == "healthy"
                and answer.get("backends", {}).get("healthy") == healthy
            )

        wait_until(proc, f"http://{HOST}:{port}/health", ready, 60, f"{name} to be healthy")
        return proc, port

    def gc_snapshot(self, proc: Proc) -> dict[str, Any] | None:
        """The gateway's garbage-collector totals (see benchmarks/_gcwatch), or None."""
        path = self.workdir / f"{proc.name}.gc.json"
        before = path.stat().st_mtime_ns if path.exists() else 0
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_mtime_ns != before:
                data: dict[str, Any] = json.loads(path.read_text())
                return data
            time.sleep(0.02)
        return None

    @contextlib.contextmanager
    def background_wrk(
        self, url: str, connections: int, seconds: float, models: Sequence[str] = (MODEL,)
    ) -> Iterator[Callable[[], WrkResult]]:
        """wrk running in the background; call the yielded function to collect it."""
        popen = start_wrk(url, connections, seconds, self.cpus.load, models)
        try:
            yield lambda: finish_wrk(popen, seconds + 30)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()

    @contextlib.contextmanager
    def watch(self, phase: str | None, gw: Proc) -> Iterator[dict[str, float]]:
        """Measure how much of each CPU other programs used during the block.

        On the gateway's CPU everything but the gateway is foreign; on the load
        CPU everything but the mock, wrk, py-spy and this script. The yielded
        dict is filled in at the end of the block (and, with a ``phase`` name,
        kept for the report).
        """
        out: dict[str, float] = {}
        j0, t0 = cpu_jiffies(), time.monotonic()
        ours0 = self._our_load_cpu()
        gw0 = gw.cpu_seconds()
        yield out
        wall = time.monotonic() - t0
        busy = busy_between(j0, cpu_jiffies())
        if self.cpus.gateway is not None and self.cpus.load is not None and wall > 0:
            gw_share = (gw.cpu_seconds() - gw0) / wall
            ours = (self._our_load_cpu() - ours0) / wall
            out["gateway_cpu"] = max(0.0, busy[self.cpus.gateway] - gw_share)
            out["load_cpu"] = max(0.0, busy[self.cpus.load] - ours)
        if phase is not None:
            self.r.setdefault("foreign", {})[phase] = out

    def _our_load_cpu(self) -> float:
        """CPU seconds of everything this suite runs on the load CPU."""
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished wrk and py-spy runs
        total = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return total + (self.mock.cpu_seconds() if self.mock is not None else 0.0)

    # -- parts ----------------------------------------------------------------------------

    def machine(self) -> None:
        """What ran this benchmark."""

        def version(package: str) -> str:
            try:
                return importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                return "not installed"

        wrk_version = subprocess.run(
            ["wrk", "-v"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "nexus"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        busy = cpu_busy_fractions(1.0)
        self.r["machine"] = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "kernel": f"{platform.system()} {platform.release()}",
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "twisted": version("twisted"),
            "klein": version("klein"),
            "treq": version("treq"),
            "prometheus_client": version("prometheus_client"),
            "wrk": wrk_version[0].split(" Copyright")[0] if wrk_version else "wrk",
            "commit": commit + (" + uncommitted changes in nexus/" if dirty else ""),
            "busy_at_start": busy,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "pinning": (
                f"mock + wrk + clients on CPU {self.cpus.load}, "
                f"gateway alone on CPU {self.cpus.gateway}"
            )
            if self.cpus.gateway is not None
            else "not pinned (one CPU)",
        }
        if max(busy) > 0.10:
            self.notes.append(
                "Other processes kept a CPU "
                + ", ".join(f"{100 * b:.0f} %" for b in busy)
                + " busy just before the run: absolute figures are lower and noisier than on an "
                "idle machine (ratios within the run still compare like with like)."
            )

    def micro(self) -> None:
        """In-process micro-benchmarks of the metrics, the router and the request log."""
        from benchmarks import bench_metrics, bench_requestlog, bench_routing

        log("micro-benchmarks: metrics (record, render, stats) ...")
        if self.plan.micro_full:
            self.r["metrics"] = bench_metrics.run()
        else:
            small = bench_metrics.build(20)
            self.r["metrics"] = {
                **bench_metrics.bench_record(small),
                **bench_metrics.bench_render(small, "fleet20x10", repeat=10),
            }
        log("micro-benchmarks: routing ...")
        self.r["routing"] = bench_routing.run()
        log("micro-benchmarks: the request path in process ...")
        self.r["path"] = {
            kind: self.request_path(kind == "stream") for kind in ("chat", "stream")
        }
        log("micro-benchmarks: request log (build and write one event) ...")
        if self.plan.micro_full:
            self.r["request_log"] = bench_requestlog.run()
        else:
            self.r["request_log"] = bench_requestlog.run(calls=5_000)

    def request_path(self, stream: bool) -> dict[str, Any]:
        """benchmarks/bench_path.py on the gateway CPU, in its own process (it sets up logging)."""
        argv = pinned(
            self.cpus.gateway,
            [sys.executable, "-m", "benchmarks.bench_path", *(["--stream"] if stream else [])],
        )
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"bench_path failed:\n{done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def non_streaming(self, gw: Proc, gw_port: int) -> None:
        """wrk at c1/c16/c64, direct and through Nexus, interleaved, repeated."""
        self.r["non_streaming"] = self.direct_and_nexus(
            gw, gw_port, "/v1/chat/completions", "chat", CONCURRENCY, "non-streaming"
        )

    def lone_requests(self, gw: Proc, gw_port: int) -> None:
        """c1 again, but the client pauses LONE_PAUSE_MS after each answer.

        wrk at c1 sends the next request the moment an answer arrives, so what
        the gateway does after answering (the record, metrics, the log line)
        delays that next request and counts in its latency: c1 measures the
        whole CPU per request. A client that reads its answer first (a person,
        an agent between calls) waits only for the work before the answer.
        """
        self.r["lone_requests"] = self.direct_and_nexus(
            gw, gw_port, "/v1/chat/completions", "chat", (1,), "lone requests",
            pause_ms=LONE_PAUSE_MS,
        )

    def embeddings(self, gw: Proc, gw_port: int) -> None:
        """The same as ``non_streaming`` for ``POST /v1/embeddings``, at c1 and c64."""
        self.r["embeddings"] = self.direct_and_nexus(
            gw, gw_port, "/v1/embeddings", "embeddings", (1, 64), "embeddings"
        )

    def direct_and_nexus(
        self,
        gw: Proc,
        gw_port: int,
        path: str,
        endpoint: str,
        concurrency: Sequence[int],
        what: str,
        pause_ms: int = 0,
    ) -> dict[str, Any]:
        """wrk on ``path`` direct and through Nexus, interleaved, repeated; figures by key.

        ``pause_ms``: each connection waits that long after an answer (post.lua's knob).
        """
        plan = self.plan
        urls = {
            "direct": f"{self.mock_url}{path}",
            "nexus": f"http://{HOST}:{gw_port}{path}",
        }
        log(f"{what}: warming up ...")
        for url in urls.values():
            run_wrk(url, 16, plan.warm_s, self.cpus.load, endpoint=endpoint)
        # Per run: (wrk result, gateway CPU s, mock CPU s, wall s, foreign CPU shares).
        runs: dict[str, list[tuple[WrkResult, float, float, float, dict[str, float]]]] = {}
        assert self.mock is not None
        for rep in range(plan.reps):
            for c in concurrency:
                for target, url in urls.items():
                    log(f"{what}: {target} c{c} ({rep + 1}/{plan.reps}) ...")
                    gw0, mock0, t0 = gw.cpu_seconds(), self.mock.cpu_seconds(), time.monotonic()
                    with self.watch(None, gw) as foreign:
                        res = run_wrk(
                            url, c, plan.run_s, self.cpus.load, endpoint=endpoint,
                            pause_ms=pause_ms,
                        )
                    runs.setdefault(f"{target}/c{c}", []).append(
                        (
                            res,
                            gw.cpu_seconds() - gw0,
                            self.mock.cpu_seconds() - mock0,
                            time.monotonic() - t0,
                            foreign,
                        )
                    )
        out: dict[str, Any] = {}
        for key, all_runs in runs.items():
            # Other programs only ever slow a run down: when some runs had the CPUs to
            # themselves, the figures come from those.
            clean = [run for run in all_runs if _clean(run[4], key.startswith("direct"))]
            used = clean or all_runs
            results = [run[0] for run in used]
            requests = sum(r.requests for r in results)
            gw_cpu = sum(run[1] for run in used)
            mock_cpu = sum(run[2] for run in used)
            wall = sum(run[3] for run in used)
            out[key] = {
                "rps": median([r.rps for r in results]),
                "p50_ms": median([r.p50_ms for r in results]),
                "p99_ms": median([r.p99_ms for r in results]),
                "errors": sum(r.errors + r.bad_status for r, *_ in all_runs),
                "requests": requests,
                "gateway_cpu_us": 1e6 * gw_cpu / requests if requests else float("nan"),
                "mock_cpu_us": 1e6 * mock_cpu / requests if requests else float("nan"),
                "gateway_busy": gw_cpu / wall if wall else float("nan"),
                "all_rps": [run[0].rps for run in all_runs],
                "all_p50_ms": [run[0].p50_ms for run in all_runs],
                "runs": len(all_runs),
                "clean_runs": len(clean),
            }
        return out

    def request_log_c64(self, toml: str) -> None:
        """c64 non-streaming through a gateway with the request log on and one with it off.

        Both log JSON to their standard output, which the suite makes a file (the
        process's log); "off" is ``NEXUS_LOGGING_REQUESTS=false``. The two gateways run
        side by side on the gateway's CPU (the idle one only polls health every 5 s),
        and their runs are interleaved, in alternating order, like the other runs; twice
        as many as the others (at least two pairs), because the difference sought (10 %)
        is about the spread between two runs on a virtual machine.
        """
        plan = self.plan
        reps = max(2, 2 * plan.reps)
        variants = {
            "on": {"NEXUS_LOGGING_FORMAT": "json"},
            "off": {"NEXUS_LOGGING_FORMAT": "json", "NEXUS_LOGGING_REQUESTS": "false"},
        }
        gateways: dict[str, tuple[Proc, int]] = {}
        try:
            for name, settings in variants.items():
                log(f"request log: starting a gateway with the request log {name} ...")
                gateways[name] = self.start_gateway(
                    f"gateway-log-{name}", toml, 1, settings=settings
                )
            answered = dict.fromkeys(variants, 0)
            for name, (_gw, port) in gateways.items():
                warm = run_wrk(
                    f"http://{HOST}:{port}/v1/chat/completions", 64, plan.warm_s, self.cpus.load
                )
                answered[name] += warm.requests
            # Per run: (wrk result, gateway CPU s, wall s, log bytes written, foreign shares).
            runs: dict[str, list[tuple[WrkResult, float, float, int, dict[str, float]]]] = {
                name: [] for name in variants
            }
            for rep in range(reps):
                order = ("off", "on") if rep % 2 == 0 else ("on", "off")
                for name in order:
                    gw, port = gateways[name]
                    log(f"request log: c64, log {name} ({rep + 1}/{reps}) ...")
                    size0, cpu0, t0 = gw.log.stat().st_size, gw.cpu_seconds(), time.monotonic()
                    with self.watch(None, gw) as foreign:
                        res = run_wrk(
                            f"http://{HOST}:{port}/v1/chat/completions",
                            64,
                            plan.run_s,
                            self.cpus.load,
                        )
                    runs[name].append(
                        (
                            res,
                            gw.cpu_seconds() - cpu0,
                            time.monotonic() - t0,
                            gw.log.stat().st_size - size0,
                            foreign,
                        )
                    )
                    answered[name] += res.requests
            out: dict[str, Any] = {}
            for name, all_runs in runs.items():
                clean = [run for run in all_runs if _clean(run[4], direct=False)]
                used = clean or all_runs
                requests = sum(run[0].requests for run in used)
                gw, port = gateways[name]
                events = sum(
                    1 for line in gw.log.open(errors="replace") if '"nexus.requests"' in line
                )
                out[name] = {
                    "rps": median([run[0].rps for run in used]),
                    "p50_ms": median([run[0].p50_ms for run in used]),
                    "p99_ms": median([run[0].p99_ms for run in used]),
                    "gateway_cpu_us": 1e6 * sum(run[1] for run in used) / requests
                    if requests
                    else float("nan"),
                    "gateway_busy": sum(run[1] for run in used) / sum(run[2] for run in used),
                    "log_bytes_per_request": sum(run[3] for run in used) / requests
                    if requests
                    else float("nan"),
                    "events": events,
                    "answered": answered[name],
                    "dropped": _dropped_log_events(port),
                    "errors": sum(run[0].errors + run[0].bad_status for run in all_runs),
                    "all_rps": [run[0].rps for run in all_runs],
                    "all_cpu_us": [
                        1e6 * run[1] / run[0].requests if run[0].requests else float("nan")
                        for run in all_runs
                    ],
                    "runs": len(all_runs),
                    "clean_runs": len(clean),
                }
            out["ratio"] = out["on"]["rps"] / out["off"]["rps"]
            # Each repetition's two runs are next to each other in time: their ratio shows
            # how far one pair can be from the medians on this machine.
            out["pair_ratios"] = [
                on_run[0].rps / off_run[0].rps
                for on_run, off_run in zip(runs["on"], runs["off"], strict=True)
                if off_run[0].rps
            ]
            # The phase's noise row: other programs' share, averaged over the measured runs.
            every = [run for all_runs in runs.values() for run in all_runs]
            wall = sum(run[2] for run in every)
            self.r.setdefault("foreign", {})["request log"] = {
                key: sum(run[4].get(key, 0.0) * run[2] for run in every) / wall
                for key in ("gateway_cpu", "load_cpu")
                if wall and any(key in run[4] for run in every)
            }
            self.r["request_log_c64"] = out
        finally:
            for gw, _ in gateways.values():
                self.procs.stop(gw)

    def unpaced_streams(self, gw: Proc, gw_port: int) -> None:
        """wrk with ``stream: true`` at c16: streams per second, gateway CPU per event."""
        self.configure_mock(stream_chunks=STREAM_CHUNKS, stream_delay_ms=0)
        urls = {
            "direct": f"{self.mock_url}/v1/chat/completions",
            "nexus": f"http://{HOST}:{gw_port}/v1/chat/completions",
        }
        runs: dict[str, list[WrkResult]] = {"direct": [], "nexus": []}
        gw_cpu = 0.0
        for url in urls.values():
            run_wrk(url, 16, self.plan.warm_s, self.cpus.load, stream=True)
        for rep in range(self.plan.stream_reps):
            for target, url in urls.items():
                log(f"unpaced streams: {target} c16 ({rep + 1}/{self.plan.stream_reps}) ...")
                before = gw.cpu_seconds()
                runs[target].append(run_wrk(url, 16, self.plan.run_s, self.cpus.load, stream=True))
                if target == "nexus":
                    gw_cpu += gw.cpu_seconds() - before
        streams = sum(r.requests for r in runs["nexus"])
        self.r["unpaced"] = {
            "direct_sps": median([r.rps for r in runs["direct"]]),
            "nexus_sps": median([r.rps for r in runs["nexus"]]),
            "errors": sum(r.errors + r.bad_status for rs in runs.values() for r in rs),
            "cpu_per_stream_us": 1e6 * gw_cpu / streams if streams else float("nan"),
            "cpu_per_event_us": 1e6 * gw_cpu / (streams * STREAM_EVENTS)
            if streams
            else float("nan"),
        }

    def paced_streams(self, gw_port: int) -> None:
        """Events 20 ms apart: first-event latency and gaps, direct vs through Nexus."""
        self.configure_mock(stream_chunks=STREAM_CHUNKS, stream_delay_ms=PACED_DELAY_MS)
        plan = self.plan
        body = chat_body(stream=True)
        traces: dict[str, list[_clients.StreamTrace]] = {"direct": [], "nexus": []}
        ports = {"direct": self.mock_port, "nexus": gw_port}
        rounds = 2
        per_round = max(1, plan.paced_streams // rounds)
        stream_s = STREAM_EVENTS * PACED_DELAY_MS / 1000.0
        for r in range(rounds):
            for target, port in ports.items():
                log(f"paced streams: {target} ({r + 1}/{rounds}) ...")
                traces[target] += _clients.run_streams(
                    HOST,
                    port,
                    body,
                    per_round,
                    plan.paced_concurrency,
                    stagger_s=PACED_DELAY_MS / 1000.0 / plan.paced_concurrency,
                    deadline_s=stream_s * (per_round / plan.paced_concurrency + 2) + 10,
                )
        out: dict[str, Any] = {}
        for target, ts in traces.items():
            good = [t for t in ts if t.status == 200 and t.error is None]
            gaps = [g for t in good for g in t.gaps_ms()]
            out[target] = {
                "streams": len(ts),
                "ok": len(good),
                "events_per_stream": median([len(t.events) for t in good]),
                "first_event_ms": median(
                    [t.first_event_ms for t in good if t.first_event_ms is not None]
                ),
                "gap_median_ms": median(gaps),
                "gap_p99_ms": percentile(gaps, 99),
            }
        self.r["paced"] = out

    def held_streams(self, gw: Proc, gw_port: int) -> None:
        """1,000 slow streams open at once: resident memory per stream, CPU to keep them."""
        self.configure_mock(stream_chunks=600, stream_delay_ms=1000)
        body = chat_body(stream=True)
        held = _clients.HeldStreams()
        try:
            before = gw.rss_kb()
            log(f"held streams: opening {HELD_STREAMS} ...")
            live = held.open(HOST, gw_port, body, HELD_STREAMS, batch=100, deadline_s=90)
            held.pump(1.0)
            cpu0, t0 = gw.cpu_seconds(), time.monotonic()
            held.pump(3.0)
            busy = (gw.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            during = gw.rss_kb()
            live = held.live()
        finally:
            held.close()
        time.sleep(2.0)
        self.r["held"] = {
            "before_kb": before,
            "during_kb": during,
            "after_close_kb": gw.rss_kb(),
            "live": live,
            "per_stream_kb": (during - before) / live if live else float("nan"),
            "busy": busy,
        }
        if live < HELD_STREAMS:
            self.notes.append(f"Only {live} of {HELD_STREAMS} held streams were open at once.")
        self.configure_mock(stream_chunks=5, stream_delay_ms=0)

    def profile(self, gw: Proc, gw_port: int, toml: str) -> None:
        """Where the gateway's time goes at c64, non-streaming (py-spy, else cProfile)."""
        url = f"http://{HOST}:{gw_port}/v1/chat/completions"
        seconds = self.plan.profile_s
        raw = self.workdir / "profile-raw.txt"
        if self.profiler == "py-spy" or (self.profiler == "auto" and _profile.py_spy()):
            log(f"profile: py-spy on the gateway at c64 for {seconds:g}s ...")
            try:
                with self.background_wrk(url, 64, seconds + 2) as collect:
                    time.sleep(1.0)
                    prof = _profile.record_py_spy(gw.pid, seconds, raw, self.cpus.load)
                    wrk = collect()
                self.r["profile"] = {
                    "text": _profile.format_profile(prof),
                    "rps": wrk.rps,
                    "raw": raw.name,
                }
                return
            except (RuntimeError, BenchError) as e:
                self.notes.append(f"py-spy failed ({e}); profiled with cProfile instead.")
        log(f"profile: a second gateway under cProfile at c64 for {seconds:g}s ...")
        stats = self.workdir / "gateway.pstats"
        prof_gw, port = self.start_gateway(
            "gateway-cprofile",
            toml,
            1,
            extra=[f"--profile={stats}", "--profiler=cprofile", "--savestats"],
        )
        wrk = run_wrk(f"http://{HOST}:{port}/v1/chat/completions", 64, seconds, self.cpus.load)
        self.procs.stop(prof_gw, grace=30)
        if not stats.exists():
            self.notes.append("cProfile wrote no statistics; no profile in this run.")
            return
        self.r["profile"] = {
            "text": _profile.format_profile(_profile.summarize_pstats(stats)),
            "rps": wrk.rps,
            "raw": stats.name,
        }

    def fleet_scrapes(self) -> None:
        """Event-loop lag from /metrics scrapes under c16 load, with a 20 x 10 fleet.

        Two loads: "saturating" (the mock answers at once, the gateway's core is
        full, so every probe also queues behind requests) and "LLM-like" (the mock
        takes 50 ms per answer, c16 leaves the gateway slack, so a stall shows).
        """
        backends = [(f"fleet-backend-{i:02d}", self.mock_url) for i in range(FLEET_BACKENDS)]
        toml = gateway_toml(0, backends, FLEET_MODELS, strategy="round_robin")
        toml = toml.replace("tcp:0:", "tcp:@PORT@:")
        log(f"fleet: gateway with {FLEET_BACKENDS} backends x {len(FLEET_MODELS)} models ...")
        gw, port = self.start_gateway("gateway-fleet", toml, FLEET_BACKENDS)
        base = f"http://{HOST}:{port}"
        try:
            # Round robin over 20 backends per model: every (model, backend) pair gets traffic.
            log("fleet: traffic on every (model, backend) pair ...")
            run_wrk(
                f"{base}/v1/chat/completions",
                16,
                max(2.0, self.plan.warm_s * 2),
                self.cpus.load,
                models=FLEET_MODELS,
            )
            idle = self._scrape_times(base)
            lag: dict[str, Any] = {}
            with self.watch("scrapes", gw):
                for load in self.plan.lag_loads:
                    self.configure_mock(latency_ms=LLM_LATENCY_MS if load == "llm" else 0.0)
                    lag[load] = self._lag_runs(load, port)
            self.configure_mock(latency_ms=0.0)
            self.r["fleet"] = {"idle": idle, "lag": lag}
        finally:
            self.procs.stop(gw)

    def _lag_runs(self, load: str, port: int) -> dict[str, Any]:
        """Probe /health every 10 ms under c16: without scrapes, with text, as Prometheus."""
        url = f"http://{HOST}:{port}/v1/chat/completions"
        variants: dict[str, bytes | None] = {
            "none": None,
            "text": b"",
            "prometheus": b"Accept: "
            + _clients.PROMETHEUS_ACCEPT
            + b"\r\nAccept-Encoding: gzip\r\n",
        }
        acc: dict[str, dict[str, Any]] = {
            name: {"probe": [], "scrape": [], "rps": [], "errors": 0, "bytes": 0}
            for name in variants
        }
        seconds = self.plan.lag_s
        for rep in range(self.plan.lag_reps):
            for name, headers in variants.items():
                log(f"fleet: {load} c16 load, scrapes: {name} ({rep + 1}/{self.plan.lag_reps}) ...")
                with self.background_wrk(url, 16, seconds + 2, FLEET_MODELS) as collect:
                    time.sleep(1.0)
                    res = _clients.probe_lag(
                        HOST,
                        port,
                        seconds,
                        scrape_interval=None if headers is None else 0.100,
                        scrape_headers=headers or b"",
                    )
                    wrk = collect()
                a = acc[name]
                a["probe"] += res.probe_ms
                a["scrape"] += res.scrape_ms
                a["rps"].append(wrk.rps)
                a["errors"] += res.errors + wrk.errors + wrk.bad_status
                a["bytes"] = res.scrape_bytes
        return {
            name: {
                "probes": len(a["probe"]),
                "probe_p50_ms": median(a["probe"]),
                "probe_p99_ms": percentile(a["probe"], 99),
                "probe_max_ms": max(a["probe"], default=float("nan")),
                "scrapes": len(a["scrape"]),
                "scrape_p50_ms": median(a["scrape"]),
                "scrape_p99_ms": percentile(a["scrape"], 99),
                "scrape_bytes": a["bytes"],
                "rps": median(a["rps"]),
                "errors": a["errors"],
            }
            for name, a in acc.items()
        }

    @staticmethod
    def _scrape_times(base: str, n: int = 10) -> dict[str, Any]:
        """Median time of /metrics (text, and as Prometheus asks) and /v1/stats, no load."""
        import urllib.request

        def timed(path: str, headers: dict[str, str]) -> tuple[float, int]:
            times, size = [], 0
            for _ in range(n):
                req = urllib.request.Request(base + path, headers=headers)
                t0 = time.perf_counter()
                with urllib.request.urlopen(req, timeout=10) as resp:
                    size = len(resp.read())
                times.append((time.perf_counter() - t0) * 1000.0)
            return median(times), size

        text_ms, text_bytes = timed("/metrics", {})
        prom_ms, prom_bytes = timed(
            "/metrics", {"Accept": _clients.PROMETHEUS_ACCEPT.decode(), "Accept-Encoding": "gzip"}
        )
        stats_ms, stats_bytes = timed("/v1/stats", {})
        return {
            "text_ms": text_ms,
            "text_bytes": text_bytes,
            "prom_ms": prom_ms,
            "prom_bytes": prom_bytes,
            "stats_ms": stats_ms,
            "stats_bytes": stats_bytes,
        }

    # -- the whole run --------------------------------------------------------------------

    def run(self) -> None:
        """Every part, in an order that keeps each one's conditions clean."""
        self.machine()
        self.micro()
        self.start_mock()
        toml = gateway_toml(0, [("mock", self.mock_url)]).replace("tcp:0:", "tcp:@PORT@:")
        log("starting the gateway ...")
        gw, port = self.start_gateway("gateway", toml, 1)
        time.sleep(1.0)
        self.r["rss_idle_kb"] = gw.rss_kb()
        gc0, cpu0 = self.gc_snapshot(gw), gw.cpu_seconds()
        with self.watch("non-streaming", gw):
            self.non_streaming(gw, port)
            self.lone_requests(gw, port)
        gc1, cpu1 = self.gc_snapshot(gw), gw.cpu_seconds()
        if gc0 is not None and gc1 is not None:
            self.r["gc"] = gc_delta(gc0, gc1, cpu1 - cpu0)
        self.r["rss_after_load_kb"] = gw.rss_kb()
        with self.watch("embeddings", gw):
            self.embeddings(gw, port)
        with self.watch("streaming", gw):
            self.unpaced_streams(gw, port)
            self.paced_streams(port)
        self.held_streams(gw, port)
        if self.profiler != "none":
            self.configure_mock(stream_chunks=5, stream_delay_ms=0)
            self.profile(gw, port, toml)
        self.procs.stop(gw)
        self.request_log_c64(toml)
        from benchmarks import bench_dashboard

        log("dashboards: c64 with 0 and 20 open /v1/events streams ...")
        self.r["dashboard"] = bench_dashboard.run(
            self, self.plan.reps, self.plan.run_s, self.plan.warm_s
        )
        self.fleet_scrapes()
        from benchmarks import bench_workers

        log("workers: 1 and 2 workers, c64 and scrapes ...")
        self.r["workers"] = bench_workers.run(
            self, self.plan.reps + 1, self.plan.run_s, self.plan.warm_s,
            50 if self.plan is QUICK else 200,
        )


def _dropped_log_events(port: int) -> float:
    """``nexus_log_events_dropped_total`` of the gateway on ``port`` (NaN if unreadable)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith("nexus_log_events_dropped_total"):
            return float(line.split()[-1])
    return float("nan")


def gc_delta(before: dict[str, Any], after: dict[str, Any], cpu_s: float) -> dict[str, Any]:
    """Garbage collection between two snapshots: share of the CPU, counts, longest pause."""
    gens_before, gens_after = before["generations"], after["generations"]
    spent = sum(gens_after[g][1] - gens_before[g][1] for g in gens_after)
    return {
        "share": spent / cpu_s if cpu_s else float("nan"),
        "collections": [gens_after[g][0] - gens_before[g][0] for g in sorted(gens_after)],
        "collected": sum(gens_after[g][3] - gens_before[g][3] for g in gens_after),
        "longest_ms": 1000.0 * max(gens_after[g][2] for g in gens_after),
        "longest_gen2_ms": 1000.0 * gens_after["2"][2],
        "tracked": after["tracked"],
    }


# -- the report -------------------------------------------------------------------------------


def _f(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def _sf(value: float, digits: int = 2) -> str:
    """A signed figure: +0.25, -1.30."""
    if value != value:
        return "n/a"
    return f"{value:+,.{digits}f}"


def _met(ok: bool | None, *values: float) -> str:
    if ok is None or any(v != v for v in values):  # a NaN figure: not measured
        return "n/a"
    return "yes" if ok else "**no**"


def _get(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return float("nan")
        d = d[key]
    return d


def report(r: dict[str, Any], plan: Plan, notes: Sequence[str], quick: bool) -> str:
    """The markdown report: machine, then one table with every figure."""
    m = r["machine"]
    lines = [
        "# Nexus benchmark results",
        "",
        f"- Date: {m['date']}; mode: {'--quick' if quick else 'default'} "
        f"(wrk runs of {plan.run_s:g} s, median of {plan.reps} interleaved run(s))",
        f"- Machine: {m['nproc']} CPUs, {m['cpu']}; {m['kernel']}; "
        f"load average {' '.join(m['loadavg'])}; CPUs busy before the run: "
        + ", ".join(f"{100 * b:.0f} %" for b in m["busy_at_start"]),
        f"- Software: {m['python']}, Twisted {m['twisted']}, klein {m['klein']}, "
        f"treq {m['treq']}, prometheus_client {m['prometheus_client']}, {m['wrk']}",
        f"- Code: {m['commit']}",
        f"- Pinning: {m['pinning']}",
        "",
        "| area | measurement | direct | via Nexus | Nexus vs direct | target | met |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(
        area: str,
        what: str,
        direct: str = "",
        via: str = "",
        diff: str = "",
        target: str = "",
        met: str = "",
    ) -> None:
        lines.append(f"| {area} | {what} | {direct} | {via} | {diff} | {target} | {met} |")

    ns = r.get("non_streaming", {})
    area = "non-streaming"
    for c in CONCURRENCY:
        d, v = _get(ns, f"direct/c{c}", "rps"), _get(ns, f"nexus/c{c}", "rps")
        ratio = v / d if d else float("nan")
        target, met = ("≥ 0.40", _met(ratio >= 0.40, ratio)) if c == 64 else ("", "")
        row(area, f"req/s, c{c}", _f(d, 0), _f(v, 0), f"{_f(ratio)} of direct", target, met)
    for stat in ("p50", "p99"):
        for c in CONCURRENCY:
            d = _get(ns, f"direct/c{c}", f"{stat}_ms")
            v = _get(ns, f"nexus/c{c}", f"{stat}_ms")
            added = v - d
            target, met = (
                ("≤ +0.5 ms", _met(added <= 0.5, added)) if (stat, c) == ("p50", 1) else ("", "")
            )
            spread = ""
            if (stat, c) == ("p50", 1):
                # Direct and Nexus ran one after the other in each repetition: how far
                # one pair can be from the medians on this machine.
                direct_runs = _get(ns, "direct/c1", "all_p50_ms")
                nexus_runs = _get(ns, "nexus/c1", "all_p50_ms")
                pairs = (
                    [n - d for d, n in zip(direct_runs, nexus_runs, strict=False)]
                    if isinstance(direct_runs, list) and isinstance(nexus_runs, list)
                    else []
                )
                if pairs:
                    spread = f" (pairs of runs: {_sf(min(pairs))} to {_sf(max(pairs))})"
            row(
                area, f"{stat} latency, c{c} (ms)", _f(d), _f(v), f"{_sf(added)} ms{spread}",
                target, met,
            )
    lone = r.get("lone_requests", {})
    if lone:
        for stat in ("p50", "p99"):
            d, v = _get(lone, "direct/c1", f"{stat}_ms"), _get(lone, "nexus/c1", f"{stat}_ms")
            row(
                area,
                f"{stat} latency, c1 with a {LONE_PAUSE_MS} ms pause after each answer (ms)",
                _f(d), _f(v), f"{_sf(v - d)} ms",
            )
    row(
        area,
        "CPU per request at c64 (µs; direct: the mock's, Nexus: the gateway's)",
        _f(_get(ns, "direct/c64", "mock_cpu_us"), 0),
        _f(_get(ns, "nexus/c64", "gateway_cpu_us"), 0),
    )
    cap = 1e6 / _get(ns, "nexus/c64", "gateway_cpu_us")
    d64 = _get(ns, "direct/c64", "rps")
    row(
        area,
        "gateway capacity with a whole core (1 s / its CPU per request at c64), req/s",
        _f(d64, 0),
        _f(cap, 0),
        f"{_f(cap / d64)} of direct",
    )
    row(
        area,
        "gateway CPU busy at c16 / c64 (share of its core)",
        "",
        f"{_f(100 * _get(ns, 'nexus/c16', 'gateway_busy'), 0)} % / "
        f"{_f(100 * _get(ns, 'nexus/c64', 'gateway_busy'), 0)} %",
    )
    clean = sum(v.get("clean_runs", 0) for v in ns.values())
    total_runs = sum(v.get("runs", 0) for v in ns.values())
    row(
        area,
        "runs undisturbed by other programs (used when any; otherwise all are)",
        "",
        f"{clean} of {total_runs}",
    )
    gcd = r.get("gc")
    if gcd:
        row(
            area,
            "gateway CPU spent in garbage collection, all non-streaming runs "
            "(collections gen0/gen1/gen2; longest pause, CPU ms)",
            "",
            f"{_f(100 * gcd['share'], 0)} % ("
            + "/".join(str(n) for n in gcd["collections"])
            + f"; {_f(gcd['longest_ms'], 1)} ms)",
        )
        row(
            area,
            "objects freed only by the cycle collector, per request through Nexus",
            "",
            _f(
                gcd["collected"]
                / max(1, sum(v.get("requests", 0) for k, v in ns.items() if k.startswith("nexus"))),
                1,
            ),
        )
    errors = sum(v.get("errors", 0) for v in ns.values()) if ns else float("nan")
    row(area, "failed requests (socket errors + non-2xx), all runs", "", f"{errors}")

    em = r.get("embeddings", {})
    area = "embeddings"
    for c in (1, 64):
        d, v = _get(em, f"direct/c{c}", "rps"), _get(em, f"nexus/c{c}", "rps")
        ratio = v / d if d else float("nan")
        row(area, f"req/s, c{c} (POST /v1/embeddings, 2 inputs)", _f(d, 0), _f(v, 0),
            f"{_f(ratio)} of direct")
    d, v = _get(em, "direct/c1", "p50_ms"), _get(em, "nexus/c1", "p50_ms")
    row(area, "p50 latency, c1 (ms)", _f(d), _f(v), f"{_sf(v - d)} ms")
    row(
        area,
        "CPU per request at c64 (µs; direct: the mock's, Nexus: the gateway's)",
        _f(_get(em, "direct/c64", "mock_cpu_us"), 0),
        _f(_get(em, "nexus/c64", "gateway_cpu_us"), 0),
    )
    row(area, "failed requests (socket errors + non-2xx), all runs", "",
        str(sum(int(v.get("errors", 0)) for v in em.values())))

    area = "request log"
    rl = r.get("request_log_c64", {})
    on, off = _get(rl, "on", "rps"), _get(rl, "off", "rps")
    ratio = _get(rl, "ratio")
    pairs = rl.get("pair_ratios") or [float("nan")]
    row(
        area,
        "req/s, c64, non-streaming: log on (JSON, to the gateway's stdout file) / off",
        "",
        f"{_f(on, 0)} / {_f(off, 0)}",
        f"{_f(ratio)} of off (pairs of runs: {_f(min(pairs))} to {_f(max(pairs))})",
        "≥ 0.90 of off",
        _met(ratio >= 0.90, ratio),
    )
    cpu_on, cpu_off = _get(rl, "on", "gateway_cpu_us"), _get(rl, "off", "gateway_cpu_us")
    row(
        area,
        "gateway CPU per request at c64 (µs): log on / off",
        "",
        f"{_f(cpu_on, 0)} / {_f(cpu_off, 0)}",
        f"{_sf(cpu_on - cpu_off, 0)} µs",
    )
    row(
        area,
        "p50 / p99 latency at c64 (ms): log on; off",
        "",
        f"{_f(_get(rl, 'on', 'p50_ms'))} / {_f(_get(rl, 'on', 'p99_ms'))}; "
        f"{_f(_get(rl, 'off', 'p50_ms'))} / {_f(_get(rl, 'off', 'p99_ms'))}",
    )
    answered = _get(rl, "on", "answered")
    row(
        area,
        "log on: bytes written per request; events per request answered; events dropped",
        "",
        f"{_f(_get(rl, 'on', 'log_bytes_per_request'), 0)} B; "
        f"{_f(_get(rl, 'on', 'events') / answered if answered else float('nan'))}; "
        f"{_f(_get(rl, 'on', 'dropped'), 0)}",
    )
    row(
        area,
        "runs undisturbed by other programs (log on + off); failed requests",
        "",
        f"{_get(rl, 'on', 'clean_runs') + _get(rl, 'off', 'clean_runs')} of "
        f"{_get(rl, 'on', 'runs') + _get(rl, 'off', 'runs')}; "
        f"{_get(rl, 'on', 'errors') + _get(rl, 'off', 'errors')}",
    )

    area = "streaming"
    up = r.get("unpaced", {})
    d, v = _get(up, "direct_sps"), _get(up, "nexus_sps")
    row(
        area,
        f"unpaced streams/s, c16 ({STREAM_EVENTS} events each)",
        _f(d, 0),
        _f(v, 0),
        f"{_f(v / d if d else float('nan'))} of direct",
    )
    row(
        area,
        "gateway CPU per stream / per event (µs)",
        "",
        f"{_f(_get(up, 'cpu_per_stream_us'), 0)} / {_f(_get(up, 'cpu_per_event_us'), 1)}",
    )
    pc = r.get("paced", {})
    d, v = _get(pc, "direct", "first_event_ms"), _get(pc, "nexus", "first_event_ms")
    streams = f"{_get(pc, 'nexus', 'ok')} streams"
    row(
        area,
        f"paced ({PACED_DELAY_MS:g} ms apart, {streams}): first event, median (ms)",
        _f(d),
        _f(v),
        f"{_sf(v - d)} ms",
    )
    d, v = _get(pc, "direct", "gap_median_ms"), _get(pc, "nexus", "gap_median_ms")
    row(
        area,
        "paced: gap between events, median (ms)",
        _f(d, 3),
        _f(v, 3),
        f"{_sf(v - d, 3)} ms per event",
        "≤ +0.5 ms",
        _met(v - d <= 0.5, v - d),
    )
    d, v = _get(pc, "direct", "gap_p99_ms"), _get(pc, "nexus", "gap_p99_ms")
    row(area, "paced: gap between events, p99 (ms)", _f(d, 3), _f(v, 3), f"{_sf(v - d, 3)} ms")
    row(
        area,
        "paced: events per stream (median)",
        _f(_get(pc, "direct", "events_per_stream"), 0),
        _f(_get(pc, "nexus", "events_per_stream"), 0),
    )

    area = "memory"
    idle_mb = r.get("rss_idle_kb", float("nan")) / 1024
    row(
        area,
        "gateway RSS idle (MB)",
        "",
        _f(idle_mb, 1),
        "",
        "< 50 MB",
        _met(idle_mb < 50, idle_mb),
    )
    row(
        area,
        "gateway RSS after the non-streaming runs (MB)",
        "",
        _f(r.get("rss_after_load_kb", float("nan")) / 1024, 1),
    )
    held = r.get("held", {})
    row(
        area,
        f"gateway RSS with {_get(held, 'live')} slow streams open (MB)",
        "",
        _f(_get(held, "during_kb") / 1024, 1),
        "",
        "reported",
        "",
    )
    row(
        area,
        "memory per open stream (KB)",
        "",
        _f(_get(held, "per_stream_kb"), 1),
        "",
        "reported",
        "",
    )
    row(
        area,
        "gateway RSS 2 s after those streams closed (MB)",
        "",
        _f(_get(held, "after_close_kb") / 1024, 1),
    )
    row(
        area,
        "gateway CPU keeping them (1 event/s each; share of its core)",
        "",
        f"{_f(100 * _get(held, 'busy'), 0)} %",
    )

    area = "metrics (in-process)"
    mt = r.get("metrics", {})
    rec = _get(mt, "record_request_us")
    row(
        area,
        "record one request (µs): plain / tokens + TTFT / error",
        "",
        f"{_f(rec)} / {_f(_get(mt, 'record_request_tokens_ttft_us'))} / "
        f"{_f(_get(mt, 'record_request_error_us'))}",
        "",
        "≤ 5 µs",
        _met(
            max(rec, _get(mt, "record_request_tokens_ttft_us"), _get(mt, "record_request_error_us"))
            <= 5,
            rec,
        ),
    )
    dirty = _get(mt, "fleet20x10_render_text_all_dirty_ms")
    gl = _get(mt, "fleet20x10_generate_latest_ms")
    row(
        area,
        "/metrics render 20x10, every series changed (ms) vs generate_latest",
        _f(gl, 1) + " (generate_latest)",
        _f(dirty, 2),
        f"{_f(dirty / gl, 3)} of it",
        "≤ 0.10 of it",
        _met(dirty / gl <= 0.10, dirty / gl),
    )
    row(
        area,
        "/metrics render 20x10, steady (ms): text / OpenMetrics + gzip",
        "",
        f"{_f(_get(mt, 'fleet20x10_render_text_steady_ms'))} / "
        f"{_f(_get(mt, 'fleet20x10_render_openmetrics_gzip_steady_ms'))}",
    )
    st = _get(mt, "fleet20x10_stats_ms")
    row(
        area,
        "/v1/stats 20x10 (ms): median / p95",
        "",
        f"{_f(st)} / {_f(_get(mt, 'fleet20x10_stats_p95_ms'))}",
        "",
        "< 2 ms",
        _met(_get(mt, "fleet20x10_stats_p95_ms") < 2, _get(mt, "fleet20x10_stats_p95_ms")),
    )
    p95 = _get(mt, "fleet100x10_render_text_steady_p95_ms")
    row(
        area,
        "/metrics render 100x10, steady p95 (ms)",
        "",
        _f(p95),
        "",
        "< 1 ms (contract §7)",
        _met(p95 < 1, p95),
    )
    s100 = _get(mt, "fleet100x10_stats_ms")
    row(
        area,
        "/v1/stats 100x10, median (ms)",
        "",
        _f(s100),
        "",
        "< 2 ms (contract §7)",
        _met(s100 < 2, s100),
    )

    area = "request log (in-process)"
    lm = r.get("request_log", {})
    row(
        area,
        "build and write one event (µs per request): JSON / text, to a file; log off "
        "(history only)",
        "",
        f"{_f(_get(lm, 'json_file_us'), 1)} / {_f(_get(lm, 'text_file_us'), 1)}; "
        f"{_f(_get(lm, 'history_only_us'), 1)}",
    )
    row(
        area,
        "the same without the write (a file that keeps nothing), µs: JSON / text; "
        "bytes per event: JSON / text",
        "",
        f"{_f(_get(lm, 'json_no_write_us'), 1)} / {_f(_get(lm, 'text_no_write_us'), 1)}; "
        f"{_f(_get(lm, 'json_bytes_per_event'), 0)} / {_f(_get(lm, 'text_bytes_per_event'), 0)}",
    )

    area = "scrape under load (20x10 fleet)"
    fl = r.get("fleet", {})
    idle = fl.get("idle", {})
    row(
        area,
        "/metrics idle: text / as Prometheus asks (ms; KB)",
        "",
        f"{_f(_get(idle, 'text_ms'))} ({_f(_get(idle, 'text_bytes') / 1024, 0)} KB) / "
        f"{_f(_get(idle, 'prom_ms'))} ({_f(_get(idle, 'prom_bytes') / 1024, 0)} KB gzip)",
    )
    row(area, "/v1/stats over HTTP, idle (ms)", "", _f(_get(idle, "stats_ms")))
    loads = fl.get("lag", {})
    for load, label in (
        ("llm", f"c16, mock answering in {LLM_LATENCY_MS:g} ms"),
        ("saturating", "c16 saturating (mock answers at once)"),
    ):
        lag = loads.get(load)
        if lag is None:
            continue
        base99 = _get(lag, "none", "probe_p99_ms")
        for name, scrape in (
            ("none", "no scrapes"),
            ("text", "text scrape every 100 ms"),
            ("prometheus", "OpenMetrics+gzip scrape every 100 ms"),
        ):
            p99 = _get(lag, name, "probe_p99_ms")
            diff, target, met = "", "", ""
            if name != "none":
                diff = f"{_sf(p99 - base99)} ms p99"
                if load == "llm":
                    target, met = "< 5 ms", _met(p99 - base99 < 5, p99, base99)
            row(
                area,
                f"/health every 10 ms, {label}, {scrape}: p50 / p99 / max (ms)",
                "",
                f"{_f(_get(lag, name, 'probe_p50_ms'))} / {_f(p99)} / "
                f"{_f(_get(lag, name, 'probe_max_ms'))}",
                diff,
                target,
                met,
            )
        row(
            area,
            f"{label}: scrape time text / OpenMetrics+gzip, p50 (p99) (ms)",
            "",
            f"{_f(_get(lag, 'text', 'scrape_p50_ms'))} ({_f(_get(lag, 'text', 'scrape_p99_ms'))})"
            f" / {_f(_get(lag, 'prometheus', 'scrape_p50_ms'))} "
            f"({_f(_get(lag, 'prometheus', 'scrape_p99_ms'))})",
        )
        row(
            area,
            f"{label}: req/s with no scrapes / text / OpenMetrics+gzip scrapes",
            "",
            " / ".join(_f(_get(lag, n, "rps"), 0) for n in ("none", "text", "prometheus")),
        )

    area = "noise"
    for phase, shares in r.get("foreign", {}).items():
        row(
            area,
            f"CPU used by other programs during the {phase} runs: gateway's CPU / load CPU",
            "",
            f"{_f(100 * shares.get('gateway_cpu', float('nan')), 0)} % / "
            f"{_f(100 * shares.get('load_cpu', float('nan')), 0)} %",
        )

    area = "routing (in-process)"
    rt = r.get("routing", {})
    row(
        area,
        "µs per decision, 100 backends x 20 models",
        "",
        ", ".join(f"{k} {_f(v)}" for k, v in rt.items()),
    )

    area = "request path (in-process)"
    path = r.get("path", {})
    for kind, what in (("chat", "a chat completion"), ("stream", "a 50-event stream")):
        figures = path.get(kind, {})
        row(
            area,
            f"gateway CPU per request without sockets, {what}: least / median of 20 rounds (µs)",
            "",
            f"{_f(figures.get('us_per_request', float('nan')), 0)} / "
            f"{_f(figures.get('median_us', float('nan')), 0)}",
        )

    lines.append("")
    notes = list(notes)
    for phase, shares in r.get("foreign", {}).items():
        if shares.get("gateway_cpu", 0.0) > 0.10:
            notes.append(
                f"Other programs used {100 * shares['gateway_cpu']:.0f} % of the gateway's CPU "
                f"during the {phase} runs: the gateway's figures there are pessimistic."
            )
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    prof = r.get("profile")
    if prof:
        lines += [
            "## Profile of the gateway at c64, non-streaming",
            "",
            f"(wrk throughput while sampled: {_f(prof['rps'], 0)} req/s; raw data: "
            f"`benchmarks/results/{prof['raw']}`)",
            "",
            prof["text"],
        ]
    return "\n".join(lines) + "\n"


# -- entry point ------------------------------------------------------------------------------


def ensure_wrk() -> None:
    """Install wrk through scripts/ensure-system-tools when it is missing."""
    if shutil.which("wrk"):
        return
    print(
        "bench: wrk is missing; installing it with scripts/ensure-system-tools "
        "(needs root or sudo) ...",
        file=sys.stderr,
    )
    subprocess.run([str(ROOT / "scripts" / "ensure-system-tools")], check=False, timeout=600)
    if not shutil.which("wrk"):
        raise BenchError(
            "wrk is not installed: run `apt-get install wrk` (Debian/Ubuntu) and try again"
        )


def wait_quiet(limit_s: float, busy: float = 0.10, window_s: float = 5.0) -> bool:
    """Wait until every CPU was at most ``busy`` busy for ``window_s``; False on timeout."""
    deadline = time.monotonic() + limit_s
    while True:
        fractions = cpu_busy_fractions(window_s)
        if max(fractions) <= busy:
            return True
        if time.monotonic() >= deadline:
            log("the machine did not get quiet; running anyway")
            return False
        log(
            "waiting for a quiet machine (CPUs busy: "
            + ", ".join(f"{100 * f:.0f} %" for f in fractions)
            + ") ..."
        )


def choose_cpus() -> Cpus:
    """CPU 0 for the load side, CPU 1 for the gateway, when there are two."""
    try:
        available = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return Cpus(None, None)
    if len(available) < 2 or shutil.which("taskset") is None:
        return Cpus(None, None)
    return Cpus(available[0], available[1])


def prepare_process() -> Any:
    """Pin this process (and so wrk and the clients) to the load CPU; raise its fd limit."""
    cpus = choose_cpus()
    if cpus.load is not None:
        os.sched_setaffinity(0, {cpus.load})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return cpus


def standalone(
    name: str,
    plan: Plan,
    output: Path,
    measure: Callable[[Suite], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> int:
    """Run one part of the suite on its own (``python -m benchmarks.bench_<name>``).

    ``measure`` gets a suite of its own (its processes stopped at the end, on an error
    or on Ctrl-C); ``render`` turns the figures into the report written to ``output``
    (and the figures to ``output`` as JSON). Returns the exit status.
    """
    try:
        ensure_wrk()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    cpus = prepare_process()
    workdir = Path(tempfile.mkdtemp(prefix=f"nexus-bench-{name}-"))
    started = time.monotonic()
    try:
        with terminate_on_sigterm(), Processes(workdir) as procs:
            r = measure(Suite(procs, plan, cpus, workdir, profiler="none"))
    except BenchError as e:
        print(f"bench: {e} (logs in {workdir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    shutil.rmtree(workdir, ignore_errors=True)
    text = render(r) + f"\nTotal time: {time.monotonic() - started:.0f} s.\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps(r, indent=1, default=str))
    print(text)
    log(f"report written to {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs, for a smoke test (about a minute and a half)",
    )
    parser.add_argument(
        "--profiler",
        choices=("auto", "py-spy", "cprofile", "none"),
        default="auto",
        help="how to profile the gateway at c64: py-spy samples the running gateway (the "
        "default when it is installed), cprofile runs a second gateway under twistd's "
        "--profiler cprofile, none skips it",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "latest.md",
        help="where to write the markdown report (default: %(default)s)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="interleaved repetitions of each non-streaming run (default: 3; --quick: 1)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait (at most SECONDS) until no CPU is more than 10%% busy for 5 s, "
        "for a machine shared with other jobs",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (configs, process logs, raw profile)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else DEFAULT
    if args.reps is not None:
        plan = attrs.evolve(plan, reps=max(1, args.reps))
    try:
        ensure_wrk()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    cpus = prepare_process()
    workdir = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    started = time.monotonic()
    failed = False
    try:
        with terminate_on_sigterm(), Processes(workdir) as procs:
            suite = Suite(procs, plan, cpus, workdir, profiler=args.profiler)
            try:
                suite.run()
            except BenchError as e:
                failed = True
                suite.notes.append(f"The run stopped early: {e}")
                print(f"bench: {e}", file=sys.stderr)
        text = report(suite.r, plan, suite.notes, args.quick)
        if suite.r.get("dashboard"):
            from benchmarks import bench_dashboard

            text += "\n## Open dashboards\n\n" + bench_dashboard.report(
                suite.r["dashboard"], plan.reps, plan.run_s
            )
        if suite.r.get("workers"):
            from benchmarks import bench_workers

            text += "\n## Workers\n\n" + bench_workers.report(suite.r["workers"])
        text += f"\nTotal time: {time.monotonic() - started:.0f} s.\n"
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(suite.r, indent=1, default=str))
        if suite.r.get("profile"):
            raw = workdir / suite.r["profile"]["raw"]
            if raw.exists():
                shutil.copy(raw, args.output.parent / raw.name)
        print(text)
        log(f"report written to {args.output}")
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep or failed:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
