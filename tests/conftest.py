"""Shared fixtures: an isolated catalog and Minari root per test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import make_dataset

from datasets.catalog import Catalog
from datasets.types import Dataset


@pytest.fixture
def dataset_factory() -> Callable[..., Dataset]:
    return make_dataset


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog")


@pytest.fixture(autouse=True)
def isolated_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches ~/.rlsynth, ~/.minari or ~/.cache."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("RLSYNTH_CATALOG", str(tmp_path / "default-catalog"))
    monkeypatch.setenv("RLSYNTH_CACHE", str(tmp_path / "cache"))
