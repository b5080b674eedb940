"""Benchmark: prometheus_client's multiprocess mode as the way to one metrics view.

The alternative to our own design for "one exact metrics view across worker
processes": every worker records into mmap files under
``PROMETHEUS_MULTIPROC_DIR`` and whoever serves ``/metrics`` merges all of them
with ``prometheus_client.multiprocess.MultiProcessCollector``. Two figures,
comparable with ``bench_metrics``:

1. the recording cost of one finished request in a worker (the counter, the
   duration histogram and the token histogram twice), in multiprocess mode and,
   for reference, in normal single-process mode; with labelled children looked
   up once and cached, and with ``.labels(...)`` on every request;
2. the scrape cost of a 20 backends x 10 models fleet written by 2 worker
   processes, merged by a third: first scrape in a fresh process, scrapes while
   the workers keep writing between scrapes, and repeated scrapes of unchanged
   ("warm") files, and the merge alone (``collect()`` without formatting); plus a
   single-process ``generate_latest`` of the same series for reference (run with
   ``PROMETHEUS_DISABLE_CREATED_SERIES`` so that it exports the same samples:
   multiprocess mode has no ``_created``). Scrape times come with the scraping
   process's CPU time, to tell a slow scrape from a descheduled one.

Every measurement runs in a fresh interpreter (``python -c`` importing this
module's ``_child``) because the mode is chosen when ``prometheus_client`` is
imported: ``values.ValueClass`` is picked once, from the environment, at import
time. This module therefore never imports ``prometheus_client`` at top level.

How multiprocess mode works (prometheus_client 0.26, ``values.py``,
``mmap_dict.py``, ``multiprocess.py``):

* Storage. Each process has one file per metric type, named
  ``counter_<pid>.db``, ``histogram_<pid>.db``, ``summary_<pid>.db`` and, for
  gauges, ``gauge_<mode>_<pid>.db``. A file is an ``MmapedDict``: a 4-byte
  "used" length, then entries of (4-byte key length, UTF-8 key padded to 8
  bytes, two doubles: value and timestamp). The key is
  ``json.dumps([metric_name, sample_name, labels, help], sort_keys=True)``. Files
  start at 64 KiB and double (``truncate`` + a new ``mmap``) when full. Every
  sample is its own entry: a histogram child holds ``_sum`` and one entry per
  bucket (``+Inf`` included, non-cumulative); ``_count`` is not stored, it is
  the sum of the buckets at scrape time. ``_created`` is never stored, so it is
  never exported.
* Creating a child (first ``.labels(...)`` of a label set) creates a
  ``MmapedValue`` per sample: it builds the JSON key and appends the entry to
  the mmap (``_init_value``), or, if the key is already in the file (a reused
  pid), reads back the value stored there.
* Each ``inc``/``set``: takes one process-wide ``threading.Lock`` (shared by
  every value of the process; there is no cross-process lock, because no file
  is written by two processes), calls ``os.getpid()`` (a real syscall) to
  detect a fork (after a fork every value is re-created in files named after
  the new pid, starting from what they hold, normally nothing), adds to a
  Python float and writes both doubles into the mmap with a 16-byte slice
  assignment (``struct.pack`` of value and timestamp). No ``write``/``msync``:
  the shared page cache makes the bytes visible to readers, with nothing
  synchronising reader and writer (the slice assignment replaced
  ``struct.pack_into``, which briefly wrote zeros). A histogram ``observe`` is
  two such writes (``_sum`` and one bucket), a counter ``inc`` one, so one
  request here is 7 locked mmap writes and 7 ``getpid`` calls.
* A scrape (``MultiProcessCollector.collect``) globs ``*.db``, reads each whole
  file with ``read()`` (first page, then up to "used"; the mmap is not used for
  reading), ``json.loads`` every distinct key (cached only within one scrape, so
  the same series in two workers' files is decoded once per scrape, but every
  scrape decodes all of them again), builds a ``Metric`` per family with one
  sample per entry per file, then merges: counters and histogram ``_sum`` are
  summed across pids, histogram buckets are summed per ``le`` (parsed back with
  ``float()``), re-sorted, accumulated and re-formatted with
  ``floatToGoString``, ``_count`` is the last cumulative bucket; gauges are
  combined by their ``multiprocess_mode``. Then ``generate_latest`` formats the
  text as usual. Nothing is kept between scrapes: cost grows with series x
  files, i.e. with the number of pids that ever wrote.
* Gauges. ``multiprocess_mode`` is one of ``all`` (one series per pid, with a
  ``pid`` label; the default), ``liveall``, ``min``/``livemin``,
  ``max``/``livemax``, ``sum``/``livesum``, ``mostrecent``/``livemostrecent``.
  ``set_function`` is not supported (nothing would be written to the file).
* Dead processes. Nothing removes a dead process's files by itself. Counter,
  histogram and summary files stay and keep being summed, which is what keeps
  counters monotonic across worker restarts, but the directory grows with every
  pid that ever ran (and every scrape reads all of it); a new process that gets
  a reused pid reopens the old file and continues from the stored values.
  ``mark_process_dead(pid)`` (to be called by the supervisor, e.g. gunicorn's
  ``child_exit``) only deletes that pid's ``gauge_live*`` files; gauges in
  ``all``/``min``/``max``/``sum``/``mostrecent`` modes keep the dead process's
  last value (``all`` keeps its ``pid`` series). The directory must be wiped
  before the application starts, or the previous run's values are merged in.
* Limitations (documented): custom collectors do not work; the registry given to
  ``MultiProcessCollector`` exports only what is in the files, so any collector
  that computes samples at scrape time from in-process state (like the
  scrape-time gauges of our renderer, or the process/platform/gc collectors)
  sees only the scraping process, never the workers. Also: registries cannot
  be used as normal (every instantiated metric is exported), no
  ``Info``/``Enum``, no exemplars, no ``pid`` label on gauges, no
  ``remove``/``clear`` of label sets (the entries stay in the files), no
  pushgateway.

Run with ``python -m benchmarks.bench_multiprocess`` from the repository root
(``--quick`` for fewer iterations); ``run()`` returns the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent

DURATION_BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
TOKEN_BUCKETS: tuple[float, ...] = (
    10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0,
    16000.0, 32000.0, 64000.0, 128000.0,
)
BACKENDS = 20
MODELS = 10
WORKERS = 2
RECORD_REQUESTS = 50_000
RECORD_REPEATS = 3
SCRAPES = 50
FRESH_SCRAPERS = 5
#: Requests each worker records on every (model, backend) pair before the scrapes
#: (one in ten with status 500, which records no tokens).
PER_PAIR = 20
#: Requests each worker records between two "live" scrapes.
BATCH = 200
QUICK = {"requests": 5_000, "repeats": 2, "scrapes": 10, "fresh": 2}
CHILD = "import sys; from benchmarks.bench_multiprocess import _child; _child(sys.argv[1:])"


# --- children (prometheus_client is imported only here) -----------------------------


class _Families:
    """The four families one finished request touches, as a worker defines them."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nexus_requests_total",
            "Finished client inference requests, by requested model, backend and HTTP status"
            " sent.",
            ("model", "backend", "status"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "nexus_request_duration_seconds",
            "Time from request arrival to the last response byte sent, in seconds.",
            ("model", "backend"),
            registry=self.registry,
            buckets=DURATION_BUCKETS,
        )
        self.tokens = Histogram(
            "nexus_tokens_total",
            "Tokens per request as reported by the response usage, by type (prompt or"
            " completion).",
            ("model", "backend", "type"),
            registry=self.registry,
            buckets=TOKEN_BUCKETS,
        )
        self.pending = Gauge(
            "nexus_pending_requests",
            "Requests in flight to each backend right now.",
            ("backend",),
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def record(self, model: str, backend: str, status: str, duration: float,
               prompt: int, completion: int) -> None:
        """One finished request, with ``.labels(...)`` lookups."""
        self.requests.labels(model, backend, status).inc()
        self.duration.labels(model, backend).observe(duration)
        if status == "200":
            self.tokens.labels(model, backend, "prompt").observe(prompt)
            self.tokens.labels(model, backend, "completion").observe(completion)


def _names(backends: int, models: int) -> tuple[list[str], list[str]]:
    return (
        [f"backend-{i:03d}" for i in range(backends)],
        [f"model-{i:02d}:{('7b', '13b', '70b')[i % 3]}" for i in range(models)],
    )


def _request(rng: random.Random, model: str, backend: str,
             status: str) -> tuple[str, str, str, float, int, int]:
    return (
        model,
        backend,
        status,
        rng.lognormvariate(0.5, 1.2),
        rng.randint(5, 20_000),
        rng.randint(1, 4_000),
    )


def _fill(fam: _Families, rng: random.Random, backends: list[str], models: list[str],
          per_pair: int) -> int:
    """Traffic on every (model, backend) pair and a pending gauge per backend."""
    total = 0
    for model in models:
        for backend in backends:
            for k in range(per_pair):
                fam.record(*_request(rng, model, backend, "500" if k % 10 == 9 else "200"))
                total += 1
    for backend in backends:
        fam.pending.labels(backend).set(rng.randint(0, 10))
    return total


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _child_record(params: dict[str, Any]) -> None:
    """Time ``requests`` finished requests, best of ``repeats``; print µs/request."""
    fam = _Families()
    backends, models = _names(BACKENDS, MODELS)
    rng = random.Random(0)
    pairs = [(m, b) for m in models for b in backends]
    reqs = [
        _request(rng, *rng.choice(pairs), "500" if rng.random() < 0.1 else "200")
        for _ in range(params["requests"])
    ]
    # Create every child (and its mmap entries) before timing.
    for model, backend in pairs:
        for status in ("200", "500"):
            fam.requests.labels(model, backend, status)
        fam.duration.labels(model, backend)
        fam.tokens.labels(model, backend, "prompt")
        fam.tokens.labels(model, backend, "completion")
    requests, duration, tokens = fam.requests, fam.duration, fam.tokens
    best = math.inf
    if params["cached"]:
        cached = [
            (
                requests.labels(m, b, s),
                duration.labels(m, b),
                tokens.labels(m, b, "prompt"),
                tokens.labels(m, b, "completion"),
                d, p, c,
            )
            for m, b, s, d, p, c in reqs
        ]
        for _ in range(params["repeats"]):
            start = time.perf_counter()
            for rc, dc, pc, cc, d, p, c in cached:
                rc.inc()
                dc.observe(d)
                pc.observe(p)
                cc.observe(c)
            best = min(best, time.perf_counter() - start)
    else:
        for _ in range(params["repeats"]):
            start = time.perf_counter()
            for m, b, s, d, p, c in reqs:
                requests.labels(m, b, s).inc()
                duration.labels(m, b).observe(d)
                tokens.labels(m, b, "prompt").observe(p)
                tokens.labels(m, b, "completion").observe(c)
            best = min(best, time.perf_counter() - start)
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    _emit({
        "us": best / len(reqs) * 1e6,
        "files": len(list(Path(path).glob("*.db"))) if path else 0,
    })


def _child_writer(params: dict[str, Any]) -> None:
    """A worker: fill the fleet's traffic, then record a batch per ``batch`` line."""
    fam = _Families()
    backends, models = _names(params["backends"], params["models"])
    rng = random.Random(1000 + params["index"])
    total = _fill(fam, rng, backends, models, params["per_pair"])
    _emit({"pid": os.getpid(), "requests": total})
    pending = {b: fam.pending.labels(b) for b in backends}
    for line in sys.stdin:
        if line.strip() != "batch":
            break
        for _ in range(params["batch"]):
            backend = rng.choice(backends)
            status = "500" if rng.random() < 0.1 else "200"
            fam.record(*_request(rng, rng.choice(models), backend, status))
            pending[backend].inc()
            pending[rng.choice(backends)].set(rng.randint(0, 10))
        total += params["batch"]
        _emit({"requests": total})


def _text_stats(text: bytes) -> dict[str, Any]:
    """Size, sample count and the merged request total of an exposition."""
    samples = 0
    requests = 0.0
    pending = 0
    for line in text.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        samples += 1
        if line.startswith("nexus_requests_total{"):
            requests += float(line.rsplit(" ", 1)[1])
        elif line.startswith("nexus_pending_requests{"):
            pending += 1
    return {"bytes": len(text), "samples": samples, "requests_total": requests,
            "pending_series": pending}


def _child_scraper(params: dict[str, Any]) -> None:
    """The process serving /metrics: merge every worker's files on each command."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    registry = CollectorRegistry()
    collector = MultiProcessCollector(registry)
    path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])

    def merge() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        list(collector.collect())
        return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3

    def scrape() -> tuple[float, float, bytes]:
        start, cpu = time.perf_counter(), time.process_time()
        text = generate_latest(registry)
        return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3, text

    _emit({"pid": os.getpid()})
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "dead":
            for pid in args:
                mark_process_dead(int(pid), str(path))
            cmd = "scrape"
        if cmd == "scrape":
            ms, cpu_ms, text = scrape()
            files = sorted(path.glob("*.db"))
            _emit({
                "ms": ms,
                "cpu_ms": cpu_ms,
                **_text_stats(text),
                "files": [f.name for f in files],
                "file_bytes": sum(f.stat().st_size for f in files),
            })
        elif cmd == "warm":
            times = [scrape()[:2] for _ in range(int(args[0]))]
            merges = [merge() for _ in range(int(args[0]))]
            _emit({"ms": [t[0] for t in times], "cpu_ms": [t[1] for t in times],
                   "merge_ms": [t[0] for t in merges], "merge_cpu_ms": [t[1] for t in merges]})
        else:
            break


def _child_reference(params: dict[str, Any]) -> None:
    """The same series recorded in one process, scraped by plain ``generate_latest``."""
    from prometheus_client import generate_latest

    fam = _Families()
    backends, models = _names(params["backends"], params["models"])
    for index in range(params["workers"]):
        _fill(fam, random.Random(1000 + index), backends, models, params["per_pair"])
    times: list[float] = []
    cpu_times: list[float] = []
    text = b""
    for _ in range(params["scrapes"]):
        start, cpu = time.perf_counter(), time.process_time()
        text = generate_latest(fam.registry)
        times.append((time.perf_counter() - start) * 1e3)
        cpu_times.append((time.process_time() - cpu) * 1e3)
    _emit({"ms": times, "cpu_ms": cpu_times, **_text_stats(text)})


def _child(argv: Sequence[str]) -> None:
    """Entry point of every child interpreter: ``<role> <json params>``."""
    roles = {
        "record": _child_record,
        "writer": _child_writer,
        "scraper": _child_scraper,
        "reference": _child_reference,
    }
    roles[argv[0]](json.loads(argv[1]))


# --- parent: starts the children, never imports prometheus_client -------------------


def _env(multiproc_dir: str | None, created: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir",
                 "PROMETHEUS_DISABLE_CREATED_SERIES"):
        env.pop(name, None)
    if multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    if not created:
        env["PROMETHEUS_DISABLE_CREATED_SERIES"] = "True"
    return env


def _argv(role: str, params: dict[str, Any]) -> list[str]:
    return [sys.executable, "-c", CHILD, role, json.dumps(params)]


def _run_child(role: str, params: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run a one-shot child to completion and return its JSON line."""
    done = subprocess.run(
        _argv(role, params), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
        check=True, timeout=900,
    )
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _start(role: str, params: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _argv(role, params), cwd=ROOT, env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, bufsize=1,
    )


def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out: IO[str] | None = proc.stdout
    assert out is not None
    line = out.readline()
    if not line:
        raise RuntimeError(f"child {proc.pid} exited early (rc={proc.wait()})")
    return dict(json.loads(line))


def _send(proc: subprocess.Popen[str], line: str) -> None:
    inp: IO[str] | None = proc.stdin
    assert inp is not None
    inp.write(line + "\n")
    inp.flush()


def _ask(proc: subprocess.Popen[str], line: str) -> dict[str, Any]:
    _send(proc, line)
    return _read(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Close the child's stdin (it then exits); kill it by pid if it does not."""
    if proc.poll() is None:
        try:
            _send(proc, "exit")
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def _pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _summary(times: Sequence[float], cpu_times: Sequence[float]) -> dict[str, float]:
    """Wall-clock percentiles, and the median CPU time of the scraping process."""
    return {
        "p50_ms": statistics.median(times),
        "p95_ms": _pct(times, 95),
        "max_ms": max(times),
        "cpu_p50_ms": statistics.median(cpu_times),
        "n": len(times),
    }


def measure_record(multiprocess: bool, cached: bool, *, requests: int = RECORD_REQUESTS,
                   repeats: int = RECORD_REPEATS) -> float:
    """µs to record one finished request in a fresh process (best of ``repeats``)."""
    params = {"cached": cached, "requests": requests, "repeats": repeats}
    if not multiprocess:
        return float(_run_child("record", params, _env(None))["us"])
    tmp = tempfile.mkdtemp(prefix="nexus-bench-mp-")
    try:
        result = _run_child("record", params, _env(tmp))
        if not result["files"]:
            raise RuntimeError("multiprocess mode wrote no files")
        return float(result["us"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_scrape(workers: int = WORKERS, backends: int = BACKENDS, models: int = MODELS,
                   scrapes: int = SCRAPES, *, fresh: int = FRESH_SCRAPERS) -> dict[str, Any]:
    """Merge-and-render cost of ``workers`` processes' files, scraped by another one."""
    tmp = tempfile.mkdtemp(prefix="nexus-bench-mp-")
    env = _env(tmp)
    procs: list[subprocess.Popen[str]] = []
    try:
        writers = [
            _start("writer", {"index": i, "backends": backends, "models": models,
                              "per_pair": PER_PAIR, "batch": BATCH}, env)
            for i in range(workers)
        ]
        procs.extend(writers)
        infos = [_read(w) for w in writers]
        pids = [int(info["pid"]) for info in infos]
        recorded = sum(int(info["requests"]) for info in infos)

        # First scrape of a process that never scraped before (files in page cache).
        first: list[float] = []
        first_cpu: list[float] = []
        first_stats: dict[str, Any] = {}
        for _ in range(fresh):
            scraper = _start("scraper", {}, env)
            procs.append(scraper)
            _read(scraper)
            first_stats = _ask(scraper, "scrape")
            first.append(float(first_stats["ms"]))
            first_cpu.append(float(first_stats["cpu_ms"]))
            _stop(scraper)

        # Live: every worker records a batch between two scrapes.
        scraper = _start("scraper", {}, env)
        procs.append(scraper)
        _read(scraper)
        live: list[float] = []
        live_cpu: list[float] = []
        live_stats: dict[str, Any] = {}
        for _ in range(scrapes):
            for w in writers:
                _send(w, "batch")
            recorded = sum(int(_read(w)["requests"]) for w in writers)
            live_stats = _ask(scraper, "scrape")
            live.append(float(live_stats["ms"]))
            live_cpu.append(float(live_stats["cpu_ms"]))

        # Warm: the same files, unchanged, scraped again and again.
        warm = _ask(scraper, f"warm {scrapes}")

        # The workers exit: their files stay and are still merged...
        for w in writers:
            _stop(w)
        after_exit = _ask(scraper, "scrape")
        # ... until the supervisor marks them dead (live* gauge files only).
        after_dead = _ask(scraper, "dead " + " ".join(map(str, pids)))
        _stop(scraper)

        reference = _run_child(
            "reference",
            {"workers": workers, "backends": backends, "models": models,
             "per_pair": PER_PAIR, "scrapes": scrapes},
            _env(None, created=False),
        )
        return {
            "workers": workers,
            "backends": backends,
            "models": models,
            "writer_pids": pids,
            "files": live_stats["files"],
            "file_bytes": live_stats["file_bytes"],
            "bytes": live_stats["bytes"],
            "samples": live_stats["samples"],
            "recorded_requests": recorded,
            "scraped_requests": live_stats["requests_total"],
            "first": {**_summary(first, first_cpu), "bytes": first_stats["bytes"],
                      "samples": first_stats["samples"]},
            "live": _summary(live, live_cpu),
            "warm": _summary(warm["ms"], warm["cpu_ms"]),
            "merge_only": _summary(warm["merge_ms"], warm["merge_cpu_ms"]),
            "after_exit": {k: after_exit[k] for k in
                           ("samples", "requests_total", "pending_series", "files")},
            "after_mark_dead": {k: after_dead[k] for k in
                                ("samples", "requests_total", "pending_series", "files")},
            "reference": {**_summary(reference["ms"], reference["cpu_ms"]),
                          "bytes": reference["bytes"], "samples": reference["samples"]},
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool = False) -> dict[str, Any]:
    """Every figure of this benchmark."""
    requests = QUICK["requests"] if quick else RECORD_REQUESTS
    repeats = QUICK["repeats"] if quick else RECORD_REPEATS
    scrapes = QUICK["scrapes"] if quick else SCRAPES
    fresh = QUICK["fresh"] if quick else FRESH_SCRAPERS
    record = {
        mode: {
            kind: measure_record(mode == "multiprocess", kind == "cached",
                                 requests=requests, repeats=repeats)
            for kind in ("cached", "labels")
        }
        for mode in ("multiprocess", "single")
    }
    return {
        "config": {"requests": requests, "repeats": repeats, "scrapes": scrapes,
                   "fresh_scrapers": fresh, "per_pair": PER_PAIR, "batch": BATCH,
                   "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "record": record,
        "scrape": measure_scrape(WORKERS, BACKENDS, MODELS, scrapes, fresh=fresh),
    }


def report(r: dict[str, Any]) -> str:
    """A short markdown report of ``run()``'s figures."""
    rec, s, cfg = r["record"], r["scrape"], r["config"]
    lines = [
        f"Recording one finished request (µs; best of {cfg['repeats']} x "
        f"{cfg['requests']:,} requests, fresh process each):",
        "",
        "| mode | cached children | `.labels(...)` each time |",
        "|---|---:|---:|",
    ]
    for mode, label in (("multiprocess", "multiprocess (mmap files)"),
                        ("single", "single process")):
        lines.append(f"| {label} | {rec[mode]['cached']:.2f} | {rec[mode]['labels']:.2f} |")
    lines += [
        "",
        f"Scrape of {s['backends']} backends x {s['models']} models, {s['workers']} workers "
        f"(pids {', '.join(map(str, s['writer_pids']))}), merged by a third process (ms):",
        "",
        "| scrape | p50 | p95 | max | CPU p50 | n | bytes | samples |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = (
        ("multiprocess, first scrape of a fresh process", s["first"], s["first"]),
        ("multiprocess, workers write between scrapes", s["live"], s),
        ("multiprocess, warm (unchanged files)", s["warm"], s),
        ("... of which the merge alone (`collect()`, no text)", s["merge_only"], None),
        ("single process `generate_latest` (reference)", s["reference"], s["reference"]),
    )
    for label, t, size in rows:
        sizes = f"{size['bytes']:,} | {size['samples']:,}" if size else "- | -"
        lines.append(
            f"| {label} | {t['p50_ms']:.1f} | {t['p95_ms']:.1f} | {t['max_ms']:.1f} "
            f"| {t['cpu_p50_ms']:.1f} | {t['n']} | {sizes} |"
        )
    exit_, dead = s["after_exit"], s["after_mark_dead"]
    lines += [
        "",
        f"- files: {len(s['files'])} ({', '.join(s['files'])}), "
        f"{s['file_bytes']:,} bytes on disk",
        f"- requests recorded {s['recorded_requests']:,}, scraped "
        f"{s['scraped_requests']:,.0f}",
        f"- after the workers exit: {exit_['samples']:,} samples, "
        f"{exit_['requests_total']:,.0f} requests, {exit_['pending_series']} pending series",
        f"- after `mark_process_dead`: {dead['samples']:,} samples, "
        f"{dead['requests_total']:,.0f} requests, {dead['pending_series']} pending series, "
        f"{len(dead['files'])} files",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--json", action="store_true", help="print the raw figures too")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    print(report(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
