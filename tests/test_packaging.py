"""The distribution ships every package of the source tree (an installed gateway imports them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def listed_packages() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return {ast.literal_eval(item) for item in node.value.elts}  # type: ignore[attr-defined]
    raise AssertionError("setup.py lists no packages")


def test_every_package_under_nexus_is_in_setup_py() -> None:
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "nexus").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= listed_packages(), sorted(found - listed_packages())
