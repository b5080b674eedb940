"""The contract's error table, row by row."""

from __future__ import annotations

import json

import pytest

from nexus import errors

INVALID = "invalid_request_error"
ROWS = [
    (errors.InvalidRequest, 400, INVALID, INVALID, "invalid_request"),
    (errors.PayloadTooLarge, 413, INVALID, "payload_too_large", "invalid_request"),
    (errors.ModelNotFound, 404, INVALID, "model_not_found", "no_backend"),
    (errors.NoHealthyBackend, 503, "server_error", "service_unavailable", "no_healthy_backend"),
    (errors.BadGateway, 502, "server_error", "bad_gateway", "backend_error"),
    (errors.UpstreamParseError, 502, "server_error", "bad_gateway", "parse_error"),
    (errors.GatewayTimeout, 504, "server_error", "gateway_timeout", "timeout"),
    (errors.NotFound, 404, INVALID, "not_found", "invalid_request"),
    (errors.MethodNotAllowed, 405, INVALID, "method_not_allowed", "invalid_request"),
    (errors.Unauthorized, 401, INVALID, "invalid_api_key", "invalid_request"),
    (errors.Overloaded, 503, "server_error", "service_unavailable", "other"),
    (errors.RequestTimeout, 408, INVALID, "request_timeout", "invalid_request"),
]


@pytest.mark.parametrize(("cls", "status", "type_", "code", "metric"), ROWS)
def test_error_maps_to_contract_row(
    cls: type[errors.GatewayError], status: int, type_: str, code: str, metric: str
) -> None:
    error = cls("what went wrong", param="model")
    assert (error.status, error.error_type) == (status, metric)
    assert json.loads(error.to_json()) == {
        "error": {"message": "what went wrong", "type": type_, "param": "model", "code": code}
    }
