"""The decoded-version cache: hits return identical data, damage is detected and rebuilt, it can be off."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_transitions, make_dataset

from datasets import cache
from datasets.catalog import Catalog


def _entry(catalog: Catalog, ref: str) -> Path:
    digest = catalog.manifest(ref)["content_hash"].split(":")[1]
    return Path(os.environ["RLSYNTH_CACHE"]) / "arrays" / digest


def test_second_read_comes_from_the_cache_and_is_identical(catalog: Catalog) -> None:
    ds = make_dataset()
    ref = str(catalog.write("toy", ds))
    assert cache.load(catalog.manifest(ref)["content_hash"]) is None
    first = catalog.read(ref)
    assert (_entry(catalog, ref) / "index.json").exists()
    second = catalog.read(ref)
    assert_same_transitions(first, ds)
    assert_same_transitions(second, ds)
    assert isinstance(second.transitions.observations, np.memmap)
    assert not second.transitions.observations.flags.writeable


def test_damaged_cache_is_detected_removed_and_rebuilt(catalog: Catalog) -> None:
    ds = make_dataset()
    ref = str(catalog.write("toy", ds))
    catalog.read(ref)
    f = _entry(catalog, ref) / "rewards.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10
    f.write_bytes(bytes(data))
    assert cache.load(catalog.manifest(ref)["content_hash"]) is None
    assert not _entry(catalog, ref).exists()
    assert_same_transitions(catalog.read(ref), ds)  # served from the catalog, cache rebuilt
    assert (_entry(catalog, ref) / "index.json").exists()


def test_cache_can_be_turned_off(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSYNTH_CACHE", "off")
    ref = str(catalog.write("toy", make_dataset()))
    catalog.read(ref)
    assert cache.cache_root() is None
    assert cache.load(catalog.manifest(ref)["content_hash"]) is None


def test_bad_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        cache.load("sha256:../../etc")
