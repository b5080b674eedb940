"""Plain blocking HTTP for a short-lived command: one GET, a deadline for all of it.

The ``nexus`` command asks a gateway or a backend one or a few questions and exits, so it
uses the standard library's ``http.client`` rather than a reactor: nothing to start or stop,
and one deadline covers connecting, the headers and the whole body (a server that sends a
byte now and then cannot hold it past the deadline). No proxy from the environment is used:
the addresses asked are the operator's own gateway and backends.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

#: The most of a body kept; a longer one is an error (nothing asked here is that long).
MAX_BODY_BYTES = 16 * 1024 * 1024


class Unreachable(Exception):
    """No HTTP answer: the message says why in a few words (``connection refused``)."""


@attrs.frozen
class Answer:
    """A complete HTTP answer."""

    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def get(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> Answer:
    """GET ``url``; the answer, whatever its status, within ``timeout`` seconds in all.

    Raises Unreachable when there is no complete answer in time.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unreachable(f"not an http:// or https:// URL: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise Unreachable(f"bad port in {url!r}") from None
    deadline = time.monotonic() + timeout
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout)
    else:
        connection = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path, headers={"Accept": "application/json", **(headers or {})})
        sock = connection.sock
        _limit(sock, deadline)
        response = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        while True:
            _limit(sock, deadline)
            chunk = response.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise Unreachable(f"an answer longer than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return Answer(response.status, b"".join(chunks))
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise Unreachable("connection refused") from None
    except socket.gaierror:
        raise Unreachable(f"cannot resolve the name {parts.hostname!r}") from None
    except ssl.SSLError as e:
        raise Unreachable(f"TLS: {e.reason or e}") from None
    except http.client.HTTPException as e:
        raise Unreachable(f"not a valid HTTP answer: {type(e).__name__}") from None
    except OSError as e:
        raise Unreachable(e.strerror or str(e)) from None
    finally:
        connection.close()


def _limit(sock: socket.socket | None, deadline: float) -> None:
    """Let the next blocking step on ``sock`` wait only until ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    if sock is not None:
        sock.settimeout(remaining)
