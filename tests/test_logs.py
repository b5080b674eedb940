"""Tests for nexus.logs: the lines, the destination that never blocks, and twistd's observer."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.application.app import AppLogger
from twisted.application.service import Application
from twisted.logger import (
    ILogObserver,
    LogBeginner,
    Logger,
    LoggingFile,
    LogLevel,
    LogPublisher,
)
from twisted.python import log as legacy
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface.verify import verifyObject

from nexus.config import LOG_LEVELS, LoggingConfig
from nexus.logs import (
    REQUEST_NAMESPACE,
    GatewayLog,
    LogDestination,
    install,
    json_line,
    make_observer,
    observer_for,
    text_line,
)
from tests.support import TWISTD, free_port, http_client, twistd_env, wait_for

#: RFC 3339, UTC, milliseconds.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

#: A finished request's fields (contract section 8), as the request log gives them.
REQUEST = {
    "request_id": "req-7f3c9a",
    "endpoint": "chat",
    "model": "gpt-4",
    "actual_model": "llama3:70b",
    "backend": "gpu-1",
    "backend_type": "vllm",
    "status_code": 200,
    "status": "success",
    "error_type": None,
    "error_message": None,
    "latency_ms": 812.5,
    "ttft_ms": 95.25,
    "tokens_prompt": 12,
    "tokens_completion": 48,
    "stream": True,
    "retry_count": 1,
    "route_reason": "alias gpt-4 -> llama3:70b; smart score 87.5",
    "fallback_from": None,
    "client": "10.0.0.7",
}
REQUEST_FORMAT = (
    "{request[request_id]} {request[model]} -> {request[backend]} {request[status_code]} "
    "{request[latency_ms]} ms"
)


def logged(emit: Any, namespace: str = "nexus.test") -> dict[str, Any]:
    """The one event that ``emit(log)`` makes through a real ``Logger``."""
    events: list[dict[str, Any]] = []
    emit(Logger(namespace=namespace, observer=events.append))
    (event,) = events
    return event


def parsed(event: dict[str, Any]) -> dict[str, Any]:
    """``json_line(event)``: one line, strict JSON (no NaN), an object."""
    line = json_line(event)
    assert line is not None and line.endswith("\n") and line.count("\n") == 1, line

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} is not JSON: {line}")

    value = json.loads(line, parse_constant=no_constants)
    assert isinstance(value, dict)
    return value


def failing(log: Logger) -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("request {n} failed", n=3)


# ---- json_line


def test_json_line_of_an_info_event() -> None:
    event = logged(lambda log: log.info("backend {name} is {state}", name="gpu-1", state="up"))
    line = parsed(event)
    assert line == {
        "timestamp": line["timestamp"],
        "level": "info",
        "namespace": "nexus.test",
        "message": "backend gpu-1 is up",
    }
    assert TIMESTAMP.match(line["timestamp"])
    assert list(line) == ["timestamp", "level", "namespace", "message"]


@pytest.mark.parametrize(
    ("log_time", "timestamp"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1767225600.25, "2026-01-01T00:00:00.250Z"),
        (1767225599.9999, "2025-12-31T23:59:59.999Z"),  # truncated, never a second ahead
    ],
)
def test_json_timestamp_is_the_event_time_in_utc(log_time: float, timestamp: str) -> None:
    event = logged(lambda log: log.warn("late"))
    event["log_time"] = log_time
    assert parsed(event)["timestamp"] == timestamp
    assert parsed(event)["level"] == "warn"


def test_json_line_of_a_failure_carries_the_traceback() -> None:
    line = parsed(logged(failing))
    assert (line["level"], line["message"]) == ("critical", "request 3 failed")
    assert line["failure"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError" in line["failure"]


def test_json_line_of_legacy_log_msg() -> None:
    events: list[dict[str, Any]] = []
    legacy.LogPublisher(publishPublisher=events.append).msg("(TCP Port 8000 Closed)")
    (event,) = events
    line = parsed(event)
    assert (line["level"], line["namespace"], line["message"]) == (
        "info",
        "log_legacy",
        "(TCP Port 8000 Closed)",
    )
    assert TIMESTAMP.match(line["timestamp"])


def test_json_line_of_legacy_log_err() -> None:
    events: list[dict[str, Any]] = []
    failure = Failure(ValueError("bad frame"))
    legacy.LogPublisher(publishPublisher=events.append).msg(
        failure=failure, why="Unhandled error", isError=1
    )
    line = parsed(events[0])
    assert line["level"] == "critical"
    assert line["message"].startswith("Unhandled error\n")
    assert "ValueError: bad frame" in line["message"]


def test_json_line_of_redirected_stdio() -> None:
    """What twistd makes of a print() once logging has begun: a log_io event."""
    events: list[dict[str, Any]] = []
    stdout = LoggingFile(Logger(namespace="stdout", observer=events.append))
    stdout.write("printed by a library\n")
    line = parsed(events[0])
    assert (line["namespace"], line["level"], line["message"]) == (
        "stdout",
        "info",
        "printed by a library",
    )


def test_json_line_of_a_request_event_has_its_fields_at_the_top() -> None:
    request = {**REQUEST, "route_reason": {"strategy": "smart", "scores": [87.5, {"b": 2}]}}
    event = logged(lambda log: log.info(REQUEST_FORMAT, request=request), REQUEST_NAMESPACE)
    line = parsed(event)
    assert line["namespace"] == "nexus.requests"
    assert line["message"] == "req-7f3c9a gpt-4 -> gpu-1 200 812.5 ms"
    for key, value in request.items():
        assert line[key] == value, key
    # Numbers are JSON numbers, never strings; nulls are nulls.
    assert isinstance(line["status_code"], int) and isinstance(line["latency_ms"], float)
    assert line["fallback_from"] is None and line["stream"] is True


def test_request_fields_never_replace_the_line_s_own_keys() -> None:
    request = {"message": "spoofed", "level": "critical", "request_id": "r"}
    event = logged(lambda log: log.info("done", request=request), REQUEST_NAMESPACE)
    line = parsed(event)
    assert (line["message"], line["level"], line["request_id"]) == ("done", "info", "r")


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


def _cycle() -> dict[str, Any]:
    loop: dict[str, Any] = {"name": "loop"}
    loop["self"] = loop
    return loop


ODD_VALUES: list[tuple[str, object, object]] = [
    # (what, value, how the JSON line holds it; None: only that the line is valid)
    ("nan", float("nan"), "nan"),
    ("infinity", float("inf"), "inf"),
    ("bytes", b"\x00\xff", repr(b"\x00\xff")),
    ("a set", {"b"}, repr({"b"})),
    ("an object", object(), None),
    ("an unprintable object", Unprintable(), "<unrepresentable Unprintable>"),
    ("a tuple key", {(1, 2): "x"}, {"(1, 2)": "x"}),
    ("a cycle", _cycle(), None),
    ("a lone surrogate", "bad \ud800 text", None),
    ("a huge integer", 10**5000, "<integer of 16610 bits>"),
    ("non-ASCII", "café → 東京", "café → 東京"),
]


@pytest.mark.parametrize(("what", "value", "shown"), ODD_VALUES, ids=[w for w, _, _ in ODD_VALUES])
def test_json_line_never_raises_on_odd_values(what: str, value: object, shown: object) -> None:
    event = logged(
        lambda log: log.info("odd {value!r}", value=value, request={"request_id": "r", "v": value}),
        REQUEST_NAMESPACE,
    )
    line = parsed(event)
    assert line["request_id"] == "r"
    if shown is not None:
        assert line["v"] == shown
    line_text = json_line(event)
    assert line_text is not None
    line_text.encode("utf-8")  # always writable as UTF-8


#: Values a request event might carry: JSON's own, and what JSON cannot hold.
ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included
    | st.text()  # lone surrogates included
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3)
    ),
    max_leaves=10,
)
JSON_SAFE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=8), ANY_VALUE, max_size=6))
def test_any_request_event_is_one_valid_json_line(request: dict[str, Any]) -> None:
    event = logged(lambda log: log.info("done", request=request), REQUEST_NAMESPACE)
    line = parsed(event)
    assert (line["message"], line["namespace"]) == ("done", "nexus.requests")
    line_text = json_line(event)
    assert line_text is not None
    line_text.encode("utf-8")


@given(st.dictionaries(st.text(max_size=8), JSON_SAFE, max_size=6))
def test_json_safe_request_fields_come_back_as_they_were(request: dict[str, Any]) -> None:
    event = logged(lambda log: log.info("done", request=request), REQUEST_NAMESPACE)
    line = parsed(event)
    own = {"timestamp", "level", "namespace", "message"}
    assert {k: v for k, v in line.items() if k not in own} == {
        k: v for k, v in request.items() if k not in own
    }


def test_an_event_without_text_is_no_line() -> None:
    event = logged(lambda log: log.info())
    assert json_line(event) is None
    assert text_line(event) is None


# ---- text_line


def test_text_line_is_twisted_s_classic_format() -> None:
    event = logged(lambda log: log.info("backend {name} is up", name="gpu-1"))
    line = text_line(event)
    assert line is not None
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[nexus\.test#info\] backend gpu-1 is up\n", line
    )


def test_text_line_of_a_request_event_is_one_readable_line() -> None:
    event = logged(lambda log: log.info(REQUEST_FORMAT, request=REQUEST), REQUEST_NAMESPACE)
    line = text_line(event)
    assert line is not None
    assert line.endswith(" [nexus.requests#info] req-7f3c9a gpt-4 -> gpu-1 200 812.5 ms\n")


def test_text_line_of_a_request_keeps_client_text_on_one_line() -> None:
    request = {**REQUEST, "model": "evil\n2026-01-01T00:00:00+0000 [nexus#info] forged"}
    event = logged(lambda log: log.info(REQUEST_FORMAT, request=request), REQUEST_NAMESPACE)
    line = text_line(event)
    assert line is not None and line.count("\n") == 1, line
    assert "req-7f3c9a evil 2026-01-01T00:00:00+0000 [nexus#info] forged -> gpu-1" in line


def test_text_line_of_a_failure_indents_the_traceback() -> None:
    line = text_line(logged(failing))
    assert line is not None
    first, *rest = line.rstrip("\n").split("\n")
    assert first.endswith("[nexus.test#critical] request 3 failed")
    assert rest[0] == "\tTraceback (most recent call last):"
    assert all(part.startswith("\t") for part in rest)


# ---- the destination


def reader_gone_pipe() -> tuple[io.TextIOWrapper, int]:
    read, write = os.pipe()
    os.close(read)
    return os.fdopen(write, "w"), write


def test_a_pipe_whose_reader_is_gone_drops_lines_and_says_so_once(
    capfd: pytest.CaptureFixture[str],
) -> None:
    file, fd = reader_gone_pipe()
    with file:
        destination = LogDestination(file, "standard output")
        assert destination.fd == fd
        for i in range(3):
            destination.write(f"line {i}\n")  # EPIPE: no exception, no SIGPIPE
        assert destination.dropped == 3
    report = capfd.readouterr().err
    assert report == (
        "nexus: cannot write the log to standard output: Broken pipe; log lines are dropped "
        "while this lasts and counted in nexus_log_events_dropped_total\n"
    )


def test_a_full_disk_drops_lines(capfd: pytest.CaptureFixture[str]) -> None:
    """``twistd -n nexus > /dev/full``: every write fails with ENOSPC."""
    file = open("/dev/full", "w")  # closed below, whatever it still holds
    try:
        destination = LogDestination(file)
        assert destination.fd is None  # a device, not a pipe: written through the file
        destination.write("one\n")
        destination.write("two\n")
        assert destination.dropped == 2
    finally:
        with suppress(OSError):
            file.close()
    assert capfd.readouterr().err.count("No space left on device") == 1


def test_a_log_file_on_a_full_disk_drops_lines(capfd: pytest.CaptureFixture[str]) -> None:
    """The same through ``--logfile``: twistd's LogFile, unbuffered."""
    log_file = LogFile.fromFullPath("/dev/full")
    destination = LogDestination(log_file, log_file.path)
    try:
        destination.write("one\n")
    finally:
        log_file.close()
    assert destination.dropped == 1
    assert "cannot write the log to /dev/full: No space left on device" in capfd.readouterr().err


