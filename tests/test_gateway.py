"""End to end on the real reactor: real gateway, real mock backends, real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import select
import socket
from typing import Any

import openai
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from nexus.config import BackendConfig
from tests.support import CLIENT_DEADLINE, start_gateway, start_mock, wait_for


async def error_of(response: Any) -> dict[str, Any]:
    body = json.loads(await response.content())
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest_twisted.ensureDeferred
async def test_openai_client_non_streaming_and_streaming(cleanup: list[Any]) -> None:
    mock = start_mock("alpha", ["llama3:8b"], stream_chunks=4)
    gw = await start_gateway([mock])
    cleanup += [mock, gw]

    def use_client() -> tuple[Any, list[str]]:
        client = openai.OpenAI(
            base_url=gw.url + "/v1", api_key="client-key", max_retries=0, timeout=CLIENT_DEADLINE
        )
        with client:
            answer = client.chat.completions.create(
                model="llama3:8b", messages=[{"role": "user", "content": "hi"}]
            )
            pieces = [
                chunk.choices[0].delta.content or ""
                for chunk in client.chat.completions.create(
                    model="llama3:8b", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                if chunk.choices
            ]
        return answer, pieces

    answer, pieces = await deferToThread(use_client)
    assert answer.choices[0].message.content == "Hello from alpha"
    assert answer.model == "llama3:8b"
    assert answer.usage.prompt_tokens == 10
    assert len([p for p in pieces if p]) == 4
    assert mock.stats()["last_request"]["headers"]["authorization"] == "Bearer client-key"


@pytest_twisted.ensureDeferred
async def test_first_event_arrives_before_backend_finishes(cleanup: list[Any]) -> None:
    mock = start_mock("slow", stream_chunks=5, stream_delay_ms=300)
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    response = await gw.client.post(
        gw.url + "/v1/chat/completions",
        data=json.dumps({"model": "m", "messages": [], "stream": True}).encode(),
        unbuffered=True,
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert response.headers.getRawHeaders("cache-control") == ["no-cache"]
    assert response.headers.getRawHeaders("x-nexus-backend") == ["slow"]
    chunks: list[bytes] = []
    done = treq.collect(response, chunks.append)
    await wait_for(lambda: b"data: " in b"".join(chunks), what="first event")
    # The backend is still generating: the event was relayed, not buffered.
    assert mock.stats()["completed"] == 0
    assert mock.stats()["in_flight"] == 1
    await done
    body = b"".join(chunks)
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: ") == 5 + 3  # role, 5 pieces, finish, [DONE]


@pytest_twisted.ensureDeferred
async def test_client_disconnect_mid_stream_cancels_upstream(cleanup: list[Any]) -> None:
    mock = start_mock("endless", fail="endless", stream_delay_ms=20)
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    await gw.stream_then_leave("m", events=2)
    await wait_for(lambda: mock.stats()["disconnects"] == 1, what="upstream cancelled")
    await wait_for(lambda: gw.gateway.registry.get("endless").pending == 0, what="pending 0")


@pytest_twisted.ensureDeferred
async def test_backend_failures_map_to_contract_statuses(cleanup: list[Any]) -> None:
    mock = start_mock("only")
    gw = await start_gateway([mock], request_timeout=1.0)
    cleanup += [mock, gw]
    cases = [("500", 502, "bad_gateway"), ("invalid_json", 502, "bad_gateway"),
             ("reset", 502, "bad_gateway"), ("hang", 504, "gateway_timeout")]
    for fail, status, code in cases:
        mock.configure(fail=fail)
        response = await gw.chat()
        assert response.code == status, (fail, await response.content())
        error = await error_of(response)
        assert error["code"] == code
        assert error["type"] == "server_error"
    await mock.stop()
    response = await gw.chat()
    assert response.code == 502
    assert "unreachable" in (await error_of(response))["message"]


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_openai_errors(cleanup: list[Any]) -> None:
    mock = start_mock("only", ["known"])
    gw = await start_gateway([mock], max_body_bytes=10 * 1024 * 1024)
    cleanup += [mock, gw]
    url = gw.url + "/v1/chat/completions"
    for body, param in [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"text"', None),
        (b'{"messages": []}', "model"),
        (b'{"model": 7, "messages": []}', "model"),
        (b'{"model": "known"}', "messages"),
        (b'{"model": "known", "messages": {}}', "messages"),
        (b"\xff\xfe", None),
    ]:
        response = await gw.client.post(url, data=body)
        assert response.code == 400, body
        error = await error_of(response)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
    response = await gw.chat("no-such-model")
    assert response.code == 404
    error = await error_of(response)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no-such-model" in error["message"] and "known" in error["message"]
    assert mock.stats()["chat_requests"] == 0


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_refused_without_reading_it(cleanup: list[Any]) -> None:
    mock = start_mock("only")
    gw = await start_gateway([mock], max_body_bytes=10 * 1024 * 1024)
    cleanup += [mock, gw]
    body = b'{"model": "m", "messages": ["' + b"x" * (11 * 1024 * 1024) + b'"]}'
    response = await gw.client.post(gw.url + "/v1/chat/completions", data=body)
    assert response.code == 413
    assert (await error_of(response))["code"] == "payload_too_large"
    # the gateway still serves
    assert (await gw.chat()).code == 200


@pytest_twisted.ensureDeferred
async def test_unknown_path_and_wrong_method(cleanup: list[Any]) -> None:
    gw = await start_gateway([])
    cleanup.append(gw)
    response = await gw.client.get(gw.url + "/v2/nothing")
    assert response.code == 404
    assert (await error_of(response))["type"] == "invalid_request_error"
    response = await gw.client.get(gw.url + "/v1/chat/completions")
    assert response.code == 405
    assert "GET" in (await error_of(response))["message"]


@pytest_twisted.ensureDeferred
async def test_forwarding_rules(cleanup: list[Any]) -> None:
    plain = start_mock("plain", ["a"])
    keyed = start_mock("keyed", ["b"])
    gw = await start_gateway(
        [plain, keyed], backend_options={"keyed": {"api_key_env": "TEST_BACKEND_KEY"}}
    )
    cleanup += [plain, keyed, gw]
    response = await gw.chat(
        "a", headers={"Authorization": "Bearer client", "X-Private": "no"},
        temperature=0.5, custom_field={"kept": [1, 2]},
    )
    assert response.code == 200
    sent = plain.stats()["last_request"]
    assert sent["headers"]["authorization"] == "Bearer client"
    assert "x-private" not in sent["headers"]
    assert sent["body"]["custom_field"] == {"kept": [1, 2]} and sent["body"]["temperature"] == 0.5
    assert response.headers.getRawHeaders("x-nexus-backend") == ["plain"]
    # the headers a backend names in its Connection header ("Connection: x-mock-hop,
    # x-mock-backend") are hop-by-hop: never relayed; nor is the gateway's Server banner
    for name in ("x-mock-hop", "x-mock-backend", "server"):
        assert not response.headers.hasHeader(name), name
    assert not response.headers.hasHeader("x-nexus-fallback-model")
    response = await gw.chat("b", headers={"Authorization": "Bearer client"})
    assert response.code == 200
    assert keyed.stats()["last_request"]["headers"]["authorization"] == "Bearer backend-secret"
    # a backend's own 4xx is passed through, status and body
    response = await gw.chat("a", temperature=5)
    assert response.code == 400
    error = await error_of(response)
    assert error["param"] == "temperature" and error["message"] == "temperature must be <= 2"
    assert response.headers.getRawHeaders("x-nexus-backend") == ["plain"]


@pytest_twisted.ensureDeferred
async def test_models_and_health_follow_backend_health(cleanup: list[Any]) -> None:
    one = start_mock("one", ["shared", "only-one"])
    two = start_mock("two", ["shared"])
    gw = await start_gateway([one, two])
    cleanup += [one, two, gw]
    models = await gw.get_json("/v1/models")
    assert [m["id"] for m in models["data"]] == ["only-one", "shared"]
    assert models["data"][1]["backends"] == ["one", "two"]
    assert models["data"][0]["object"] == "model" and models["data"][0]["owned_by"] == "nexus"
    health = await gw.get_json("/health")
    assert health["status"] == "healthy"
    assert health["backends"] == {"total": 2, "healthy": 2, "unhealthy": 0, "unknown": 0}
    assert health["models"] == 2
    one.configure(health_fail=True)
    for _ in range(3):  # failure_threshold
        await gw.check_health()
    models = await gw.get_json("/v1/models")
    assert [(m["id"], m["backends"]) for m in models["data"]] == [("shared", ["two"])]
    health = await gw.get_json("/health")
    assert health["status"] == "degraded" and health["backends"]["unhealthy"] == 1
    response = await gw.chat("only-one")
    assert response.code == 503
    assert (await error_of(response))["code"] == "service_unavailable"
    one.configure(health_fail=False)
    for _ in range(2):  # recovery_threshold
        await gw.check_health()
    assert (await gw.get_json("/health"))["status"] == "healthy"
    assert (await gw.chat("only-one")).code == 200


@pytest_twisted.ensureDeferred
async def test_no_backends_is_unhealthy(cleanup: list[Any]) -> None:
    gw = await start_gateway([BackendConfig(name="down", url="http://127.0.0.1:9")])
    cleanup.append(gw)
    # 503 so that load balancers and probes, which read the code, take it out
    health = await gw.get_json("/health", status=503)
    assert health["status"] == "unhealthy"
    assert health["backends"]["unhealthy"] == 1
    [down] = health["fleet"]
    assert down["id"] == "down" and down["status"] == "unhealthy"
    assert down["last_error"] and down["last_check"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_upstream_failure_after_200_ends_stream_with_error_event(
    cleanup: list[Any],
) -> None:
    mock = start_mock("breaks", fail="truncated_sse")
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    response = await gw.chat(stream=True)
    assert response.code == 200
    events = (await response.content()).split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    error = json.loads(events[-3][len(b"data: "):])["error"]
    assert error["code"] == "bad_gateway"
    assert all(e.startswith(b"data: ") for e in events[:-1])


@pytest_twisted.ensureDeferred
async def test_stalled_stream_is_cut_by_idle_timeout(cleanup: list[Any]) -> None:
    mock = start_mock("stalls", fail="stall")
    gw = await start_gateway([mock], request_timeout=0.5)
    cleanup += [mock, gw]
    response = await gw.chat(stream=True)
    body = await response.content()
    assert response.code == 200
    assert b'"gateway_timeout"' in body and body.endswith(b"data: [DONE]\n\n")
    await wait_for(lambda: mock.stats()["disconnects"] == 1, what="upstream closed")


@pytest_twisted.ensureDeferred
async def test_slow_generation_is_not_cut_while_it_flows(cleanup: list[Any]) -> None:
    # 8 events 150 ms apart: 1.2 s in total, longer than the 0.5 s timeout.
    mock = start_mock("steady", stream_chunks=6, stream_delay_ms=150)
    gw = await start_gateway([mock], request_timeout=0.5)
    cleanup += [mock, gw]
    response = await gw.chat(stream=True)
    body = await response.content()
    assert b"error" not in body and body.endswith(b"data: [DONE]\n\n")


@pytest_twisted.ensureDeferred
async def test_a_failing_metrics_recorder_never_fails_the_request(
    cleanup: list[Any], monkeypatch: Any
) -> None:
    mock = start_mock("only")
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    calls: list[object] = []

    def broken(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise RuntimeError("metrics bug")

    monkeypatch.setattr(gw.gateway.site, "recorders", (broken, *gw.gateway.site.recorders))
    for stream in (False, True):
        response = await gw.chat(stream=stream)
        assert response.code == 200
        assert b"Hello" in await response.content()
    await wait_for(lambda: len(calls) == 2, what="both recordings attempted")
    assert gw.gateway.registry.get("only").pending == 0
    # the recorders after the broken one still got both requests
    assert gw.sample("nexus_requests_total", model="m", backend="only", status="200") == 2
    assert len(gw.gateway.request_log.history) == 2


@pytest_twisted.ensureDeferred
async def test_a_stream_the_backend_ends_by_closing_the_connection(cleanup: list[Any]) -> None:
    # HTTP/1.1 200, Connection: close, no Content-Length nor chunked encoding: the close ends it.
    mock = start_mock("closer", stream_framing="close")
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    response = await gw.chat(stream=True)
    body = await response.content()
    assert response.code == 200
    assert body.count(b"data: [DONE]") == 1 and b'"error"' not in body
    assert b"Hello" in body
    assert gw.sample("nexus_requests_total", model="m", backend="closer", status="200") == 1
    assert gw.sample("nexus_errors_total", error_type="backend_error", model="m") == 0
    # Closed inside an event: a broken stream, one error event, counted as a backend error.
    mock.configure(fail="truncated_sse")
    response = await gw.chat(stream=True)
    events = (await response.content()).split(b"\n\n")
    assert response.code == 200
    assert events[-2] == b"data: [DONE]" and b'"bad_gateway"' in events[-3]
    assert b"".join(events).count(b"[DONE]") == 1
    assert gw.sample("nexus_errors_total", error_type="backend_error", model="m") == 1


@pytest_twisted.ensureDeferred
async def test_time_to_first_token_is_measured_at_the_first_content_event(
    cleanup: list[Any],
) -> None:
    # The headers and a role-only event come at once; the first content 300 ms later.
    mock = start_mock("thinker", first_token_delay_ms=300)
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    response = await gw.chat(stream=True)
    assert response.code == 200
    await response.content()
    labels = {"model": "m", "backend": "thinker"}
    assert gw.sample("nexus_time_to_first_token_seconds_count", **labels) == 1
    assert gw.sample("nexus_time_to_first_token_seconds_bucket", le="0.25", **labels) == 0
    assert gw.sample("nexus_time_to_first_token_seconds_sum", **labels) >= 0.3


@pytest_twisted.ensureDeferred
async def test_an_answer_is_on_the_wire_before_the_gateway_records_it(
    cleanup: list[Any], monkeypatch: Any
) -> None:
    # The record, metrics and log line of a request are written after its last byte
    # has left: a client never waits for the gateway's bookkeeping. The recorder
    # below holds the reactor while it waits for the answer on a plain socket, so
    # bytes still queued for the reactor's next turn could never arrive.
    mock = start_mock("only", stream_chunks=3)
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    received: list[bytes] = []
    client = socket.create_connection(("127.0.0.1", gw.port.getHost().port), timeout=5)
    cleanup.append(_Closing(client))

    def read_answer_first(record: Any) -> None:
        data = b""
        while not _complete(data):
            readable, _, _ = select.select([client], [], [], 5)
            if not readable:
                break  # still in the gateway's buffer: the test fails below
            data += client.recv(65536)
        received.append(data)

    recorders = (read_answer_first, *gw.gateway.site.recorders)
    monkeypatch.setattr(gw.gateway.site, "recorders", recorders)
    for count, stream in enumerate((False, True), 1):
        body = json.dumps({"model": "m", "messages": [], "stream": stream}).encode()
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await wait_for(lambda: len(received) == count, what="the record")  # noqa: B023
        answer = received[-1]
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and _complete(answer), answer
        assert (b"data: [DONE]" in answer) == stream
    assert gw.sample("nexus_requests_total", model="m", backend="only", status="200") == 2


@pytest_twisted.ensureDeferred
async def test_both_connections_send_small_writes_without_delay(cleanup: list[Any]) -> None:
    # TCP_NODELAY on the client's connection and the backend's: a stream's small
    # writes (its head, an event) never wait for the peer's ACK of the last one.
    mock = start_mock("only")
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    assert (await gw.chat()).code == 200
    [channel] = gw.gateway.site.channels
    [backend] = [c for o in gw.gateway.upstream.connections._origins.values() for c in o.idle]
    for transport in (channel.transport, backend.transport):
        assert transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest_twisted.ensureDeferred
async def test_a_request_sent_with_the_connection_is_read_as_it_is_accepted(
    cleanup: list[Any], monkeypatch: Any
) -> None:
    # A one-shot client connects and sends at once: its request is read and sent on in
    # the reactor's turn that accepts the connection, not one turn later.
    import nexus.server

    mock = start_mock("only")
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    in_progress: list[int] = []
    read_now = nexus.server.read_now

    def read_and_look(transport: Any) -> None:
        read_now(transport)
        in_progress.append(len(transport.protocol.requests))

    monkeypatch.setattr(nexus.server, "read_now", read_and_look)
    client = socket.create_connection(("127.0.0.1", gw.port.getHost().port), timeout=5)
    cleanup.append(_Closing(client))
    body = json.dumps({"model": "m", "messages": []}).encode()
    client.sendall(  # before the reactor runs again: the request waits with the connection
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = await deferToThread(_read_all, client)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and _complete(answer)
    assert in_progress == [1]  # read, parsed and waiting for the backend when accepted


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


class _Closing:
    def __init__(self, sock: socket.socket) -> None:
        self.stop = sock.close


def _complete(data: bytes) -> bool:
    """A whole HTTP/1.1 answer: its Content-Length body, or its chunked body's end."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    if b"\r\nTransfer-Encoding: chunked" in head:
        return body.endswith(b"0\r\n\r\n")
    length = int(head.split(b"\r\nContent-Length: ", 1)[1].split(b"\r\n", 1)[0])
    return len(body) >= length


@pytest_twisted.ensureDeferred
async def test_a_kept_connection_closed_as_a_request_meets_it_costs_no_request(
    cleanup: list[Any],
) -> None:
    # uvicorn (under vLLM) closes a connection idle for 5 s: a request written at that
    # moment meets the close on the wire, unread. With one backend that was a 502.
    mock = start_mock("only")
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    assert (await gw.chat()).code == 200
    assert gw.gateway.upstream.connections.idle_count() == 1  # kept for the next request
    mock.configure(fail="close", fail_count=1)
    response = await gw.chat()
    assert response.code == 200 and b"Hello from only" in await response.content()
    assert mock.chat_requests == 3  # the one the close met, and the same sent again
    [event] = (await gw.get_json("/v1/history?limit=1"))["data"]
    assert event["status_code"] == 200 and event["retry_count"] == 0  # not a second attempt
    # A new connection closed the same way is not tried a third time: the backend failed.
    mock.configure(fail="close", fail_count=-1)
    response = await gw.chat()
    assert response.code == 502
    assert "unreachable" in (await error_of(response))["message"]
    assert mock.chat_requests == 5
    assert gw.sample("nexus_requests_total", model="m", backend="only", status="200") == 2
    assert gw.gateway.registry.get("only").pending == 0
