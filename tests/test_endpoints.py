"""Embeddings, legacy completions and model lookup: routed, retried and metered like chat."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread

from nexus.config import BackendConfig, HealthCheckConfig, RoutingConfig
from nexus.endpoints import json_body
from tests.support import CLIENT_DEADLINE, Cleanup, served_by, start_gateway, start_mock

EMBED = {"model": "m", "input": ["one", "two"]}
COMPLETE = {"model": "m", "prompt": "Say hi"}


async def post(gw: Any, path: str, payload: dict[str, Any]) -> tuple[Any, Any]:
    response = await gw.client.post(gw.url + path, data=json.dumps(payload).encode())
    body = await response.content()
    try:
        return response, json.loads(body)
    except ValueError:
        return response, body


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_works_unchanged(cleanup: Cleanup) -> None:
    mock = start_mock("alpha", ["m"])
    gw = await start_gateway([mock])
    cleanup += [mock, gw]

    def use_client() -> tuple[Any, Any, list[str]]:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0,
                               timeout=CLIENT_DEADLINE)
        with client:
            embedded = client.embeddings.create(model="m", input=["one", "two"])
            completed = client.completions.create(model="m", prompt="Say hi")
            pieces = [
                chunk.choices[0].text
                for chunk in client.completions.create(model="m", prompt="Say hi", stream=True)
                if chunk.choices
            ]
        return embedded, completed, pieces

    embedded, completed, pieces = await deferToThread(use_client)
    assert [e.index for e in embedded.data] == [0, 1]
    assert len(embedded.data[0].embedding) > 0
    assert embedded.data[0].embedding != embedded.data[1].embedding
    assert completed.choices[0].text == "Hello from alpha"
    assert "".join(pieces) == "Hello from alpha"
    assert gw.sample("nexus_requests_total", model="m", backend="alpha", status="200") == 3
    history = await gw.get_json("/v1/history")
    assert [e["endpoint"] for e in history["data"]] == [
        "completions", "completions", "embeddings"]
    assert history["data"][-1]["tokens_prompt"] is not None
    assert history["data"][-1]["tokens_completion"] is None  # embeddings: prompt tokens only


@pytest_twisted.ensureDeferred
async def test_each_endpoint_is_routed_retried_and_timed_like_chat(cleanup: Cleanup) -> None:
    flaky = start_mock("a-flaky", ["m"], fail="500")  # always 500: every try is retried
    steady = start_mock("b-steady", ["m", "small"])
    hanging = start_mock("c-hang", ["slow"], fail="hang")
    paced = start_mock("d-paced", ["p"], stream_delay_ms=200)
    gw = await start_gateway(
        [flaky, steady, hanging, paced], request_timeout=0.5,
        routing=RoutingConfig(strategy="priority_only", max_retries=1,
                              aliases={"alias": "m"}, fallbacks={"gone": ("small",)}),
        backend_options={"a-flaky": {"priority": 1}, "b-steady": {"priority": 2}},
    )
    cleanup += [flaky, steady, hanging, paced, gw]
    for path, payload in (("/v1/embeddings", EMBED), ("/v1/completions", COMPLETE)):
        # a 500 on the preferred backend is retried on the next
        response, body = await post(gw, path, payload)
        assert response.code == 200 and served_by(response) == "b-steady", body
        reason = response.headers.getRawHeaders("x-nexus-route-reason")[0]
        assert reason.endswith("retry 1 on b-steady after a-flaky failed")
        assert steady.stats()["last_request"]["path"] == path
        # an alias resolves
        response, _ = await post(gw, path, {**payload, "model": "alias"})
        assert response.code == 200
        assert steady.stats()["last_request"]["body"]["model"] == "m"
        # a fallback serves ("gone" has no backend)
        response, _ = await post(gw, path, {**payload, "model": "gone"})
        assert response.code == 200
        assert response.headers.getRawHeaders("x-nexus-fallback-model") == ["small"]
        # bad input is the client's 400, with the field named
        response, body = await post(gw, path, {"model": "m"})
        assert response.code == 400 and body["error"]["param"] in ("input", "prompt")
        # unknown model: 404 model_not_found
        response, body = await post(gw, path, {**payload, "model": "nope"})
        assert response.code == 404 and body["error"]["code"] == "model_not_found"
        # no answer in time: 504
        response, body = await post(gw, path, {**payload, "model": "slow"})
        assert response.code == 504 and body["error"]["code"] == "gateway_timeout"
    # a client leaving a completion stream
    await gw.stream_then_leave("p", events=1, path="/v1/completions",
                               payload={**COMPLETE, "model": "p", "stream": True})

    events = (await gw.get_json("/v1/history"))["data"]
    assert len(events) == 13
    by_endpoint: dict[str, list[int]] = {}
    for event in reversed(events):
        by_endpoint.setdefault(event["endpoint"], []).append(event["status_code"])
    assert by_endpoint == {
        "embeddings": [200, 200, 200, 400, 404, 504],
        "completions": [200, 200, 200, 400, 404, 504, 499],
    }
    # the metrics and the stats count the same requests
    stats = await gw.get_json("/v1/stats")
    assert stats["requests"]["total"] == 13
    assert gw.sample("nexus_requests_total", model="m", backend="b_steady", status="200") == 2
    assert gw.sample("nexus_requests_total", model="alias", backend="b_steady", status="200") == 2
    assert gw.sample("nexus_fallbacks_total", from_model="gone", to_model="small") == 2
    assert gw.sample("nexus_errors_total", error_type="timeout", model="slow") == 2
    assert gw.sample("nexus_errors_total", error_type="no_backend", model="unknown") == 2
    assert gw.sample("nexus_errors_total", error_type="client_disconnect", model="p") == 1
    assert all(b.pending == 0 for b in gw.gateway.registry.backends)


@pytest_twisted.ensureDeferred
async def test_a_backend_lacking_an_endpoint_is_skipped_and_remembered(cleanup: Cleanup) -> None:
    chat_only = start_mock("a-chat-only", ["m"], endpoints=["chat"])
    full = start_mock("b-full", ["m"])
    gw = await start_gateway(
        [chat_only, full], routing=RoutingConfig(strategy="priority_only", max_retries=0),
        backend_options={"a-chat-only": {"priority": 1}, "b-full": {"priority": 2}},
        health=HealthCheckConfig(timeout_seconds=2.0),
    )
    cleanup += [chat_only, full, gw]
    response, body = await post(gw, "/v1/embeddings", EMBED)
    # the preferred backend answered 404 for the path: the next one served, no retry spent
    assert response.code == 200 and served_by(response) == "b-full", body
    assert chat_only.stats()["requests_by_endpoint"]["embeddings"] == 1
    assert gw.gateway.registry.get("a-chat-only").missing_endpoints == {"embeddings"}
    for _ in range(3):  # remembered: straight to the backend that can serve it
        response, _ = await post(gw, "/v1/embeddings", EMBED)
        assert response.code == 200 and served_by(response) == "b-full"
    assert chat_only.stats()["requests_by_endpoint"]["embeddings"] == 1
    # chat still goes to the preferred backend
    response = await gw.chat()
    await response.content()
    assert served_by(response) == "a-chat-only"
    # until its next successful model discovery
    await gw.check_health()
    assert gw.gateway.registry.get("a-chat-only").missing_endpoints == set()
    # a lone candidate lacking it: its answer is passed through, as a backend's 4xx would be
    lone = start_mock("lone", ["x"], endpoints=["chat"], missing_endpoint_status=501)
    cleanup.append(lone)
    gw.gateway.registry.add(BackendConfig(name="lone", url=lone.url, models=("x",)))
    gw.gateway.registry.get("lone").status = "healthy"
    response, body = await post(gw, "/v1/embeddings", {**EMBED, "model": "x"})
    assert response.code == 501 and served_by(response) == "lone", body


@pytest_twisted.ensureDeferred
async def test_one_model_by_id(cleanup: Cleanup) -> None:
    mock = start_mock("one", ["m", "org/model:7b"])
    gw = await start_gateway([mock], routing=RoutingConfig(aliases={"gpt-4": "m"}))
    cleanup += [mock, gw]
    listed = {e["id"]: e for e in (await gw.get_json("/v1/models"))["data"]}
    for model_id in ("m", "org/model:7b", "gpt-4"):
        assert await gw.get_json(f"/v1/models/{model_id}") == listed[model_id]
    assert (await gw.get_json("/v1/models/gpt-4"))["alias_of"] == "m"
    response = await gw.client.get(gw.url + "/v1/models/nope")
    body = json.loads(await response.content())
    assert response.code == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert set(body["error"]) == {"message", "type", "param", "code"}


# -- json_body: json.loads's answer, by a shorter way for the usual body ---------------------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _outcome(parse: Any, data: bytes) -> tuple[str, Any]:
    try:
        value = parse(data)
    except Exception as e:  # the kind of error is what must agree
        return ("error", type(e))
    return ("value", json.dumps(value, sort_keys=True))  # NaN-safe comparison


@settings(max_examples=300)
@given(
    value=st.dictionaries(st.text(), _JSON_VALUES, max_size=5),
    before=st.sampled_from(["", " ", "\ufeff", "\n"]),
    after=st.sampled_from(["", " \r\n\t", " x", "}", "\x00", "{}"]),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-32"]),
    ascii_only=st.booleans(),
)
def test_json_body_reads_what_json_loads_reads(
    value: dict[str, Any], before: str, after: str, encoding: str, ascii_only: bool
) -> None:
    data = (before + json.dumps(value, ensure_ascii=ascii_only) + after).encode(
        encoding, "surrogatepass"
    )
    assert _outcome(json_body, data) == _outcome(json.loads, data)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"{}", b'{"a": 1} x', b'{"a": "\xff"}', b'{"a": NaN}', b'{"a": "\\ud800"}',
     b"[1]", b"{" * 100_000, b'{"a": 1}\x00'],
)
def test_json_body_agrees_with_json_loads_at_the_edges(data: bytes) -> None:
    assert _outcome(json_body, data) == _outcome(json.loads, data)
