"""Packages import only downward — datasets ← generators ← guidance ← offline_rl ← pipeline — and only
``pipeline`` knows Ray. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("datasets", "generators", "guidance", "offline_rl", "pipeline")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    out = []
    for rank, package in enumerate(LAYERS):
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                where = f"{path.relative_to(REPO)}:{line}"
                if top in LAYERS and LAYERS.index(top) > rank:
                    out.append(f"{where}: {package} imports {module} (a layer above it)")
                if top == "ray" and package != "pipeline":
                    out.append(f"{where}: only pipeline may use Ray")
    return out


def test_packages_import_only_downward_and_only_pipeline_uses_ray() -> None:
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from offline_rl.train import fit\n")
    assert imported_modules(bad) == [(2, "offline_rl.train")]
