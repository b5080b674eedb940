"""The shipped dashboard and alerts use only metrics Nexus exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus.metrics.families import FAMILIES

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "nexus-dashboard.json"
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
DOCS = ROOT / "docs" / "metrics.md"

EXPORTED = {name for family in FAMILIES for name in family.sample_names}
# PromQL words that are not metric names.
PROMQL = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
    "topk", "bottomk", "clamp_min", "clamp_max", "abs", "bool", "offset", "label_values",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that can only be metric names."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL
    # label_values(metric, label): the label is not a metric name.
    names -= set(re.findall(r"label_values\(\s*\w+\s*,\s*(\w+)\s*\)", expr))
    return names


def _exprs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_metric_names_finds_what_a_query_selects() -> None:
    expr = 'sum by (le, model) (rate(nexus_x_bucket{model=~"$model",le="1"}[5m])) / up'
    assert metric_names(expr) == {"nexus_x_bucket", "up"}


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exprs = list(_exprs(dashboard["panels"])) + list(_exprs(dashboard["templating"]))
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= EXPORTED, f"{expr!r} uses {names - EXPORTED}"
        used |= names
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    # Every family is on the dashboard somewhere (build info is for joins, not a panel).
    assert {f.name for f in FAMILIES} - {"nexus_build_info"} <= {
        re.sub(r"_(bucket|count|sum)$", "", name) for name in used
    }


def test_alerts_and_docs_use_only_exported_metrics() -> None:
    exprs = re.findall(r"expr: \|\n((?:\s{10}.*\n)+)|expr: (.+)", ALERTS.read_text())
    assert len(exprs) == 3
    for block, line in exprs:
        names = metric_names(block or line)
        assert names and names <= EXPORTED, names
    queries = re.search(r"## Useful queries\n+```promql\n(.*?)```", DOCS.read_text(), re.S)
    assert queries is not None
    for line in queries.group(1).splitlines():
        if line.strip() and not line.startswith("#"):
            assert metric_names(line) <= EXPORTED, line


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_is_documented(family: object) -> None:
    assert f"`{family.name}`" in DOCS.read_text()  # type: ignore[attr-defined]
