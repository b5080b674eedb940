"""The gateway's log (contract section 8): its lines, where they go, and how twistd takes them.

Twisted's logging does the work; this module only chooses. ``observer_for`` builds the observer
twistd would have built from its ``--logfile`` and ``-n`` options (what a ``FileLogObserver``
behind a ``FilteringLogObserver`` for ``[logging] level`` does, in one ``GatewayLog``), but with
our line format (``text_line`` or ``json_line``) and a ``LogDestination`` that never raises and
never blocks the reactor.
``install`` hands it to twistd as the application's ``ILogObserver`` component, Twisted's
documented way to choose twistd's observer. docs/logging.md is the operator's side of it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

from nexus.config import LoggingConfig

#: The namespace of request events: one per finished request, its fields under ``request``.
REQUEST_NAMESPACE = "nexus.requests"

#: The counter that ``LogDestination.dropped`` is exposed as (named in the report line).
DROPPED_METRIC = "nexus_log_events_dropped_total"

#: Nesting kept in a JSON line; deeper values (or a cycle) are written as their ``repr``.
_MAX_DEPTH = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ---- lines


def json_line(event: LogEvent) -> str | None:
    """``event`` as one JSON object and a newline; None for an event with nothing to say.

    Keys: ``timestamp`` (RFC 3339, UTC, milliseconds), ``level``, ``namespace``, ``message``,
    ``failure`` (the traceback) when the event carries one, and the fields of a request event
    (its ``request`` mapping) as top-level keys. Never raises: a value JSON cannot hold is
    written as its ``repr``.
    """
    try:
        return _json_line(event)
    except Exception as e:  # a log line must never break the code that logs
        fallback = {
            "timestamp": _timestamp(None),
            "level": "error",
            "namespace": __name__,
            "message": f"unformattable log event: {_safe_repr(e)}",
        }
        return json.dumps(fallback) + "\n"


def _message(event: LogEvent) -> str:
    """``formatEvent(event)``, with a fast path for a format that is one plain field.

    The request log's events (one per request) are ``"{summary}"``: Twisted's
    general formatter would parse the format every time, half of an event's cost.
    """
    fmt = event.get("log_format")
    if fmt.__class__ is str:
        name = _ONE_FIELD.get(fmt)
        if name is None and fmt not in _ONE_FIELD:
            match = _ONE_FIELD_RE.fullmatch(fmt)
            name = _ONE_FIELD[fmt] = match[1] if match else None
        if name is not None:
            value = event.get(name)
            if value.__class__ is str:
                return value
    return formatEvent(event)


#: Formats seen so far -> the field they consist of (None: a general format).
_ONE_FIELD: dict[str, str | None] = {}
_ONE_FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _json_line(event: LogEvent) -> str | None:
    message = _message(event)
    failure = event.get("log_failure")
    request = event.get("request")
    if not message and failure is None and not isinstance(request, Mapping):
        return None  # like the text format: an event without a format is not a line
    level = getattr(event.get("log_level"), "name", None)  # a LogLevel constant
    namespace = event.get("log_namespace")
    out: dict[str, Any] = {
        "timestamp": _timestamp(event.get("log_time")),
        "level": level if isinstance(level, str) else None,
        "namespace": namespace if namespace is None else str(namespace),
        "message": message,
    }
    if failure is not None:
        out["failure"] = _traceback(failure)
    if isinstance(request, Mapping):
        # The four keys above always mean what they say; a request's keys are strings.
        if request.__class__ is dict and not request.keys() & out.keys():
            out.update(request)  # a request event as the request log makes it: one C call
        else:
            for key, value in request.items():
                if key not in out:
                    out[key if key.__class__ is str else _key(key)] = value
    return _dumps(out) + "\n"


def text_line(event: LogEvent) -> str | None:
    """``event`` in Twisted's classic format (what twistd writes); None when it has no text.

    ``2026-05-09T07:35:25+0000 [nexus.requests#info] 7f3c... llama3:8b -> gpu-1 200 ...``; a
    failure's traceback follows on tab-indented lines. A request event is always one line.
    """
    request = event.get("request")
    if isinstance(request, Mapping):
        # A request event, one per request: the classic format without its general machinery.
        level = getattr(event.get("log_level"), "name", "-")
        when = event.get("log_time")
        stamp = _classic_time(when) if isinstance(when, int | float) else "-"
        line = f"{stamp} [{event.get('log_namespace')}#{level}] {_message(event)}"
        # Its values come from clients (model names, error messages): no line breaks.
        return _CONTROL.sub(" ", line) + "\n"
    try:
        text = formatEventAsClassicLogText(event)
    except Exception as e:  # a log line must never break the code that logs
        return f"{_timestamp(None)} [{__name__}#error] unformattable log event: {_safe_repr(e)}\n"
    return text


def _timestamp(when: object) -> str:
    """``when`` (seconds since the epoch; now if unusable) as ``2026-05-09T07:35:25.123Z``."""
    try:
        if not isinstance(when, int | float) or not math.isfinite(when):
            when = time.time()
        seconds, millis = divmod(int(when * 1000), 1000)
        if seconds != _second[0]:
            _second[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
        return f"{_second[1]}.{millis:03d}Z"
    except (OverflowError, OSError, ValueError):
        return _timestamp(None)


#: The last second formatted by ``_timestamp`` and its text (one strftime per second).
_second: list[Any] = [None, ""]
#: The same for the classic text format's local time stamps.
_classic_second: list[Any] = [None, ""]


def _classic_time(when: float) -> str:
    """Twisted's classic time stamp (local time, whole seconds), formatted once a second."""
    second = int(when)
    if second != _classic_second[0]:
        _classic_second[:] = [second, formatTime(second)]
    return str(_classic_second[1])


def _traceback(failure: object) -> str:
    try:
        return str(failure.getTraceback())  # type: ignore[attr-defined]
    except Exception:
        return _safe_repr(failure)


#: Built once: ``json.dumps`` with arguments builds an encoder per call (half of its cost).
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, default=lambda value: _safe_repr(value)
)