def test_a_closed_file_drops_lines(capfd: pytest.CaptureFixture[str]) -> None:
    file = io.StringIO()
    destination = LogDestination(file, "a closed file")
    file.close()
    destination.write("one\n")
    assert destination.dropped == 1
    assert "a closed file: I/O operation on closed file" in capfd.readouterr().err


def test_a_pipe_nobody_reads_never_blocks(capfd: pytest.CaptureFixture[str]) -> None:
    read, write = os.pipe()
    file = os.fdopen(write, "w", closefd=False)
    try:
        destination = LogDestination(file, "standard output")
        assert os.get_blocking(write) is False  # else the loop below would hang
        # Lines longer than PIPE_BUF, so that a full pipe takes part of one.
        lines = [f"{i:04d} " + "x" * 5000 + "\n" for i in range(40)]
        for line in lines:
            destination.write(line)
        assert 0 < destination.dropped < len(lines)
        # The reader comes back: what it gets is whole lines, in order, none mixed.
        received = b""
        with suppress(BlockingIOError):
            os.set_blocking(read, False)
            while chunk := os.read(read, 1 << 16):
                received += chunk
        destination.write(lines[-1])  # the rest of a started line goes first, then this one
        with suppress(BlockingIOError):
            while chunk := os.read(read, 1 << 16):
                received += chunk
        got = received.decode().splitlines(keepends=True)
        assert all(line in lines for line in got), [line[:8] for line in got]
        assert got[-1] == lines[-1]
        assert len(got) == len(lines) - destination.dropped + 1
    finally:
        file.close()
        os.close(read)
        os.close(write)
    assert capfd.readouterr().err.count("the reader is not keeping up") == 1


