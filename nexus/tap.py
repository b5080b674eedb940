"""``twistd nexus``: the command line, read before anything heavy is imported.

twistd imports this module to parse the options, then calls ``makeService``.
It imports no part of the gateway, nor the reactor, so that the options can
decide what to load: without TLS in the configuration, TLS support is left out
(``nexus.tls``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from twisted.python import usage

from nexus import __version__
from nexus.config import DEFAULT_LISTEN, ConfigError, load_config
from nexus.tls import leave_tls_out, needs_tls


class Options(usage.Options):
    """Command line of ``twistd nexus``."""

    synopsis = (
        "[--config nexus.toml] [--listen DESCRIPTION] [--workers N|auto] [--demo] [--no-discovery]"
    )
    optParameters = [
        ["config", "c", None,
         "TOML configuration file. Without one: demo mode (an embedded mock backend)."],
        ["listen", "l", None,
         f"Where to listen, a strports description (default {DEFAULT_LISTEN}); "
         "overrides server.listen."],
        ["workers", "w", None,
         "Worker processes serving requests: a number, or auto (one per CPU); "
         "overrides server.workers (default 1)."],
    ]
    optFlags = [
        ["demo", None, "Also start an embedded mock backend on 127.0.0.1."],
        ["no-discovery", None, "Do not look for backends on the network (mDNS); "
         "as discovery.enabled = false."],
    ]
    longdesc = (
        "Nexus: one OpenAI-compatible endpoint in front of a fleet of inference servers. "
        "Every setting, its default and its NEXUS_* environment variable: docs/configuration.md; "
        "faults, security and shutdown: docs/operations.md."
    )

    def opt_version(self) -> None:
        """Print the version of Nexus and exit."""
        import twisted

        print(f"nexus {__version__} (Twisted {twisted.__version__})")
        sys.exit(0)

    def postOptions(self) -> None:
        # Before twistd imports the reactor (which imports TLS support when installed).
        try:
            config, _ = load_config(self["config"])
        except ConfigError:
            return  # makeService reports it
        listen = self["listen"] or config.server.listen
        if not needs_tls(listen, [b.url for b in config.backends]):
            leave_tls_out()


def makeService(options: Mapping[str, Any], reactor: Any = None) -> Any:
    """Build the gateway's service tree (``nexus.service.makeService``)."""
    from nexus.service import makeService as make

    return make(options, reactor)
