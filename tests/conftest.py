"""Shared fixtures: an isolated catalog and Minari root per test, tiny generators trained once per session."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import SharedGenerator, generator_cache, make_dataset

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.types import Dataset


@pytest.fixture
def dataset_factory() -> Callable[..., Dataset]:
    return make_dataset


@pytest.fixture(scope="session")
def shared_generator(tmp_path_factory: pytest.TempPathFactory) -> SharedGenerator:
    """``shared_generator(kind, steps=10, **model_overrides)``: a tiny generator trained once per session
    (:func:`helpers.generator_cache`); tests must not write into its folder."""
    return generator_cache(tmp_path_factory.mktemp("shared-generators"))


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog")


@pytest.fixture(autouse=True)
def isolated_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches ~/.rlsynth, ~/.minari or ~/.cache."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("RLSYNTH_CATALOG", str(tmp_path / "default-catalog"))
    monkeypatch.setenv("RLSYNTH_CACHE", str(tmp_path / "cache"))


_EXIT_STATUS = "_rlsynth_exit_status"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    setattr(session.config, _EXIT_STATUS, int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit with pytest's status once every report is out, skipping C++ static destruction.

    Why: as with the CLI (``pipeline.cli.entry``), a native library's worker thread is sometimes destroyed
    while still joinable at interpreter shutdown, and the process dies by a signal after every test has
    passed (seen once in two full runs here, 526 passed then SIGSEGV). Python's atexit handlers (Ray's
    shutdown, temporary files) still run first.
    """
    status = getattr(config, _EXIT_STATUS, None)
    if status is None:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