def test_a_terminal_or_regular_file_is_left_blocking(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as file:
        destination = LogDestination(file)
        assert destination.fd is None
        assert os.get_blocking(file.fileno())
        destination.write("written\n")
    assert (tmp_path / "log").read_text() == "written\n"
    assert destination.dropped == 0


# ---- the observer: level and format


@pytest.mark.parametrize(
    ("level", "written"),
    [
        ("debug", ["debug", "info", "warn", "error", "critical"]),
        ("info", ["info", "warn", "error", "critical"]),
        ("warn", ["warn", "error", "critical"]),
        ("critical", ["critical"]),
    ],
)
def test_events_below_the_level_are_not_written(level: str, written: list[str]) -> None:
    out = io.StringIO()
    observer = make_observer(LogDestination(out), LoggingConfig(format="json", level=level))
    log = Logger(namespace="nexus.test", observer=observer)
    for name in ("debug", "info", "warn", "error", "critical"):
        log.emit(LogLevel.levelWithName(name), "a {name} event", name=name)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["level"] for line in lines] == written
    assert [line["message"] for line in lines] == [f"a {name} event" for name in written]


def test_text_format_writes_classic_lines() -> None:
    out = io.StringIO()
    observer = make_observer(LogDestination(out), LoggingConfig())
    Logger(namespace=REQUEST_NAMESPACE, observer=observer).info(REQUEST_FORMAT, request=REQUEST)
    assert out.getvalue().endswith("[nexus.requests#info] req-7f3c9a gpt-4 -> gpu-1 200 812.5 ms\n")


