"""Request ids and the request log (contract section 8) through a real gateway on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher

from nexus.config import RoutingConfig
from nexus.metrics import sanitize_label
from nexus.requestlog import HISTORY_SIZE, NAMESPACE, RequestLog, request_event, summary
from nexus.tracking import RequestRecord
from tests.support import (
    TWISTD,
    Cleanup,
    free_port,
    http_client,
    start_gateway,
    start_mock,
    twistd_env,
    wait_for,
)

HEX32 = re.compile(r"[0-9a-f]{32}")

FIELDS = {
    "request_id": str, "endpoint": str, "model": (str, type(None)),
    "actual_model": (str, type(None)), "backend": (str, type(None)),
    "backend_type": (str, type(None)), "status_code": int, "status": str,
    "error_type": (str, type(None)), "error_message": (str, type(None)),
    "latency_ms": (int, float), "ttft_ms": (int, float, type(None)),
    "tokens_prompt": (int, type(None)), "tokens_completion": (int, type(None)),
    "stream": bool, "retry_count": int, "route_reason": (str, type(None)),
    "fallback_from": (str, type(None)), "client": (str, type(None)),
}


class LogCapture:
    """Every event the gateway logs, while the test runs."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def requests(self) -> list[dict[str, Any]]:
        return [e["request"] for e in self.events if e.get("log_namespace") == NAMESPACE]


@pytest.fixture
def logged() -> Any:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


@pytest_twisted.ensureDeferred
async def test_request_ids_are_kept_or_made_and_reach_every_attempt(cleanup: Cleanup) -> None:
    broken = start_mock("a-broken", ["m"], fail="500")
    good = start_mock("b-good", ["m"])
    gw = await start_gateway(
        [broken, good], routing=RoutingConfig(strategy="priority_only", max_retries=1),
        backend_options={"a-broken": {"priority": 1}, "b-good": {"priority": 2}},
    )
    cleanup += [broken, good, gw]
    response = await gw.chat(headers={"x-request-id": "client-id_42/x.y:z"})
    assert response.code == 200
    assert response.headers.getRawHeaders("x-request-id") == ["client-id_42/x.y:z"]
    # the same id on both attempts: the failed one and the retry
    for mock in (broken, good):
        assert mock.stats()["last_request"]["headers"]["x-request-id"] == "client-id_42/x.y:z"
    reason = response.headers.getRawHeaders("x-nexus-route-reason")[0]
    assert reason == "priority_only:a-broken; retry 1 on b-good after a-broken failed"
    # invalid ids are replaced, never echoed: too long, a space, non-ASCII, empty
    for bad in ("x" * 129, "has space", "caf\u00e9", ""):
        response = await gw.chat(headers={"x-request-id": bad.encode("utf-8")})
        [made] = response.headers.getRawHeaders("x-request-id")
        assert HEX32.fullmatch(made) and made != bad
        assert good.stats()["last_request"]["headers"]["x-request-id"] == made
    response = await gw.chat()
    assert HEX32.fullmatch(response.headers.getRawHeaders("x-request-id")[0])
    response = await gw.chat(headers={"x-request-id": "y" * 128})
    assert response.headers.getRawHeaders("x-request-id") == ["y" * 128]


