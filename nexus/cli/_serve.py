"""``nexus serve``: ``twistd -n nexus`` run in this process, no pid file unless asked.

twistd's own runner does the work (its logging, signals, reactor, exit by the signal that
stopped it), with one difference: it is given the gateway's plugin directly instead of
scanning ``twisted/plugins`` on ``sys.path``, so ``nexus serve`` also works where that scan
cannot see the plugin (an editable install run from another directory).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from nexus.cli._errors import CommandError


def serve(gateway_args: Sequence[str], pidfile: str | None) -> None:
    """Run the gateway until it is stopped; the same as ``twistd -n nexus ARGS``."""
    from twisted.python import usage
    from twisted.scripts.twistd import ServerOptions, runApp

    maker = importlib.import_module("twisted.plugins.nexus_plugin").nexus

    class Options(ServerOptions):
        # The gateway's plugin, found without a plugin scan.
        @staticmethod
        def _getPlugins(interface: Any, package: Any = None) -> list[Any]:
            return [maker]

    options = Options()
    argv = ["--nodaemon", f"--pidfile={pidfile or ''}", "nexus", *gateway_args]
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        raise CommandError(f"{e} (nexus serve --help lists the options)") from None
    # twistd's logging takes over sys.stdout and sys.stderr; a failure is reported on the real
    # standard error.
    stdout, stderr = sys.stdout, sys.stderr
    try:
        runApp(options)
    except SystemExit as e:
        # The gateway stops start-up with SystemExit("nexus: <one line>").
        if isinstance(e.code, str):
            raise CommandError(e.code.removeprefix("nexus: ")) from None
        raise
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def gateway_options() -> list[tuple[str, str]]:
    """The options of ``twistd nexus`` as (``--name VALUE``, help) pairs, for ``--help``."""
    from nexus.tap import Options

    rows: list[tuple[str, str]] = []
    parameters: list[Any] = list(Options.optParameters)
    for long, short, _default, doc in parameters:
        names = f"-{short}, --{long}" if short else f"--{long}"
        rows.append((f"{names} {long.upper()}", doc))
    flags: list[Any] = list(Options.optFlags)
    for long, short, doc in flags:
        rows.append((f"-{short}, --{long}" if short else f"--{long}", doc))
    rows.append(("--version", "Print the version of Nexus and exit."))
    return rows
