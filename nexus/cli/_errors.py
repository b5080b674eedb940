"""The one way a ``nexus`` command fails."""

from __future__ import annotations


class CommandError(Exception):
    """A failure the operator can act on: ``main`` prints ``Error: <message>``, exits 1."""