@pytest_twisted.ensureDeferred
async def test_events_and_metrics_tell_the_same_story(cleanup: Cleanup, logged: LogCapture) -> None:
    """A mixed workload: each request's event matches what /metrics counted."""
    fast = start_mock("fast", ["m"], stream_chunks=3)
    paced = start_mock("paced", ["p"], stream_delay_ms=200)
    down_a = start_mock("down-a", ["broken"], fail="500")
    down_b = start_mock("down-b", ["broken"], fail="500")
    slow = start_mock("slow", ["hang"], fail="hang")
    gw = await start_gateway(
        [fast, paced, down_a, down_b, slow], request_timeout=0.5, max_body_bytes=2000,
        routing=RoutingConfig(max_retries=1, aliases={"alias-m": "m"}),
    )
    cleanup += [fast, paced, down_a, down_b, slow, gw]
    sent: list[tuple[str, int]] = []

    async def chat(expect: int, model: str = "m", **fields: Any) -> Any:
        response = await gw.chat(model, headers={"x-request-id": f"req-{len(sent)}"}, **fields)
        await response.content()
        assert response.code == expect, (model, fields)
        sent.append((f"req-{len(sent)}", expect))
        return response

    await chat(200)
    await chat(200, "alias-m", stream=True)
    await chat(404, "no-such-model")
    await chat(502, "broken")  # 500 on one backend, retried on the other, 500 again
    await chat(504, "hang")  # no answer within the timeout
    response = await gw.client.post(gw.url + "/v1/chat/completions", data=b"not json",
                                    headers={"x-request-id": "req-bad"})
    assert response.code == 400
    await response.content()
    response = await gw.client.post(gw.url + "/v1/chat/completions", data=b"x" * 3000,
                                    headers={"x-request-id": "req-big"})
    assert response.code == 413
    await response.content()
    await gw.stream_then_leave("p", events=1)
    await wait_for(lambda: len(gw.gateway.request_log.history) == 8, what="8 events")

    history = await gw.get_json(f"/v1/history?limit={HISTORY_SIZE}")
    events = history["data"]
    assert history["object"] == "list" and len(events) == 8
    for event in events:
        assert set(event) == set(FIELDS), event
        for name, kind in FIELDS.items():
            assert isinstance(event[name], kind), (name, event)
    # newest first: the client that left is the last request made
    by_id = {e["request_id"]: e for e in events}
    assert [e["request_id"] for e in events][1:3] == ["req-big", "req-bad"]
    left = events[0]
    assert (left["status_code"], left["status"], left["error_type"]) == (
        499, "client_disconnect", "client_disconnect")
    ok = by_id["req-0"]
    assert (ok["status"], ok["backend"], ok["backend_type"], ok["retry_count"]) == (
        "success", "fast", "openai", 0)
    assert ok["route_reason"].startswith("smart:fast:") and ok["tokens_prompt"] == 10
    assert ok["ttft_ms"] is None and ok["stream"] is False and ok["client"] == "127.0.0.1"
    streamed = by_id["req-1"]
    assert streamed["actual_model"] == "m" and streamed["model"] == "alias-m"
    assert streamed["route_reason"].startswith("alias:alias-m:smart:fast:")
    assert streamed["stream"] is True and streamed["ttft_ms"] >= 0
    assert by_id["req-2"]["error_type"] == "no_backend" and by_id["req-2"]["backend"] is None
    failed = by_id["req-3"]
    assert (failed["status_code"], failed["error_type"], failed["retry_count"]) == (
        502, "backend_error", 1)
    assert failed["backend"] in ("down-a", "down-b") and "answered 500" in failed["error_message"]
    assert failed["route_reason"].endswith("all 2 attempts failed")
    assert by_id["req-4"]["error_type"] == "timeout"
    for refused in ("req-bad", "req-big"):
        assert by_id[refused]["actual_model"] is None and by_id[refused]["backend"] is None
        assert by_id[refused]["model"] is None
    assert by_id["req-big"]["status_code"] == 413

    # The same story in /metrics, request by request.
    told = Counter(
        (sanitize_label(e["model"] if e["model"] in ("m", "p", "alias-m", "broken", "hang")
                        else "unknown"),
         sanitize_label(e["backend"] or "none"), str(e["status_code"]))
        for e in events
    )
    for (model, backend, status), count in told.items():
        assert gw.sample(
            "nexus_requests_total", model=model, backend=backend, status=status
        ) == count, (model, backend, status)
    errors = Counter(e["error_type"] for e in events if e["status"] != "success")
    for error_type, count in errors.items():
        total = sum(
            gw.sample("nexus_errors_total", error_type=error_type, model=m)
            for m in ("m", "p", "alias_m", "broken", "hang", "unknown")
        )
        assert total == count, error_type
    # and the log got exactly one event per request, the same as the history
    assert sorted(e["request_id"] for e in logged.requests()) == sorted(by_id)