# ---- twistd's options: where the log goes


@pytest.fixture
def log_files() -> Iterator[list[GatewayLog | None]]:
    """Logs a test made; the files they opened are closed when it ends."""
    made: list[GatewayLog | None] = []
    yield made
    for log in made:
        if log is not None and isinstance(log.destination.file, LogFile):
            log.destination.file.close()


@pytest.fixture
def sigusr1() -> Iterator[None]:
    """Whatever SIGUSR1 did before the test, it does again after it."""
    before = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, before)


@pytest.mark.parametrize(
    "options",
    [{"nodaemon": True}, {"nodaemon": True, "logfile": "-"}, {"nodaemon": 1, "logfile": None}],
    ids=["-n", "-n --logfile=-", "-n as twistd parses it"],
)
def test_nodaemon_without_a_log_file_writes_to_stdout(options: dict[str, Any]) -> None:
    log = observer_for(options, LoggingConfig())
    assert isinstance(log, GatewayLog)
    assert log.destination.file is sys.stdout
    assert log.destination.name == "standard output"
    verifyObject(ILogObserver, log.observer)


@pytest.mark.parametrize("nodaemon", [True, False])
def test_a_log_file_option_writes_to_that_file(
    tmp_path: Path, nodaemon: bool, sigusr1: None, log_files: list[GatewayLog | None]
) -> None:
    path = tmp_path / "gateway.log"
    log = observer_for({"logfile": str(path), "nodaemon": nodaemon}, LoggingConfig(format="json"))
    log_files.append(log)
    assert log is not None
    assert isinstance(log.destination.file, LogFile)
    Logger(namespace="nexus.test", observer=log.observer).info("to the file")
    assert json.loads(path.read_text())["message"] == "to the file"
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)


