"""The decoded-version cache: hits return identical data, damage is detected and rebuilt, it can be off,
and a hit never hides a damaged catalog (what it trusts is in :mod:`datasets.cache`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_transitions, make_dataset

from rlsynth.datasets import cache
from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.errors import CatalogError


def _entry(catalog: Catalog, ref: str) -> Path:
    digest = catalog.manifest(ref)["content_hash"].split(":")[1]
    return Path(os.environ["RLSYNTH_CACHE"]) / "arrays" / digest


def _flip_a_bit(f: Path) -> bytes:
    """Damage one bit near the end of ``f`` (in the array data, past the header); returns the damaged
    bytes."""
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10
    f.write_bytes(bytes(data))
    return bytes(data)


def _part(catalog: Catalog) -> Path:
    return next(Path(catalog.root).rglob("part-*.parquet"))


def test_second_read_comes_from_the_cache_and_is_identical(catalog: Catalog) -> None:
    ds = make_dataset()
    ref = str(catalog.write("toy", ds))
    assert not _entry(catalog, ref).exists()
    first = catalog.read(ref)
    assert (_entry(catalog, ref) / "index.json").exists()
    # The first read streamed the parts into the entry and maps it: it never held the version twice.
    assert isinstance(first.transitions.observations, np.memmap)
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
    data = _flip_a_bit(f)
    back = catalog.read(ref)  # read from the catalog again, into a rebuilt entry
    assert f.read_bytes() != data
    assert_same_transitions(back, ds)
    assert (_entry(catalog, ref) / "index.json").exists()
    assert isinstance(catalog.read(ref).transitions.rewards, np.memmap)


def test_cache_can_be_turned_off(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSYNTH_CACHE", "off")
    ref = str(catalog.write("toy", make_dataset()))
    catalog.read(ref)
    assert cache.cache_root() is None
    assert not (Path(os.environ.get("HOME", "/")) / "off").exists()


def test_bad_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        cache.load("sha256:../../etc", folder="x", stamps=(), expected=cache.Expected(1, 1, 1))


@pytest.mark.parametrize("damage", ["delete", "truncate", "grow"])
def test_a_warm_cache_does_not_hide_a_damaged_part(catalog: Catalog, damage: str) -> None:
    ref = str(catalog.write("toy", make_dataset()))
    catalog.read(ref)
    part = _part(catalog)
    if damage == "delete":
        part.unlink()
    elif damage == "truncate":
        part.write_bytes(part.read_bytes()[:100])
    else:
        part.write_bytes(part.read_bytes() + b"x")
    with pytest.raises(CatalogError, match=r"part-00000\.parquet: is"):
        catalog.read(ref)


def test_a_touched_part_is_read_again_and_checked(catalog: Catalog) -> None:
    ds = make_dataset()
    ref = str(catalog.write("toy", ds))
    catalog.read(ref)
    part = _part(catalog)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, new mtime: the entry was not checked against these bytes
    part.write_bytes(bytes(data))
    with pytest.raises(CatalogError, match="checksum mismatch"):
        catalog.read(ref)


def test_a_manifest_cannot_plant_arrays_under_another_datasets_hash(catalog: Catalog) -> None:
    good = str(catalog.write("good", make_dataset(0)))
    evil = str(catalog.write("evil", make_dataset(1)))
    path = next(Path(catalog.root).glob("evil/_v1/manifest.json"))
    man = json.loads(path.read_text())
    man["content_hash"] = catalog.manifest(good)["content_hash"]
    path.write_text(json.dumps(man))
    with pytest.raises(CatalogError, match="content hash differs"):
        catalog.read(evil)
    assert not _entry(catalog, good).exists()
    assert not list((Path(os.environ["RLSYNTH_CACHE"]) / "arrays").glob(".tmp-*"))  # the filling is gone
    assert_same_transitions(catalog.read(good), make_dataset(0))


def test_a_cache_that_cannot_be_written_falls_back_to_memory(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dataset()
    ref = str(catalog.write("toy", ds))

    def full(self: cache.Filling, t: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.Filling, "add", full)
    back = catalog.read(ref)
    assert_same_transitions(back, ds)
    assert not isinstance(back.transitions.rewards, np.memmap)
    assert not _entry(catalog, ref).exists()
    assert not list(_entry(catalog, ref).parent.glob(".tmp-*"))


def test_a_filled_entry_has_the_crcs_of_the_whole_columns(catalog: Catalog) -> None:
    ds = make_dataset()
    ref = str(catalog.write("toy", ds, rows_per_part=7))  # several parts: the CRCs are chained across them
    catalog.read(ref)
    index = json.loads((_entry(catalog, ref) / "index.json").read_text())
    for c in ("observations", "rewards", "episode_id", "terminals"):
        whole = np.ascontiguousarray(getattr(ds.transitions, c), dtype=cache.DTYPES[c])
        assert index["crc"][c] == cache._crc32(whole)


def test_entries_of_an_older_format_or_other_shape_are_rebuilt(catalog: Catalog) -> None:
    ds = make_dataset()
    ref = str(catalog.write("toy", ds))
    catalog.read(ref)
    index = _entry(catalog, ref) / "index.json"
    index.write_text(json.dumps({"rewards": 1}))  # the layout before format 2
    assert_same_transitions(catalog.read(ref), ds)  # discarded and filled again
    assert json.loads(index.read_text())["format"] == cache.FORMAT
    assert isinstance(catalog.read(ref).transitions.rewards, np.memmap)
    np.save(_entry(catalog, ref) / "rewards.npy", np.zeros(3, np.float32))
    assert_same_transitions(catalog.read(ref), ds)  # wrong row count: discarded, not served


def test_the_same_content_under_another_name_is_checked_against_the_entry_not_written_again(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dataset()
    first = str(catalog.write("a", ds))
    catalog.read(first)
    entry = _entry(catalog, first)
    before = {f.name: f.stat().st_ino for f in entry.glob("*.npy")}
    second = str(catalog.write("b", ds))  # same content hash, another folder: no record for it yet
    assert catalog.manifest(second)["content_hash"] == catalog.manifest(first)["content_hash"]
    fillings: list[object] = []
    real = cache.tempfile.mkdtemp
    monkeypatch.setattr(cache.tempfile, "mkdtemp", lambda **kw: fillings.append(kw) or real(**kw))
    back = catalog.read(second)
    assert_same_transitions(back, ds)
    assert isinstance(back.transitions.rewards, np.memmap)
    # Check-only: no copy was begun, and the entry's files are the ones the first read wrote.
    assert fillings == []
    assert {f.name: f.stat().st_ino for f in entry.glob("*.npy")} == before
    assert not list(entry.parent.glob(".tmp-*"))
    assert len(list((entry / "seen").glob("*.json"))) == 2  # now a hit for both folders


def test_a_damaged_entry_is_never_served_to_a_folder_it_was_not_checked_against(catalog: Catalog) -> None:
    ds = make_dataset()
    first = str(catalog.write("a", ds))
    catalog.read(first)
    f = _entry(catalog, first) / "rewards.npy"
    data = _flip_a_bit(f)
    back = catalog.read(str(catalog.write("b", ds)))  # the parts check; the entry does not
    assert_same_transitions(back, ds)
    assert isinstance(back.transitions.rewards, np.memmap)  # served from a rebuilt entry
    assert f.read_bytes() != data
    assert_same_transitions(catalog.read(first), ds)
