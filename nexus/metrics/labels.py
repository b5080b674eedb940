"""Prometheus label values: sanitizing and the reserved values ``unknown`` and ``none``."""

from __future__ import annotations

import functools
import re

#: Label value for a model the gateway does not know (or a request without a usable model).
UNKNOWN_MODEL = "unknown"
#: Label value for ``backend`` when no backend was chosen.
NO_BACKEND = "none"

# ASCII only on purpose: `\w` would let non-ASCII letters through.
_INVALID = re.compile(r"[^A-Za-z0-9_]")


@functools.lru_cache(maxsize=4096)
def _sanitize(value: str) -> str:
    out = _INVALID.sub("_", value)
    if not out:
        return "_"
    if out[0] in "0123456789":
        return "_" + out
    return out


def sanitize_label(value: str) -> str:
    """Make ``value`` a safe label value: ``[A-Za-z_][A-Za-z0-9_]*``.

    Every character outside ``[A-Za-z0-9_]`` (non-ASCII letters included) becomes
    ``_``, a leading digit gets a ``_`` prefix and the empty string becomes ``_``.
    Idempotent; results are cached (bounded, so hostile input cannot grow it).
    """
    if not isinstance(value, str):
        value = str(value)
    return _sanitize(value)