def _dumps(obj: dict[str, Any]) -> str:
    """``obj`` as JSON text that is always valid and always encodable as UTF-8."""
    try:
        line = _ENCODER.encode(obj)
    except (TypeError, ValueError, RecursionError):
        # A key JSON cannot hold, NaN, a cycle or a huge integer: every value made plain first.
        obj = _plain(obj, 0)
        line = json.dumps(obj, ensure_ascii=False)
    if not line.isascii():
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON input allows "\ud800"): escape it
            line = json.dumps(_plain(obj, 0), ensure_ascii=True)
    return line


def _plain(value: object, depth: int) -> Any:
    """``value`` made of what JSON holds (str, finite numbers, lists, str-keyed dicts)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 1000 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth >= _MAX_DEPTH:
        return _safe_repr(value)
    if isinstance(value, Mapping):
        return {_key(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v, depth + 1) for v in value]
    return _safe_repr(value)


def _key(key: object) -> str:
    return key if isinstance(key, str) else _safe_repr(key)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


# ---- where the lines go


def _report_to_stderr(text: str) -> None:
    """Write ``text`` to the process's original standard error, if it can take it."""
    try:
        stream = sys.__stderr__
        if stream is not None:
            stream.write(text)
            stream.flush()
    except Exception:
        pass  # nowhere left to say it; the count in /metrics still says it


class LogDestination:
    """A file that log lines are written to; ``write`` never raises and never blocks.

    A line the file cannot take (disk full, closed file, a pipe whose reader is gone or has
    stopped reading) is dropped and counted in ``dropped``; the first failure is reported once,
    one line on the process's original standard error. When the file is a pipe or a socket
    (stdout under systemd or ``| tee``), its descriptor is made non-blocking and written with
    ``os.write``, so a reader that stops reading costs lines, never the gateway's time; a
    terminal or a regular file is written through the file object as it is (its descriptor may
    be shared with the shell that started the gateway).
    """

    def __init__(
        self,
        file: Any,
        name: str | None = None,
        report: Callable[[str], None] = _report_to_stderr,
    ) -> None:
        #: The file object written to (``sys.stdout``, a ``twisted.python.logfile.LogFile``...).
        self.file = file
        #: How the report names it: a path, or "standard output".
        self.name = name or str(getattr(file, "name", None) or repr(file))
        #: Lines dropped since the start.
        self.dropped = 0
        self._report = report
        self._reported = False
        self._lock = threading.Lock()  # events may come from threads; lines must not interleave
        self._pending = b""  # the rest of a line a full pipe took only part of
        self.fd = _nonblocking_descriptor(file)

    def write(self, text: str) -> None:
        """Write ``text`` (one or more whole lines) now, or drop it."""
        try:
            if not text.isascii():
                text = text.encode("utf-8", "backslashreplace").decode("utf-8")
            with self._lock:
                if self.fd is None:
                    self.file.write(text)
                    self.file.flush()
                else:
                    self._write_descriptor(text.encode("utf-8"))
        except Exception as e:  # OSError, ValueError (a closed file), whatever a file raises
            self._drop(e)

    def flush(self) -> None:
        """Nothing to do: ``write`` has already handed its text on (or dropped it)."""

    def _write_descriptor(self, data: bytes) -> None:
        fd = cast(int, self.fd)
        if self._pending:
            # A line already started goes first and whole, or the stream would mix two lines.
            self._pending = self._pending[_write_some(fd, self._pending) :]
            if self._pending:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        written = _write_some(fd, data)
        if written == 0:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        self._pending = data[written:]

    def _drop(self, error: Exception) -> None:
        self.dropped += 1
        if self._reported:
            return
        self._reported = True
        self._report(
            f"nexus: cannot write the log to {self.name}: {_reason(error)}; log lines are "
            f"dropped while this lasts and counted in {DROPPED_METRIC}\n"
        )


