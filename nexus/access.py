"""Access control: bearer keys for /v1/*, a separate token for the metrics endpoints."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from nexus.config import ConfigError, ServerConfig, read_keys_file


def _bearer(values: list[bytes] | None) -> bytes | None:
    if not values or len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: bytes | None, secrets: Iterable[bytes]) -> bool:
    # Compare against every secret, whatever matched, so timing says nothing about which.
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(token or b"", secret)
    return found and token is not None


class AccessPolicy:
    """Who may call what. With no keys and no token configured, everything is open."""

    def __init__(self, api_keys: Iterable[str] = (), metrics_token: str | None = None) -> None:
        self.api_keys = tuple(k.encode("utf-8") for k in api_keys)
        self.metrics_token = metrics_token.encode("utf-8") if metrics_token else None

    @classmethod
    def from_config(cls, server: ServerConfig) -> AccessPolicy:
        """The policy of ``[server]``: its ``api_keys`` and those of ``api_keys_file``.

        ``load_config`` has checked the file already, naming the configuration file in its
        error; a configuration built in code is checked here: ConfigError if the file is
        unreadable or has no key.
        """
        keys = list(server.api_keys)
        if server.api_keys_file:
            try:
                keys += read_keys_file(server.api_keys_file)
            except ConfigError as e:
                raise ConfigError(f"server.api_keys_file: {e}") from None
        return cls(keys, server.metrics_token)

    def allows_api(self, authorization: list[bytes] | None) -> bool:
        """Whether a request with this ``Authorization`` header may use ``/v1/*``."""
        return not self.api_keys or _matches(_bearer(authorization), self.api_keys)

    def allows_metrics(self, authorization: list[bytes] | None) -> bool:
        """Whether a request with this ``Authorization`` header may read the metrics."""
        if self.metrics_token is None:
            return True
        return _matches(_bearer(authorization), (self.metrics_token,))
