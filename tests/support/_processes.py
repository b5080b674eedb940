"""Starting ``twistd`` as a real process: the script, its environment, a free port."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

#: The repository root.
ROOT = Path(__file__).resolve().parents[2]
#: The twistd script of the environment running the tests (a list, to splat into argv).
TWISTD = [str(Path(sys.executable).parent / "twistd")]


def twistd_env() -> dict[str, str]:
    """The environment for twistd: the source tree first on the path, discovery off.

    Twisted's plugin scan looks only in ``sys.path`` directories, so an editable install would
    not find ``twisted/plugins/`` without it.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Discovery (on by default) would browse the network: a test that wants it turns it on,
    # on loopback (tests/test_discovery.py).
    env["NEXUS_DISCOVERY"] = "false"
    return env


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (for a process that needs a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