def test_a_daemon_without_a_log_file_writes_twistd_log(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sigusr1: None,
    log_files: list[GatewayLog | None],
) -> None:
    monkeypatch.chdir(tmp_path)
    log = observer_for({}, LoggingConfig())
    log_files.append(log)
    assert log is not None
    Logger(namespace="nexus.test", observer=log.observer).info("daemon")
    assert "[nexus.test#info] daemon" in (tmp_path / "twistd.log").read_text()


def test_a_signal_handler_already_set_is_left_alone(
    tmp_path: Path, sigusr1: None, log_files: list[GatewayLog | None]
) -> None:
    def mine(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGUSR1, mine)
    log_files.append(observer_for({"logfile": str(tmp_path / "log")}, LoggingConfig()))
    assert signal.getsignal(signal.SIGUSR1) is mine


@pytest_twisted.ensureDeferred
async def test_sigusr1_rotates_the_log_file(
    tmp_path: Path, sigusr1: None, log_files: list[GatewayLog | None]
) -> None:
    path = tmp_path / "gateway.log"
    log = observer_for({"logfile": str(path)}, LoggingConfig())
    log_files.append(log)
    assert log is not None
    Logger(namespace="nexus.test", observer=log.observer).info("before")
    os.kill(os.getpid(), signal.SIGUSR1)
    rotated = tmp_path / "gateway.log.1"
    await wait_for(rotated.exists, what="gateway.log.1")
    Logger(namespace="nexus.test", observer=log.observer).info("after")
    assert "before" in rotated.read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()


@pytest.mark.parametrize(
    "options",
    [
        {"syslog": True, "nodaemon": True},
        {"logger": "my.observer.factory", "nodaemon": True},
        {"logfile": "-"},  # twistd itself refuses: "Daemons cannot log to stdout"
    ],
    ids=["--syslog", "--logger", "daemon --logfile=-"],
)
def test_twistd_s_own_choice_stands(options: dict[str, Any]) -> None:
    assert observer_for(options, LoggingConfig()) is None


def test_a_log_file_that_cannot_be_opened_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "gateway.log"
    with pytest.raises(SystemExit) as info:
        observer_for({"logfile": str(path)}, LoggingConfig())
    assert str(info.value) == (
        f"nexus: cannot open the log file {str(path)!r}: No such file or directory"
    )


# ---- install: twistd's AppLogger takes our observer