def _write_some(fd: int, data: bytes) -> int:
    """Write as much of ``data`` as the non-blocking ``fd`` takes now; how much it took."""
    view = memoryview(data)
    written = 0
    while written < len(data):
        try:
            written += os.write(fd, view[written:])
        except BlockingIOError:
            break
    return written


def _nonblocking_descriptor(file: Any) -> int | None:
    """``file``'s descriptor, made non-blocking, when it is a pipe or a socket; else None."""
    try:
        fd = file.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):  # no descriptor: pytest's capture, LogFile
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return None
    try:
        file.flush()  # what the file object holds already goes out first
    except (OSError, ValueError):
        pass
    try:
        os.set_blocking(fd, False)
    except OSError:
        return None
    return int(fd)


def _reason(error: Exception) -> str:
    if isinstance(error, BlockingIOError):
        return "the reader is not keeping up (pipe or socket full)"
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno)
    return str(error) or type(error).__name__


# ---- the observer, and twistd


@implementer(ILogObserver)
class GatewayLog:
    """The gateway's log observer, the destination it writes to, and its settings.

    One observer does what a ``FilteringLogObserver`` with a
    ``LogLevelFilterPredicate`` in front of a ``FileLogObserver`` would (events
    below the level, or without a level or a namespace, are not written), in
    one call and one set lookup: it runs once per request. The format and the
    level can change while the gateway runs (a configuration reload):
    ``reconfigure`` swaps them between two events.
    """

    def __init__(self, destination: LogDestination, config: LoggingConfig) -> None:
        self.destination = destination
        self._line = _line_for(config)
        self._levels = _levels_from(config.level)
        #: What twistd installs (this object: an ``ILogObserver``).
        self.observer = cast(ILogObserver, self)

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") not in self._levels or not event.get("log_namespace"):
            return
        text = self._line(event)
        if text:
            self.destination.write(text)

    def reconfigure(self, config: LoggingConfig) -> None:
        """Write in ``config``'s format, at ``config``'s level, from the next event on."""
        self._line = _line_for(config)
        self._levels = _levels_from(config.level)


def _levels_from(name: str) -> frozenset[Any]:
    """The levels written at ``[logging] level = name``: that one and the ones above it."""
    least = LogLevel.levelWithName(name)
    return frozenset(level for level in LogLevel.iterconstants() if level >= least)


def _line_for(config: LoggingConfig) -> Callable[[LogEvent], str | None]:
    return json_line if config.format == "json" else text_line


def make_observer(destination: LogDestination, config: LoggingConfig) -> ILogObserver:
    """An observer writing events of ``config.level`` and above to ``destination``.

    Lines are ``json_line`` or ``text_line`` as ``config.format`` says.
    """
    return GatewayLog(destination, config).observer


#: How a log destination names the process's standard output.
STANDARD_OUTPUT = "standard output"


def observer_for(options: Mapping[str, Any], config: LoggingConfig) -> GatewayLog | None:
    """The log twistd would have set up from its ``options``, in ``config``'s format and level.

    ``options`` is twistd's ``ServerOptions`` (a plugin's ``options.parent``; a dict will do):
    ``--logfile=-``, or ``-n`` without ``--logfile``, writes to standard output; otherwise
    ``--logfile`` (default ``twistd.log``) is a ``LogFile`` (rotated at 1 MB, and on SIGUSR1,
    as twistd does). None where twistd's own choice should stand: ``--syslog``, ``--logger``,
    and ``--logfile=-`` without ``-n`` (which twistd refuses). A log file that cannot be
    opened stops start-up with one line.
    """
    if options.get("syslog") or options.get("logger"):
        return None
    name = options.get("logfile") or ""
    nodaemon = bool(options.get("nodaemon"))
    if name == "-" and not nodaemon:
        return None  # twistd exits with "Daemons cannot log to stdout"
    if name == "-" or (nodaemon and not name):
        destination = LogDestination(sys.stdout, STANDARD_OUTPUT)
    else:
        try:
            log_file = LogFile.fromFullPath(name or "twistd.log")
        except OSError as e:
            reason = e.strerror or e
            raise SystemExit(f"nexus: cannot open the log file {name!r}: {reason}") from None
        _rotate_on_sigusr1(log_file)
        destination = LogDestination(log_file, log_file.path)
    return GatewayLog(destination, config)


def _rotate_on_sigusr1(log_file: LogFile) -> None:
    """Rotate ``log_file`` on SIGUSR1 unless the signal is taken, as twistd does for its own."""
    try:
        if signal.getsignal(signal.SIGUSR1):
            return

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    except (AttributeError, ValueError):  # no SIGUSR1 here, or not the main thread
        pass


def install(application: Componentized, observer: ILogObserver) -> None:
    """Make ``observer`` twistd's log observer for ``application``.

    twistd's ``AppLogger.start`` begins logging with the application's ``ILogObserver``
    component when it has one (a ``--logger`` option still wins), instead of the observer it
    builds from its options. twistd creates the application after ``makeService``: call this
    from the service's ``setServiceParent``, which receives the application itself.
    """
    application.setComponent(ILogObserver, observer)
