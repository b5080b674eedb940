"""Processes for the benchmark suite: start, watch, measure and always stop them.

Everything here is synchronous and bounded in time. Every process is started in
its own session (so a Ctrl-C in the terminal reaches only the suite, which then
stops them itself) and is stopped by its PID: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "post.lua"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The suite cannot go on (a process died, a deadline passed, a tool is missing)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run under ``taskset -c cpu`` (unchanged when cpu is None)."""
    if cpu is None or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


@attrs.define
class Proc:
    """One started process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The process id (taskset execs the command, so it is the program's own)."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The end of the process's log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (``/proc/<pid>/stat`` utime + stime)."""
        return cpu_seconds(self.pid)

    def rss_kb(self) -> int:
        """Resident memory now (``VmRSS`` of ``/proc/<pid>/status``), in KiB."""
        return rss_kb(self.pid)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


class Processes:
    """Starts processes and guarantees they are stopped (use as a context manager)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        path: Sequence[Path] = (),
    ) -> Proc:
        """Start ``argv`` in its own session, output to ``<workdir>/<name>.log``.

        ``env`` replaces this process's environment; ``path`` goes first on
        PYTHONPATH, then the project root (where twistd finds our plugins).
        """
        log = self.workdir / f"{name}.log"
        full_env = dict(os.environ if env is None else env)
        entries = [*map(str, path), str(ROOT)]
        if full_env.get("PYTHONPATH"):
            entries.append(full_env["PYTHONPATH"])
        full_env["PYTHONPATH"] = os.pathsep.join(entries)
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=full_env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM ``proc`` by its PID, SIGKILL it after ``grace`` seconds."""
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.popen.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=grace)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        """Stop every process still running, newest first."""
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as e:  # keep stopping the others
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {e}", file=sys.stderr)


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit for the duration, so ``finally`` blocks run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- HTTP, the simple blocking kind (readiness checks, control API) ---------------------------


def http_json(url: str, body: object = None, timeout: float = 5.0) -> Any:
    """GET (or POST ``body`` as JSON to) ``url``; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until(proc: Proc, url: str, ready: Any, deadline_s: float, what: str) -> Any:
    """Poll ``url`` until ``ready(json)`` is true; fail if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        try:
            answer = http_json(url, timeout=1.0)
            if ready(answer):
                return answer
            last = answer
        except (OSError, ValueError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.1)
    raise BenchError(f"timed out after {deadline_s:.0f}s waiting for {what} (last: {last})")


# -- wrk --------------------------------------------------------------------------------------


@attrs.frozen
class WrkResult:
    """One wrk run: exact figures from post.lua's ``done`` hook."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    #: Non-2xx/3xx answers (counted by wrk among the requests).
    bad_status: int

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0


def parse_wrk(output: str) -> WrkResult:
    """Read the ``NEXUS_WRK {...}`` line that post.lua prints at the end."""
    for line in output.splitlines():
        if line.startswith("NEXUS_WRK "):
            d = json.loads(line[len("NEXUS_WRK ") :])
            return WrkResult(
                requests=d["requests"],
                seconds=d["duration_us"] / 1e6,
                p50_ms=d["p50_us"] / 1000.0,
                p90_ms=d["p90_us"] / 1000.0,
                p99_ms=d["p99_us"] / 1000.0,
                max_ms=d["max_us"] / 1000.0,
                errors=d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["timeouts"],
                bad_status=d["status_errors"],
            )
    raise BenchError(f"wrk printed no NEXUS_WRK line:\n{output[-2000:]}")


def wrk_argv(
    url: str, connections: int, seconds: float, cpu: int | None, timeout_s: float = 10.0
) -> list[str]:
    """The wrk command line for one run (one thread, latency distribution on)."""
    return pinned(
        cpu,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout_s:g}s",
            "--latency",
            "-s",
            str(LUA),
            url,
        ],
    )


def wrk_env(
    models: Sequence[str] = ("bench-model",),
    stream: bool = False,
    endpoint: str = "chat",
    pause_ms: int = 0,
) -> dict[str, str]:
    """Environment for post.lua's knobs."""
    env = dict(os.environ)
    env["NEXUS_BENCH_MODELS"] = ",".join(models)
    env["NEXUS_BENCH_STREAM"] = "1" if stream else "0"
    env["NEXUS_BENCH_ENDPOINT"] = endpoint
    env["NEXUS_BENCH_PAUSE_MS"] = str(pause_ms)
    return env


def run_wrk(
    url: str,
    connections: int,
    seconds: float,
    cpu: int | None,
    models: Sequence[str] = ("bench-model",),
    stream: bool = False,
    endpoint: str = "chat",
    pause_ms: int = 0,
) -> WrkResult:
    """Run wrk to completion (bounded) and parse its figures."""
    popen = start_wrk(url, connections, seconds, cpu, models, stream, endpoint, pause_ms)
    return finish_wrk(popen, seconds + 30)


def start_wrk(
    url: str,
    connections: int,
    seconds: float,
    cpu: int | None,
    models: Sequence[str] = ("bench-model",),
    stream: bool = False,
    endpoint: str = "chat",
    pause_ms: int = 0,
) -> subprocess.Popen[str]:
    """Start wrk in the background; finish with :func:`finish_wrk`."""
    return subprocess.Popen(
        wrk_argv(url, connections, seconds, cpu),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=wrk_env(models, stream, endpoint, pause_ms),
        start_new_session=True,
    )


def finish_wrk(popen: subprocess.Popen[str], timeout_s: float) -> WrkResult:
    """Wait (bounded) for a background wrk and parse it; kill it by PID on timeout."""
    try:
        out, _ = popen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        os.kill(popen.pid, signal.SIGKILL)
        popen.wait()
        raise BenchError("wrk did not finish in time") from e
    finally:
        if popen.poll() is None:
            os.kill(popen.pid, signal.SIGKILL)
            popen.wait()
    return parse_wrk(out)


# -- the machine ------------------------------------------------------------------------------


def cpu_jiffies() -> list[tuple[int, int]]:
    """(busy, total) clock ticks of each CPU since boot, from ``/proc/stat``."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                ticks = [int(v) for v in line.split()[1:9]]
                idle = ticks[3] + ticks[4]
                out.append((sum(ticks) - idle, sum(ticks)))
    return out


def busy_between(first: list[tuple[int, int]], second: list[tuple[int, int]]) -> list[float]:
    """How busy each CPU was between two :func:`cpu_jiffies` samples, 0..1."""
    out = []
    for (b0, t0), (b1, t1) in zip(first, second, strict=True):
        out.append((b1 - b0) / (t1 - t0) if t1 > t0 else 0.0)
    return out


def cpu_busy_fractions(seconds: float = 1.0) -> list[float]:
    """How busy each CPU was over the next ``seconds``, 0..1."""
    first = cpu_jiffies()
    time.sleep(seconds)
    return busy_between(first, cpu_jiffies())


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
