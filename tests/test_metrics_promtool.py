"""promtool on our exposition and on the shipped Prometheus configuration.

These need the ``promtool`` binary (Debian package ``prometheus``; the CI script
installs it). Without it they fail: a skipped lint is a lint nobody ran.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_metrics_support import make_collector, record_scenario

DOCS = Path(__file__).parent.parent / "docs" / "prometheus"
#: The only findings contract section 5 allows: its two legacy `_total` names.
EXPECTED_FINDINGS = {
    'nexus_backends_total non-counter metrics should not have "_total" suffix',
    'nexus_tokens_total non-counter metrics should not have "_total" suffix',
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install it (apt-get install -y prometheus) to run the "
            "exposition and alert-rule checks"
        )
    return path


def _run(
    promtool: str, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args],
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("traffic", [False, True], ids=["fresh", "after-traffic"])
def test_check_metrics_finds_only_the_two_legacy_names(promtool: str, traffic: bool) -> None:
    collector, _ = make_collector()
    if traffic:
        record_scenario(collector)
    result = _run(promtool, "check", "metrics", stdin=collector.render())
    findings = {
        line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()
    }
    # promtool only lints families that have samples: no tokens yet, no finding for them.
    expected = EXPECTED_FINDINGS if traffic else {
        f for f in EXPECTED_FINDINGS if f.startswith("nexus_backends_total")
    }
    assert findings == expected, result
    # promtool exits 3 for lint findings; 1 would be a parse error.
    assert result.returncode == 3, result


def test_check_rules_accepts_the_alerts(promtool: str) -> None:
    result = _run(promtool, "check", "rules", str(DOCS / "alerts.yml"))
    assert result.returncode == 0, result
    assert "SUCCESS: 3 rules found" in result.stdout


def test_check_config_accepts_the_scrape_config(promtool: str) -> None:
    result = _run(promtool, "check", "config", str(DOCS / "nexus.yml"))
    assert result.returncode == 0, result
    assert "1 rule files found" in result.stdout
