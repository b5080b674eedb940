"""The real ``twistd nexus`` as a subprocess: start-up, a completion, shutdown, bad configs."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.support import TWISTD, free_port, http_client, start_mock, twistd_env, wait_for


def assert_clean_stop(process: subprocess.Popen[bytes], output: bytes) -> None:
    """twistd shut down in order; it re-raises SIGTERM on itself, hence -SIGTERM."""
    assert process.returncode in (0, -signal.SIGTERM), output
    assert b"Server Shut Down." in output, output
    assert b"Traceback" not in output and b"Unhandled" not in output, output


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return path


@pytest_twisted.ensureDeferred
async def test_twistd_serves_a_completion_and_stops_on_sigterm(tmp_path: Path) -> None:
    mock = start_mock("real", ["llama3:8b"])
    port = free_port()
    config = write_config(
        tmp_path,
        f"""
[server]
listen = "tcp:{port}:interface=127.0.0.1"
[health_check]
interval_seconds = 1
[routing.aliases]
fast = "llama3:8b"
typo = "lama3:8b"
[[backends]]
name = "real"
url = "{mock.url}"
""",
    )
    process = subprocess.Popen(
        [*TWISTD, "--pidfile=", "-n", "nexus", "--config", str(config)],
        cwd=tmp_path,
        env=twistd_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    client = http_client()
    try:
        async def healthy() -> bool:
            assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
            try:
                response = await client.get(url + "/health")
            except Exception:
                return False
            return (json.loads(await response.content()))["status"] == "healthy"

        await wait_for(healthy, timeout=20, what="twistd nexus healthy")
        response = await client.post(
            url + "/v1/chat/completions",
            data=json.dumps({"model": "llama3:8b", "messages": []}).encode(),
        )
        assert response.code == 200
        answer = json.loads(await response.content())
        assert answer["choices"][0]["message"]["content"] == "Hello from real"
        metrics = await (await client.get(url + "/metrics")).text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
        }
        key = (
            "nexus_requests_total",
            (("backend", "real"), ("model", "llama3_8b"), ("status", "200")),
        )
        assert samples[key] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
        await mock.stop()
    assert_clean_stop(process, output)
    # an alias nobody can serve is named once the first health round knows the models
    warnings = [line for line in output.decode().splitlines() if "routing:" in line]
    assert len(warnings) == 1, output
    assert warnings[0].endswith("routing: alias 'typo' leads to 'lama3:8b', which no backend lists")


@pytest_twisted.ensureDeferred
async def test_demo_mode_answers_a_completion(tmp_path: Path) -> None:
    """``twistd -n nexus`` with no config starts a demo backend and serves it at once."""
    port = free_port()
    process = subprocess.Popen(
        [*TWISTD, "--pidfile=", "-n", "nexus", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=tmp_path,
        env=twistd_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    client = http_client()
    answers: list[Any] = []
    try:
        async def answered() -> bool:
            assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
            try:
                response = await client.post(url, data=b'{"model": "demo", "messages": []}')
            except Exception:
                return False
            if response.code != 200:
                return False
            answers.append(json.loads(await response.content()))
            return True

        await wait_for(answered, timeout=20, what="a demo completion")
        assert answers[0]["choices"][0]["message"]["content"] == "Hello from demo"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    assert_clean_stop(process, output)


BAD_CONFIGS: list[tuple[str, str]] = [
    ("[server\nlisten = 1", "invalid TOML"),
    ("[server]\nrequest_timeout_seconds = 'abc'", "server.request_timeout_seconds"),
    ("[routing]\nstrategy = 'fastest'", "routing.strategy"),
    (
        "[[backends]]\nname='a'\nurl='http://127.0.0.1:1'\n"
        "[[backends]]\nname='a'\nurl='http://127.0.0.1:2'",
        "backends[1].name",
    ),
    ("[routing.aliases]\na = 'b'\nb = 'a'", "routing.aliases"),
    ("[[backends]]\nname='a'\nurl='ftp://x'", "backends[0].url"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
def test_bad_config_stops_startup_with_one_line(tmp_path: Path, text: str, key: str) -> None:
    config = write_config(tmp_path, text)
    result = subprocess.run(
        [*TWISTD, "--pidfile=", "-n", "nexus", "--config", str(config)],
        cwd=tmp_path,
        env=twistd_env(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode()
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert str(config) in lines[0] and key in lines[0], output
    assert "Traceback" not in output


def test_listen_backlog_is_raised_unless_set() -> None:
    from nexus.service import LISTEN_BACKLOG, with_backlog

    assert with_backlog("tcp:8000") == f"tcp:8000:backlog={LISTEN_BACKLOG}"
    assert with_backlog("tcp:8000:backlog=64") == "tcp:8000:backlog=64"
    assert with_backlog("unix:/tmp/nexus.sock") == f"unix:/tmp/nexus.sock:backlog={LISTEN_BACKLOG}"


def run_twistd(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [*TWISTD, "--pidfile=", "-n", "nexus", *args],
        cwd=tmp_path, env=twistd_env(), capture_output=True, timeout=60,
    )
    return result.returncode, (result.stdout + result.stderr).decode()


def test_bad_listen_and_busy_port_stop_startup_with_one_line(tmp_path: Path) -> None:
    code, output = run_twistd(tmp_path, "--listen", "nonsense:8000")
    assert code != 0 and "Traceback" not in output
    assert output.strip().splitlines() == [
        "nexus: bad listen description 'nonsense:8000': Unknown endpoint type: 'nonsense'"
    ]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, output = run_twistd(tmp_path, "--listen", f"tcp:{port}:interface=127.0.0.1")
    assert code != 0 and "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if "nexus:" in line]
    assert line.endswith(
        f"nexus: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
    )


def test_workers_refuse_what_they_cannot_share_with_one_line(tmp_path: Path) -> None:
    code, output = run_twistd(tmp_path, "--workers", "2", "--listen", "unix:nexus.sock")
    assert code != 0 and "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if "nexus:" in line]
    assert "workers listen on tcp: or tcp6:" in line and "workers = 1" in line
    code, output = run_twistd(tmp_path, "--workers", "none")
    assert code != 0 and "Traceback" not in output, output
    assert output.strip().splitlines() == [
        "nexus: --workers: must be a positive integer or \"auto\", got 'none'"
    ]
    with socket.socket() as busy:  # a busy port: the same line as one process gives
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, output = run_twistd(
            tmp_path, "--workers", "2", "--listen", f"tcp:{port}:interface=127.0.0.1"
        )
    assert code != 0 and "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if "nexus:" in line]
    assert line.endswith(
        f"nexus: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
    )


def test_version_and_help(tmp_path: Path) -> None:
    from nexus import __version__

    code, output = run_twistd(tmp_path, "--version")
    assert code == 0 and output.startswith(f"nexus {__version__} ")
    code, output = run_twistd(tmp_path, "--help")
    assert code == 0
    assert "default tcp:8000:interface=127.0.0.1" in " ".join(output.split())
    assert "docs/configuration.md" in output


def test_an_exposed_listener_without_keys_is_warned_about(tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    from nexus.service import makeService

    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(formatEvent(event))

    config = write_config(tmp_path, '[[backends]]\nname = "a"\nurl = "http://127.0.0.1:9"\n')
    globalLogPublisher.addObserver(observe)
    try:
        makeService({"config": str(config), "listen": "tcp:8000"}, reactor=MemoryReactorClock())
        assert len(warnings) == 1 and "api_keys" in warnings[0], warnings
        makeService({"config": str(config)}, reactor=MemoryReactorClock())  # loopback: quiet
        assert len(warnings) == 1, warnings
    finally:
        globalLogPublisher.removeObserver(observe)
