"""Packages import only downward — datasets ← generators ← guidance ← offline_rl ← pipeline — always as
``rlsynth.<layer>``, and only ``pipeline`` knows Ray. Every import counts, even inside functions."""

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


def violations(root: Path = REPO) -> list[str]:
    out = []
    for rank, package in enumerate(LAYERS):
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path):
                parts = module.split(".")
                top = parts[1] if parts[0] == "rlsynth" and len(parts) > 1 else parts[0]
                where = f"{path.relative_to(root)}:{line}"
                if parts[0] in LAYERS:
                    out.append(
                        f"{where}: import {module} as rlsynth.{module} (the bare name is someone else's)"
                    )
                if top in LAYERS and LAYERS.index(top) > rank:
                    out.append(f"{where}: {package} imports {module} (a layer above it)")
                if top == "ray" and package != "pipeline":
                    out.append(f"{where}: only pipeline may use Ray")
    return out


def test_packages_import_only_downward_and_only_pipeline_uses_ray() -> None:
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from rlsynth.offline_rl.train import fit\n")
    assert imported_modules(bad) == [(2, "rlsynth.offline_rl.train")]


def test_bare_layer_names_are_refused(tmp_path: Path) -> None:
    """``import datasets`` inside rlsynth would load Hugging Face's package, not ours."""
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "m.py").write_text("import datasets.types\n")
    assert violations(tmp_path) == [
        "datasets/m.py:1: import datasets.types as rlsynth.datasets.types (the bare name is someone else's)"
    ]