@pytest.fixture
def private_global_log(monkeypatch: pytest.MonkeyPatch) -> LogPublisher:
    """A global log publisher and beginner of the test's own, as twistd's AppLogger sees them.

    AppLogger.start begins logging for the whole process (and redirects stdio); here it does
    so on stand-ins, with stand-in stdio.
    """
    import twisted.logger
    import twisted.logger._global

    publisher = LogPublisher()
    stdio = SimpleNamespace(stdout=io.StringIO(), stderr=io.StringIO())
    beginner = LogBeginner(
        publisher, io.StringIO(), stdio, SimpleNamespace(showwarning=warnings.showwarning)
    )
    monkeypatch.setattr(twisted.logger, "globalLogBeginner", beginner)
    monkeypatch.setattr(twisted.logger, "globalLogPublisher", publisher)
    monkeypatch.setattr(twisted.logger._global, "globalLogPublisher", publisher)
    publisher.stdio = stdio  # type: ignore[attr-defined]  # for the test to print to
    return publisher


def test_install_makes_twistd_log_through_our_observer(
    tmp_path: Path, private_global_log: LogPublisher
) -> None:
    path = tmp_path / "gateway.log"
    log_file = LogFile.fromFullPath(str(path))
    destination = LogDestination(log_file, log_file.path)
    observer = make_observer(destination, LoggingConfig(format="json"))
    application = Application("nexus")
    install(application, observer)
    assert application.getComponent(ILogObserver) is observer

    # What twistd does with the options it parsed (-n and no --logfile: stdout otherwise).
    app_logger = AppLogger({"nodaemon": True, "logfile": ""})
    app_logger.start(application)
    Logger(namespace="nexus.test", observer=private_global_log).info("served")
    private_global_log.stdio.stdout.write("printed\n")  # type: ignore[attr-defined]
    legacy.LogPublisher(publishPublisher=private_global_log).msg("(TCP Port 8000 Closed)")
    app_logger.stop()
    log_file.close()

    # (twistd's own "starting up" lines: see the real twistd below.)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["namespace"], line["message"]) for line in lines] == [
        ("nexus.test", "served"),
        ("stdout", "printed"),
        ("log_legacy", "(TCP Port 8000 Closed)"),
    ]
    assert application.getComponent(ILogObserver) is observer
    assert observer not in private_global_log._observers  # stop() took it away


# ---- the real twistd


@pytest_twisted.ensureDeferred
async def test_twistd_json_log_is_json_from_start_to_shut_down(tmp_path: Path) -> None:
    """``twistd -n nexus`` with ``NEXUS_LOGGING_FORMAT=json``: every line, twistd's included."""
    port = free_port()
    env = {**twistd_env(), "NEXUS_LOGGING_FORMAT": "json"}
    process = subprocess.Popen(
        [*TWISTD, "--pidfile=", "-n", "nexus", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    client = http_client()
    tried: list[str] = []
    try:

        async def answered() -> bool:
            assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
            tried.append(f"trace-me-{len(tried)}")  # one id per try: a retry is another request
            try:
                response = await client.post(
                    url,
                    data=b'{"model": "demo", "messages": []}',
                    headers={"x-request-id": tried[-1]},
                )
                await response.content()
            except Exception:
                return False
            return bool(response.code == 200)

        await wait_for(answered, timeout=20, what="a demo completion")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    lines = [json.loads(line) for line in output.decode().splitlines()]
    for line in lines:
        assert TIMESTAMP.match(line["timestamp"]), line
        assert {"level", "namespace", "message"} <= line.keys(), line
    messages = [line["message"] for line in lines]
    assert any(m.startswith("twistd ") and m.endswith(" starting up.") for m in messages)
    assert messages[-1] == "Server Shut Down."
    requests = [line for line in lines if line.get("request_id") == tried[-1]]
    assert len(requests) == 1, lines
    assert requests[0]["namespace"] == "nexus.requests"
    assert (requests[0]["model"], requests[0]["status_code"]) == ("demo", 200)


def test_every_configurable_level_is_a_twisted_log_level() -> None:
    levels = [LogLevel.levelWithName(name) for name in LOG_LEVELS]
    assert levels == sorted(levels)  # lowest first, as the docs list them
