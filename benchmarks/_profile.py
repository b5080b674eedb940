"""Where the gateway's time goes: sample it with py-spy, or fall back to cProfile.

py-spy (``pip install py-spy``; attaching needs ptrace, i.e. root or
CAP_SYS_PTRACE) samples the running gateway from outside, so the profile is of
the real thing at almost no cost to it. Without py-spy, the suite starts a
second gateway under ``twistd --profile ... --profiler cprofile``, which is
slower (deterministic profiling) but needs nothing extra.
"""

from __future__ import annotations

import pstats
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import attrs

from benchmarks._procs import ROOT, pinned


@attrs.frozen
class ProfileEntry:
    """One function: share of samples (or time) spent in it and below it."""

    function: str
    own_pct: float
    cumulative_pct: float


@attrs.frozen
class Profile:
    """The top of a profile, by own time and by cumulative time."""

    tool: str
    samples: int
    by_own: list[ProfileEntry]
    by_cumulative: list[ProfileEntry]
    #: Own time grouped by layer of the stack (see ``layer``), in percent.
    by_layer: dict[str, float] = attrs.Factory(dict)


def py_spy() -> str | None:
    """The py-spy executable (next to this Python first, then on PATH), if any."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


_REACTOR_LOOP = "mainLoop (twisted/internet/base.py"
_SITE = re.compile(r"^.*/(?:site-packages|lib/python3\.\d+)/")


def _short(frame: str) -> str:
    """``func (path:line)`` with the path made short and readable."""
    name, _, where = frame.rpartition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    root = str(ROOT) + "/"
    if path.startswith(root):
        path = path[len(root) :]
    path = _SITE.sub("", path)
    return f"{name} ({path}:{line})"


#: (path prefix, layer) in order; the first match wins.
_LAYERS = (
    ("nexus/", "nexus (the gateway's own code)"),
    ("klein/", "klein + werkzeug (routing)"),
    ("werkzeug/", "klein + werkzeug (routing)"),
    ("twisted/internet/defer.py", "Deferreds and coroutines"),
    ("twisted/web/_newclient.py", "twisted.web client (Agent, pool)"),
    ("twisted/web/client.py", "twisted.web client (Agent, pool)"),
    ("twisted/web/http_headers.py", "twisted.web headers (both sides)"),
    ("twisted/web/", "twisted.web server (HTTPChannel, Request, Site)"),
    ("twisted/protocols/basic.py", "line parsing (LineReceiver, both sides)"),
    ("twisted/", "reactor, TCP, timers, log context"),
    ("json/", "json"),
    ("urllib/", "URL parsing (urllib)"),
    ("encodings/", "IDNA encoding"),
    ("prometheus_client/", "prometheus_client"),
)


def layer(path: str) -> str:
    """The layer a (shortened) source path belongs to."""
    for prefix, name in _LAYERS:
        if path.startswith(prefix):
            return name
    return "other (stdlib, zope, attrs, ...)"


def _path_of(label: str) -> str:
    """The path part of a ``func (path:line)`` label."""
    return label.rpartition(" (")[2].rpartition(":")[0]


def _layers(own: Counter[str], total: int) -> dict[str, float]:
    out: Counter[str] = Counter()
    for name, count in own.items():
        out[layer(_path_of(name))] += count
    return {name: 100.0 * count / total for name, count in out.most_common()} if total else {}


def summarize_collapsed(text: str, top: int = 15) -> Profile:
    """Own and cumulative shares per function from py-spy's raw (collapsed) output.

    Only the reactor thread's samples count (a thread-pool thread waiting for
    work is not idle to py-spy); shares are of the reactor thread's busy samples.
    """
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            stacks.append((stack.split(";"), int(count_text)))
    reactor = [s for s in stacks if any(_REACTOR_LOOP in f for f in s[0])]
    total = 0
    for frames, count in reactor or stacks:
        names = [_short(f) for f in frames]
        total += count
        own[names[-1]] += count
        for name in set(names):
            cumulative[name] += count
    return _top("py-spy", total, own, cumulative, top)


def _top(tool: str, total: int, own: Counter[str], cumulative: Counter[str], top: int) -> Profile:
    def entry(name: str) -> ProfileEntry:
        return ProfileEntry(name, 100.0 * own[name] / total, 100.0 * cumulative[name] / total)

    if not total:
        return Profile(tool, 0, [], [])
    # Frames on (nearly) every stack are the twistd runner and the reactor loop: no news.
    below_root = [(n, c) for n, c in cumulative.most_common() if c < 0.95 * total]
    return Profile(
        tool,
        total,
        [entry(name) for name, _ in own.most_common(top)],
        [entry(name) for name, _ in below_root[:top]],
        _layers(own, total),
    )


def record_py_spy(pid: int, seconds: float, output: Path, cpu: int | None) -> Profile:
    """Sample ``pid`` for ``seconds`` (100 Hz, by function).

    Each sample pauses the gateway for a moment: ``--nonblocking`` would not, but
    then py-spy reads stacks while they change and reports frames that are not there.
    """
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed")
    argv = pinned(
        cpu,
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            "100",
            "--format",
            "raw",
            "--function",
            "--output",
            str(output),
        ],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return summarize_collapsed(output.read_text())


def summarize_pstats(path: Path, top: int = 15) -> Profile:
    """Own (tottime) and cumulative shares per function from a cProfile dump."""
    stats = pstats.Stats(str(path))
    table = stats.stats  # type: ignore[attr-defined]

    # The reactor's own wait in epoll is idle time, not work: leave it out of the total.
    def idle(func: tuple[str, int, str]) -> bool:
        return "poll" in func[2] and func[0] == "~"

    total = sum(tt for func, (_, _, tt, _, _) in table.items() if not idle(func))
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    scale = 1_000_000
    for func, (_, _, tt, ct, _) in table.items():
        if idle(func):
            continue
        filename, line, name = func
        label = _short(f"{name} ({filename}:{line})") if filename != "~" else name
        own[label] += round(tt * scale)
        cumulative[label] += round(ct * scale)
    return _top("cProfile", round(total * scale), own, cumulative, top)


def format_profile(profile: Profile) -> str:
    """Two markdown tables: top by own time, top by cumulative time."""
    if not profile.samples:
        return "(no samples)\n"
    unit = "samples" if profile.tool == "py-spy" else "µs of CPU"
    out = [
        f"Profiler: {profile.tool}, {profile.samples} {unit} of the reactor thread (idle time "
        "excluded; the cumulative list leaves out the frames on every stack: twistd's runner and "
        "the reactor loop).",
        "",
    ]
    if profile.by_layer:
        how = (
            "C calls count for the Python function that made them"
            if profile.tool == "py-spy"
            else "C functions, such as socket calls, are under other"
        )
        out.append(f"Own time by layer ({how}):")
        out.append("")
        out.append("| layer | share % |")
        out.append("|---|---|")
        for name, pct in profile.by_layer.items():
            out.append(f"| {name} | {pct:.1f} |")
        out.append("")
    for title, entries in (("own", profile.by_own), ("cumulative", profile.by_cumulative)):
        out.append(f"Top {len(entries)} by {title} time:")
        out.append("")
        out.append("| # | function | own % | cumulative % |")
        out.append("|---|---|---|---|")
        for i, e in enumerate(entries, 1):
            fn = e.function.replace("|", "\\|")
            out.append(f"| {i} | `{fn}` | {e.own_pct:.1f} | {e.cumulative_pct:.1f} |")
        out.append("")
    return "\n".join(out)