@pytest_twisted.ensureDeferred
async def test_history_limit_and_access(cleanup: Cleanup) -> None:
    mock = start_mock("one", ["m"])
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    for i in range(3):
        await (await gw.chat(headers={"x-request-id": f"n{i}"})).content()
    two = await gw.get_json("/v1/history?limit=2")
    assert [e["request_id"] for e in two["data"]] == ["n2", "n1"]
    for bad in ("0", "101", "abc", "-1", "1.5", "9" * 5000, ""):
        response = await gw.client.get(gw.url + "/v1/history?limit=" + bad)
        assert response.code == 400, bad
        error = json.loads(await response.content())["error"]
        assert error["param"] == "limit" and error["type"] == "invalid_request_error"
    from nexus.access import AccessPolicy

    gw.gateway.api.access = AccessPolicy(api_keys=["key"], metrics_token="token")
    assert (await gw.client.get(gw.url + "/v1/history")).code == 401
    response = await gw.client.get(gw.url + "/v1/history",
                                   headers={"Authorization": "Bearer token"})
    assert response.code == 200
    await response.content()


def test_history_is_a_ring_and_the_log_can_be_off(logged: LogCapture) -> None:
    quiet = RequestLog(log_requests=False)
    for i in range(HISTORY_SIZE * 3):
        record = RequestRecord(started=0.0, request_id=f"r{i}", model="m")
        record.finish(200, 0.25)
        quiet.record(record)
    assert len(quiet.history) == HISTORY_SIZE  # no growth under load
    assert quiet.recent(1)[0]["request_id"] == f"r{HISTORY_SIZE * 3 - 1}"
    assert logged.requests() == []
    record = RequestRecord(started=0.0, request_id="p", model="m", prompt_preview="hello")
    record.finish(200, 0.001)
    RequestLog().record(record)
    [event] = logged.requests()
    assert event["prompt_preview"] == "hello"  # in the log, with content_preview on
    assert "prompt_preview" not in request_event(record)  # never in the history


def test_a_request_event_is_what_twisted_s_logger_would_publish(logged: LogCapture) -> None:
    # RequestLog builds the event itself (Logger.info sorts every level per call):
    # observers must still get every key twisted.logger gives an event.
    record = RequestRecord(started=0.0, request_id="abc", model="m", backend="b")
    record.finish(200, 0.25)
    before = time.time()
    RequestLog().record(record)
    [event] = [e for e in logged.events if e.get("log_namespace") == NAMESPACE]
    assert event["log_level"] is LogLevel.info
    assert isinstance(event["log_logger"], Logger) and event["log_logger"].namespace == NAMESPACE
    assert event["log_source"] is None
    assert before <= event["log_time"] <= time.time()
    assert formatEvent(event) == event["summary"] == summary(event["request"])


def test_a_summary_line_is_one_line() -> None:
    from nexus.requestlog import summary

    record = RequestRecord(started=0.0, request_id="r", model="evil\nname\r\x1b[31m",
                           error_type="no_backend", error_message="Model 'evil\nname' unknown")
    record.finish(404, 0.002)
    line = summary(request_event(record))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.startswith("r chat evil name") and "404" in line


@pytest_twisted.ensureDeferred
async def test_other_requests_are_not_logged_at_info(cleanup: Cleanup, logged: LogCapture) -> None:
    mock = start_mock("one", ["m"])
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    for path in ("/metrics", "/health", "/v1/stats", "/v1/models", "/v1/history"):
        await (await gw.client.get(gw.url + path)).content()
    await (await gw.chat()).content()
    await wait_for(lambda: len(logged.requests()) == 1, what="the request's event")
    namespaces = Counter(e.get("log_namespace") for e in logged.events)
    assert namespaces[NAMESPACE] == 1 and namespaces["nexus.access"] == 0
    gw.gateway.site.debug_access = True  # [logging] level = "debug"
    await (await gw.client.get(gw.url + "/metrics")).content()
    access = [e for e in logged.events if e.get("log_namespace") == "nexus.access"]
    assert [(e["method"], e["path"], e["code"]) for e in access] == [("GET", "/metrics", 200)]


SECRETS = ("sk-client-secret", "sk-backend-secret", "sk-wrong-key", "top-secret-prompt",
           "secret-garbage", "Bearer sk")


