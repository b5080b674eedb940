"""A real Prometheus scrapes a real ``twistd nexus``, with the repo's scrape config and alerts.

The gateway runs as the ``twistd -n nexus`` subprocess in front of an in-process mock
backend; after some traffic, ``/usr/bin/prometheus`` (scripts/ensure-system-tools installs
it) is started with ``docs/prometheus/nexus.yml`` rewritten for the test's ports and a 1 s
scrape interval, and must see exactly the requests that were sent.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest_twisted

from tests.support import ROOT, TWISTD, free_port, http_client, start_mock, twistd_env, wait_for

SCRAPE_CONFIG = ROOT / "docs" / "prometheus" / "nexus.yml"
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"

SUCCESSES = 21
UNKNOWN_MODEL = 4
N = SUCCESSES + UNKNOWN_MODEL


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    assert path is not None, (
        "the prometheus server is not installed: run scripts/ensure-system-tools"
    )
    return path


def scrape_config(gateway_port: int) -> tuple[str, str]:
    """docs/prometheus/nexus.yml for this test: (config text, job name).

    Same job, target and labels; the target points at the test's gateway, both
    intervals are 1 s and the rule file is the repo's alerts.yml (absolute path).
    """
    text = SCRAPE_CONFIG.read_text()
    job = re.search(r"^\s*-\s*job_name:\s*[\"']?([\w-]+)", text, re.MULTILINE)
    assert job is not None, "no job_name in docs/prometheus/nexus.yml"
    changes = [
        (r"(scrape_interval:\s*)\S+", r"\g<1>1s"),
        (r"(evaluation_interval:\s*)\S+", r"\g<1>1s"),
        (r"(-\s*)[\"']?alerts\.yml[\"']?", rf"\g<1>{json.dumps(str(ALERTS))}"),
        (r"127\.0\.0\.1:8000", f"127.0.0.1:{gateway_port}"),
    ]
    for pattern, replacement in changes:
        text, n = re.subn(pattern, replacement, text)
        assert n >= 1, f"docs/prometheus/nexus.yml changed shape: no match for {pattern!r}"
    return text, job.group(1)


def alert_groups() -> set[str]:
    return set(re.findall(r"^  - name:\s*[\"']?([\w.-]+)", ALERTS.read_text(), re.MULTILINE))


async def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then wait (without blocking the reactor); SIGKILL if it will not stop."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            await wait_for(lambda: process.poll() is not None, timeout=15, what="exit")
        except AssertionError:
            process.kill()
            process.wait(timeout=5)


async def get_json(url: str, **params: str) -> Any:
    response = await http_client().get(url, params=params or None)
    body = await response.content()
    assert response.code == 200, (url, response.code, body[:500])
    return json.loads(body)


@pytest_twisted.ensureDeferred
async def test_prometheus_scrapes_what_the_gateway_served(tmp_path: Path) -> None:
    prometheus = prometheus_binary()
    mock = start_mock("real", ["llama3:8b"])
    gateway_port = free_port()
    config = tmp_path / "nexus.toml"
    config.write_text(
        f"""
