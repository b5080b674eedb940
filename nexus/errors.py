"""OpenAI-style errors: one exception type per row of the contract's error table."""

from __future__ import annotations

import json
from typing import ClassVar


class GatewayError(Exception):
    """An error the gateway answers with an OpenAI-style JSON body.

    ``status``, ``type`` and ``code`` go to the client; ``error_type`` is the
    ``nexus_errors_total`` label the failure is counted under.
    """

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"
    error_type: ClassVar[str] = "other"
    #: Response headers every error of this kind carries.
    default_headers: ClassVar[tuple[tuple[bytes, bytes], ...]] = ()

    def __init__(
        self,
        message: str,
        param: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        #: Response headers to send with the error body.
        self.headers = self.default_headers + headers

    def to_dict(self) -> dict[str, object]:
        """The error body as a dict: ``{"error": {message, type, param, code}}``."""
        return error_body(self.message, self.type, self.param, self.code)

    def to_json(self) -> bytes:
        """The error body as UTF-8 JSON bytes."""
        return json.dumps(self.to_dict()).encode("utf-8")


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    """Build the contract's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class InvalidRequest(GatewayError):
    """The client's request is malformed (400)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"
    error_type = "invalid_request"


class Unauthorized(GatewayError):
    """Missing or wrong API key (401)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    error_type = "invalid_request"
    default_headers = ((b"www-authenticate", b"Bearer"),)


class PayloadTooLarge(GatewayError):
    """The body exceeds ``server.max_body_bytes`` (413)."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    error_type = "invalid_request"


class RequestTimeout(GatewayError):
    """The client did not send its request in time (408)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    error_type = "invalid_request"


class NotFound(GatewayError):
    """No such path (404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"
    error_type = "invalid_request"


class MethodNotAllowed(GatewayError):
    """Known path, wrong method (405)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    error_type = "invalid_request"


class ModelNotFound(GatewayError):
    """No backend, alias or fallback knows the model (404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    error_type = "no_backend"


class NoHealthyBackend(GatewayError):
    """The model is known but nothing healthy serves it, fallbacks included (503)."""

    status = 503
    type = "server_error"
    code = "service_unavailable"
    error_type = "no_healthy_backend"


class Overloaded(GatewayError):
    """``server.max_concurrent_requests`` reached, or shutting down (503, with Retry-After)."""

    status = 503
    type = "server_error"
    code = "service_unavailable"
    error_type = "other"
    default_headers = ((b"retry-after", b"1"),)


class BadGateway(GatewayError):
    """Backend unreachable, reset or 5xx after all retries (502)."""

    status = 502
    type = "server_error"
    code = "bad_gateway"
    error_type = "backend_error"


class UpstreamParseError(BadGateway):
    """Backend answered 2xx with a body that is not valid JSON (502)."""

    error_type = "parse_error"


class GatewayTimeout(GatewayError):
    """No headers (or no complete non-streaming body, or no next event) in time (504)."""

    status = 504
    type = "server_error"
    code = "gateway_timeout"
    error_type = "timeout"