async def _twistd_gateway(tmp_path: Path, config: str, **popen: Any) -> tuple[Any, str]:
    port = free_port()
    path = tmp_path / "nexus.toml"
    path.write_text(f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\n' + config)
    process = subprocess.Popen(
        [*TWISTD, "--pidfile=", "-n", "nexus", "--config", str(path)],
        cwd=tmp_path, env={**twistd_env(), "BACKEND_KEY": "sk-backend-secret"}, **popen,
    )
    url = f"http://127.0.0.1:{port}"
    client = http_client()

    async def up() -> bool:
        assert process.poll() is None
        try:
            response = await client.get(url + "/health")
            await response.content()
        except Exception:
            return False
        return bool(response.code == 200)

    await wait_for(up, timeout=20, what="twistd nexus healthy")
    return process, url


@pytest_twisted.ensureDeferred
async def test_the_log_never_holds_keys_or_bodies(tmp_path: Path, cleanup: Cleanup) -> None:
    mock = start_mock("keyed", ["m"])
    cleanup.append(mock)
    process, url = await _twistd_gateway(
        tmp_path,
        'api_keys = ["sk-client-secret"]\n[logging]\nformat = "json"\nlevel = "debug"\n'
        f'[[backends]]\nname = "keyed"\nurl = "{mock.url}"\napi_key_env = "BACKEND_KEY"\n',
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    client = http_client()
    try:
        prompt = {"model": "m", "messages": [{"role": "user", "content": "top-secret-prompt"}]}
        for key, body, expect in (
            ("sk-client-secret", json.dumps(prompt).encode(), 200),
            ("sk-client-secret", json.dumps({**prompt, "stream": True}).encode(), 200),
            ("sk-wrong-key", json.dumps(prompt).encode(), 401),
            ("sk-client-secret", b"secret-garbage{", 400),
        ):
            response = await client.post(url + "/v1/chat/completions", data=body,
                                         headers={"Authorization": f"Bearer {key}"})
            await response.content()
            assert response.code == expect
        sent = mock.stats()["last_request"]["headers"]
        assert sent["authorization"] == "Bearer sk-backend-secret"
        await (await client.get(url + "/metrics")).content()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    text = output.decode()
    for secret in SECRETS:
        assert secret not in text, secret
    lines = [json.loads(line) for line in text.splitlines()]
    events = [line for line in lines if line["namespace"] == NAMESPACE]
    assert [e["status_code"] for e in events] == [200, 200, 401, 400]
    assert [e["model"] for e in events] == ["m", "m", "m", None]  # as asked, even when refused
    assert any(line["namespace"] == "nexus.access" for line in lines)  # debug: scrapes too


@pytest_twisted.ensureDeferred
async def test_a_log_destination_that_fails_never_fails_requests(
    tmp_path: Path, cleanup: Cleanup
) -> None:
    mock = start_mock("one", ["m"])
    cleanup.append(mock)
    read_end, write_end = os.pipe()
    process, url = await _twistd_gateway(
        tmp_path, f'[[backends]]\nname = "one"\nurl = "{mock.url}"\n',
        stdout=write_end, stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    os.close(read_end)  # the reader is gone: every log write now fails (EPIPE)
    client = http_client()
    try:
        for _ in range(5):
            response = await client.post(
                url + "/v1/chat/completions", data=b'{"model": "m", "messages": []}'
            )
            assert response.code == 200
            await response.content()
        metrics = await (await client.get(url + "/metrics")).text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    [dropped] = [line for line in metrics.splitlines()
                 if line.startswith("nexus_log_events_dropped_total ")]
    assert float(dropped.split()[1]) >= 5  # every request event, at least


@pytest_twisted.ensureDeferred
async def test_content_preview_goes_to_the_log_only(cleanup: Cleanup, logged: LogCapture) -> None:
    mock = start_mock("one", ["m"])
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    await (await gw.chat()).content()
    await wait_for(lambda: len(logged.requests()) == 1, what="the request's event")
    assert "prompt_preview" not in logged.requests()[0]  # off by default
    gw.gateway.api.proxy.content_preview = True  # [logging] content_preview = true
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "z" * 150}]},
    ]
    response = await gw.client.post(
        gw.url + "/v1/chat/completions",
        data=json.dumps({"model": "m", "messages": messages}).encode(),
    )
    await response.content()
    await wait_for(lambda: len(logged.requests()) == 2, what="the second request's event")
    assert logged.requests()[1]["prompt_preview"] == "z" * 100  # the last user message, cut
    history = await gw.get_json("/v1/history")
    assert all("prompt_preview" not in event for event in history["data"])
