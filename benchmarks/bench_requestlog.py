"""Benchmark: what the request log costs per finished request.

``RequestLog.record`` turns a finished ``RequestRecord`` into its event, keeps it
in the ``/v1/history`` ring and, with the request log on, logs it. Here the event
goes through the chain twistd runs in the gateway: a ``twisted.logger`` publisher,
the observer ``nexus.logs.make_observer`` builds (level filter, ``FileLogObserver``
with ``json_line`` or ``text_line``) and a ``LogDestination`` over a real file on
disk, written and flushed once per event, as the gateway's standard output is when
it is a file. The records are shaped like the suite's c64 requests (a success, not
streamed, tokens counted) and built beforehand: the request path has its record
anyway.

Run with ``python -m benchmarks.bench_requestlog``; ``run()`` returns the numbers
for the benchmark suite.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger, LogPublisher

from nexus.config import LoggingConfig
from nexus.logs import LogDestination, make_observer
from nexus.requestlog import NAMESPACE, RequestLog
from nexus.tracking import RequestRecord

CALLS = 20_000
REPEAT = 5


def records(n: int) -> list[RequestRecord]:
    """``n`` finished records like the suite's non-streaming requests, distinct ids."""
    return [
        RequestRecord(
            started=0.0,
            request_id=os.urandom(16).hex(),
            client="127.0.0.1",
            model="bench-model",
            actual_model="bench-model",
            backend="mock",
            backend_type="openai",
            attempts=1,
            route_reason="smart:mock:100.0",
            prompt_tokens=42 + i % 7,
            completion_tokens=17 + i % 11,
            status=200,
            duration=0.035 + (i % 100) * 1e-4,
            finished=True,
        )
        for i in range(n)
    ]


class _Discard:
    """A file that takes every line and keeps none (the cost of the log without its write)."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def request_log(file: Any, fmt: str | None) -> RequestLog:
    """A request log writing to ``file`` in ``fmt`` (None: the log off, history only)."""
    log = RequestLog(log_requests=fmt is not None)
    if fmt is not None:
        observer = make_observer(LogDestination(file, "benchmark"), LoggingConfig(format=fmt))
        # twistd makes this observer the only one of the global publisher; a publisher of our
        # own gives the same chain without touching this process's global log.
        log._log = Logger(namespace=NAMESPACE, observer=LogPublisher(observer))
    return log


def _per_call_us(
    record: Callable[[RequestRecord], None],
    recs: list[RequestRecord],
    repeat: int,
    before: Callable[[], object],
) -> float:
    """µs per ``record`` call, best of ``repeat`` runs (``before`` runs untimed each time).

    The best run is the one least disturbed by anything else on the machine.
    """
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        for r in recs:
            record(r)
        times.append(time.perf_counter() - start)
    return min(times) / len(recs) * 1e6


def run(calls: int = CALLS, repeat: int = REPEAT) -> dict[str, float]:
    """µs per finished request for each variant, and bytes per logged event."""
    recs = records(calls)
    out: dict[str, float] = {}
    history = request_log(None, None)
    for r in recs[:1000]:  # warm up
        history.record(r)
    out["history_only_us"] = _per_call_us(history.record, recs, repeat, lambda: None)
    with tempfile.TemporaryDirectory(prefix="nexus-bench-log-") as tmp:
        for fmt in ("json", "text"):
            path = Path(tmp) / f"requests.{fmt}.log"
            with open(path, "w", encoding="utf-8") as file:
                log = request_log(file, fmt)
                for r in recs[:1000]:
                    log.record(r)

                def truncate(file: Any = file) -> None:
                    file.seek(0)
                    file.truncate()

                out[f"{fmt}_file_us"] = _per_call_us(log.record, recs, repeat, truncate)
                out[f"{fmt}_bytes_per_event"] = path.stat().st_size / calls
            discard = request_log(_Discard(), fmt)
            out[f"{fmt}_no_write_us"] = _per_call_us(discard.record, recs, repeat, lambda: None)
    return out


def main() -> None:
    """Print the numbers."""
    print(f"request log: {CALLS} finished requests, best of {REPEAT} runs")
    for name, value in run().items():
        print(f"  {name:24s} {value:9.2f}")


if __name__ == "__main__":
    main()
