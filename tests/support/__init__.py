"""Helpers shared by the test modules, one definition each: import them from here.

- real gateways and mock backends on 127.0.0.1: ``start_gateway``, ``RunningGateway``,
  ``start_mock``, and ``StreamedBody`` for a body a client may leave (``_gateway``);
- clients with a deadline: ``CLIENT_DEADLINE``, ``deadline``, ``DeadlineAgent``,
  ``http_client``, ``DeadlineExceeded``, and ``served_by`` (``_clients``);
- waiting and stopping: ``wait_for``, ``Cleanup`` (``_polling``);
- ``twistd`` as a process: ``TWISTD``, ``twistd_env``, ``free_port``, ``ROOT``
  (``_processes``).
"""

from __future__ import annotations

from tests.support._clients import (
    CLIENT_DEADLINE,
    DeadlineAgent,
    DeadlineExceeded,
    deadline,
    http_client,
    served_by,
)
from tests.support._gateway import RunningGateway, StreamedBody, start_gateway, start_mock
from tests.support._polling import Cleanup, wait_for
from tests.support._processes import ROOT, TWISTD, free_port, twistd_env

__all__ = [
    "CLIENT_DEADLINE",
    "ROOT",
    "TWISTD",
    "Cleanup",
    "DeadlineAgent",
    "DeadlineExceeded",
    "RunningGateway",
    "StreamedBody",
    "deadline",
    "free_port",
    "http_client",
    "served_by",
    "start_gateway",
    "start_mock",
    "twistd_env",
    "wait_for",
]