[server]
listen = "tcp:{gateway_port}:interface=127.0.0.1"
[health_check]
interval_seconds = 1
[[backends]]
name = "real"
url = "{mock.url}"
"""
    )
    gateway_log = (tmp_path / "twistd.log").open("wb")
    gateway = subprocess.Popen(
        [*TWISTD, "--pidfile=", "-n", "nexus", "--config", str(config)],
        cwd=tmp_path,
        env=twistd_env(),
        stdout=gateway_log,
        stderr=subprocess.STDOUT,
    )
    prom_process: subprocess.Popen[bytes] | None = None
    prom_log = (tmp_path / "prometheus.log").open("wb")
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    client = http_client()

    def logs() -> str:
        gateway_log.flush()
        prom_log.flush()
        return "\n".join(
            f"--- {name} ---\n" + (tmp_path / name).read_text(errors="replace")[-4000:]
            for name in ("twistd.log", "prometheus.log")
        )

    try:
        async def healthy() -> bool:
            assert gateway.poll() is None, logs()
            try:
                response = await client.get(gateway_url + "/health")
            except Exception:
                return False
            return bool(json.loads(await response.content())["status"] == "healthy")

        await wait_for(healthy, timeout=20, what="twistd nexus healthy")

        for i in range(N):
            model = "llama3:8b" if i % 7 else "no-such-model"  # 0, 7, 14, 21: unknown
            response = await client.post(
                gateway_url + "/v1/chat/completions",
                data=json.dumps({"model": model, "messages": []}).encode(),
                headers={"Content-Type": "application/json"},
            )
            await response.content()
            assert response.code == (200 if model == "llama3:8b" else 404)
        assert mock.stats()["chat_requests"] == SUCCESSES

        text, job = scrape_config(gateway_port)
        prom_config = tmp_path / "prometheus.yml"
        prom_config.write_text(text)
        prom_port = free_port()
        prom_url = f"http://127.0.0.1:{prom_port}"
        prom_process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            cwd=tmp_path,
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )

        async def query(expr: str) -> list[dict[str, Any]]:
            answer = await get_json(prom_url + "/api/v1/query", query=expr)
            assert answer["status"] == "success", answer
            result: list[dict[str, Any]] = answer["data"]["result"]
            return result

        targets: list[dict[str, Any]] = []

        async def target_up() -> bool:
            assert prom_process is not None and prom_process.poll() is None, logs()
            try:
                answer = await get_json(prom_url + "/api/v1/targets")
            except Exception:
                return False
            targets[:] = answer["data"]["activeTargets"]
            return any(t["health"] == "up" for t in targets)

        await wait_for(target_up, timeout=30, what="the nexus target up")
        assert len(targets) == 1, targets
        target = targets[0]
        assert target["labels"]["job"] == job
        assert target["labels"]["service"] == "nexus"
        assert target["scrapeUrl"] == f"{gateway_url}/metrics"
        assert target["lastError"] == ""

        total: list[float] = []

        async def counted() -> bool:
            result = await query("sum(nexus_requests_total)")
            total[:] = [float(r["value"][1]) for r in result]
            return total == [N]

        await wait_for(counted, timeout=20, what=f"sum(nexus_requests_total) == {N}")

        up = await query(f'up{{job="{job}"}}')
        assert [float(r["value"][1]) for r in up] == [1.0]
        by_status = {
            r["metric"]["status"]: float(r["value"][1])
            for r in await query("sum by (status) (nexus_requests_total)")
        }
        assert by_status == {"200": SUCCESSES, "404": UNKNOWN_MODEL}
        by_model = {
            (r["metric"]["model"], r["metric"]["backend"]): float(r["value"][1])
            for r in await query("sum by (model, backend) (nexus_requests_total)")
        }
        assert by_model == {("llama3_8b", "real"): SUCCESSES, ("unknown", "none"): UNKNOWN_MODEL}
        errors = await query('nexus_errors_total{error_type="no_backend"}')
        assert [float(r["value"][1]) for r in errors] == [UNKNOWN_MODEL]
        assert [float(r["value"][1]) for r in await query("nexus_backends_healthy")] == [1.0]
        durations = await query("sum(nexus_request_duration_seconds_count)")
        assert [float(r["value"][1]) for r in durations] == [N]

        # The alert rules loaded, and every rule evaluates without an error on real data.
        groups: list[dict[str, Any]] = []
        rules: list[dict[str, Any]] = []

        async def rules_evaluated() -> bool:
            groups[:] = (await get_json(prom_url + "/api/v1/rules"))["data"]["groups"]
            rules[:] = [r for g in groups for r in g["rules"]]
            loaded = {g["name"] for g in groups}
            assert loaded == alert_groups(), (loaded, alert_groups())
            return bool(rules) and all(r["health"] == "ok" for r in rules)

        await wait_for(rules_evaluated, timeout=20, what="every alert rule evaluated ok")
        assert {g["file"] for g in groups} == {str(ALERTS)}
        alerts = re.findall(r"^\s*- alert:\s*(\S+)", ALERTS.read_text(), re.MULTILINE)
        assert sorted(r["name"] for r in rules if r["type"] == "alerting") == sorted(alerts)
        # Nothing fires on this healthy, error-free-enough traffic at once ("for:" holds them).
        firing = [r["name"] for r in rules if r.get("state") == "firing"]
        assert firing == [], firing

        # Which exposition format did Prometheus negotiate? Its metadata names a counter
        # family "nexus_requests" when it parsed OpenMetrics ("# TYPE nexus_requests
        # counter") and "nexus_requests_total" when it parsed the 0.0.4 text format.
        metadata = (await get_json(prom_url + "/api/v1/metadata"))["data"]
        assert "nexus_requests" in metadata, sorted(metadata)
        assert "nexus_requests_total" not in metadata, sorted(metadata)
        assert metadata["nexus_requests"][0]["type"] == "counter"
    finally:
        if prom_process is not None:
            await stop(prom_process)
        await stop(gateway)
        await mock.stop()
        gateway_log.close()
        prom_log.close()
    output = (tmp_path / "twistd.log").read_text(errors="replace")
    assert "Traceback" not in output and "Unhandled" not in output, output
    assert gateway.returncode in (0, -signal.SIGTERM), output
    assert prom_process.returncode == 0, logs()
