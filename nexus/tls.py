"""TLS only when the configuration needs it.

Twisted imports pyOpenSSL and cryptography as soon as the reactor is imported
(when they are installed, and treq's ``twisted[tls]`` installs them), whether
or not anything speaks TLS: about 13 MB of a gateway's idle memory. Before the
reactor is imported, ``twistd nexus`` reads the configuration; when no backend
is ``https://`` and the gateway does not listen with ``ssl:``, it keeps those
modules from being imported at all (Twisted then runs without TLS support, as
on a machine without pyOpenSSL). A backend with an ``https://`` url added later
by a reload needs a restart.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

#: The top-level modules of TLS support that Twisted imports on its own.
TLS_MODULES = ("OpenSSL", "cryptography", "service_identity")


def needs_tls(listen: str, urls: Sequence[str]) -> bool:
    """Whether a gateway listening on ``listen`` with backends at ``urls`` speaks TLS."""
    return listen.split(":", 1)[0] == "ssl" or any(u.startswith("https://") for u in urls)


class _WithoutTLS(MetaPathFinder):
    """Refuses the TLS modules, as if they were not installed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname.split(".", 1)[0] in TLS_MODULES:
            raise ModuleNotFoundError(f"TLS is off in this gateway: {fullname}", name=fullname)
        return None


def leave_tls_out() -> bool:
    """Keep the TLS modules from loading; False when one is already loaded (too late)."""
    if tls_loaded():
        return False
    if not any(isinstance(f, _WithoutTLS) for f in sys.meta_path):
        sys.meta_path.insert(0, _WithoutTLS())
    return True


def tls_loaded() -> bool:
    """Whether TLS support is loaded in this process."""
    return any(name in sys.modules for name in TLS_MODULES)
