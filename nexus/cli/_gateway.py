"""Asking a running gateway: ``/health`` and ``/v1/models`` (contract sections 1 and 11)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

from nexus.cli._errors import CommandError
from nexus.cli._http import Answer, Unreachable, get

#: Where the commands look for a gateway when neither ``--url`` nor ``NEXUS_URL`` says.
DEFAULT_URL = "http://127.0.0.1:8000"


@attrs.frozen
class Gateway:
    """A gateway at ``url`` (a base URL), asked with ``api_key`` when there is one."""

    url: str
    api_key: str | None = None
    timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CommandError(
                f"the gateway URL must be http:// or https:// with a host, not {self.url!r}"
            )

    def health(self) -> dict[str, Any]:
        """``GET /health``: answered 200 when healthy or degraded, 503 when unhealthy."""
        body = self._get_json("/health", (200, 503))
        if not isinstance(body, dict) or not isinstance(body.get("fleet"), list):
            raise self._odd("/health")
        return body

    def fleet(self) -> list[dict[str, Any]]:
        """Every backend, as ``/health``'s ``fleet`` lists it."""
        return list(self.health()["fleet"])

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``' ``data``: every model servable now, aliases too."""
        body = self._get_json("/v1/models", (200,))
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise self._odd("/v1/models")
        return list(body["data"])

    def _get_json(self, path: str, expected: tuple[int, ...]) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            answer = get(self.url.rstrip("/") + path, self.timeout, headers)
        except Unreachable as e:
            raise CommandError(f"cannot reach the gateway at {self.url} ({e})") from None
        if answer.status not in expected:
            raise CommandError(self._refusal(path, answer))
        body = answer.json()
        if body is None:
            raise self._odd(path)
        return body

    def _refusal(self, path: str, answer: Answer) -> str:
        error = answer.json()
        message = ""
        if isinstance(error, dict) and isinstance(error.get("error"), dict):
            message = str(error["error"].get("message") or "")
        said = f"GET {path} answered {answer.status}" + (f": {message}" if message else "")
        if answer.status == 401:
            hint = "a wrong key" if self.api_key else "no key"
            return (
                f"the gateway at {self.url} refused {hint} ({said}); "
                "give --api-key or NEXUS_API_KEY"
            )
        return f"the gateway at {self.url} failed ({said})"

    def _odd(self, path: str) -> CommandError:
        return CommandError(
            f"{self.url} does not look like a Nexus gateway (GET {path} did not answer "
            "with the expected JSON)"
        )
