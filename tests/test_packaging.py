"""Packaging: every declared runtime dependency is imported somewhere, and nothing the
package imports at runtime is undeclared (optional extras are imported lazily)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def _top_level_imports() -> set[str]:
    """Modules imported at module level (not inside functions) by the package."""
    found: set[str] = set()
    for path in (ROOT / "cacheroute").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_no_runtime_dependency_is_declared_without_an_import() -> None:
    declared = [d.split(">")[0].split("=")[0].split("[")[0] for d in _declared()[""]]
    imported = _top_level_imports()
    assert not [d for d in declared if d.replace("-", "_") not in imported]


def test_the_package_imports_only_the_standard_library_at_module_level() -> None:
    third_party = {
        m
        for m in _top_level_imports()
        if m not in sys.stdlib_module_names and m not in ("cacheroute", "__future__")
    }
    # Integrations guard their imports (TYPE_CHECKING or inside functions).
    assert third_party <= {"hypothesis"}, third_party  # cacheroute.testing needs the test extra
