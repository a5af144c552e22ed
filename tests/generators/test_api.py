"""``generators.api`` is the facade other packages, the benchmarks and the tests import from: every name any
of them imports from it exists there, and none of them reaches into a generators module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

from rlsynth.generators import api

REPO = Path(__file__).resolve().parents[2]
CALLERS = ("datasets", "guidance", "offline_rl", "pipeline", "bench", "tests")


def imported_from_generators(path: Path) -> list[tuple[str, str]]:
    """(module, name) of each ``from rlsynth.generators.X import name`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlsynth.generators."):
            found += [(node.module or "", a.name) for a in node.names]
    return found


def caller_files() -> list[Path]:
    return [p for folder in CALLERS for p in sorted((REPO / folder).rglob("*.py"))]


def test_every_name_imported_from_the_facade_is_there() -> None:
    wanted = {
        name
        for path in caller_files()
        for module, name in imported_from_generators(path)
        if module == "rlsynth.generators.api"
    }
    assert wanted, "the scan found no caller"
    assert sorted(n for n in wanted if not hasattr(api, n)) == []
    assert set(api.__all__) >= wanted


def test_no_caller_imports_a_private_name_from_generators() -> None:
    private = [
        f"{path.relative_to(REPO)}: {module}.{name}"
        for path in caller_files()
        for module, name in imported_from_generators(path)
        if name.startswith("_")
    ]
    assert private == []
    uses = [
        f"{path.relative_to(REPO)}: api.{node.attr}"
        for path in caller_files()
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "api"
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]
    assert uses == []
