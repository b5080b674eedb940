"""Garbage-collector accounting for a gateway started by the benchmark suite.

benchmarks/run.py puts this directory first on the gateway's PYTHONPATH, so
Python imports this module at start-up. It times every collection in CPU time
of the collecting thread and, on SIGUSR1, writes the totals as JSON to the
file named by BENCH_GC_FILE (the longest pauses then start over, so each dump
has the longest since the previous one). It changes nothing else.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time

_path = os.environ.get("BENCH_GC_FILE")
_started: list[float] = [0.0]
#: generation -> [collections, CPU seconds, longest CPU seconds, objects collected]
_totals: dict[int, list[float]] = {g: [0, 0.0, 0.0, 0] for g in range(3)}


def _callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.thread_time()
        return
    spent = time.thread_time() - _started[0]
    total = _totals[info["generation"]]
    total[0] += 1
    total[1] += spent
    total[2] = max(total[2], spent)
    total[3] += info["collected"]


def _dump(signum: int, frame: object) -> None:
    if _path:
        tmp = _path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"tracked": len(gc.get_objects()), "generations": _totals}, f)
        os.replace(tmp, _path)
    for total in _totals.values():
        total[2] = 0.0


if _path:
    gc.callbacks.append(_callback)
    signal.signal(signal.SIGUSR1, _dump)
