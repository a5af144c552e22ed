"""Commit merges what each part's writer computed: stats equal those of the concatenated data, the
content hash does not depend on the split, and a summary or part altered in staging is refused."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_same_transitions, make_dataset

from rlsynth.datasets import catalog as catalog_module
from rlsynth.datasets.catalog import Catalog, Transaction, column_stats
from rlsynth.datasets.errors import CatalogError
from rlsynth.datasets.types import Dataset, Transitions

LENGTHS = (1, 7, 30, 2, 11, 5, 64, 3, 9, 1, 17)


def _dataset() -> Dataset:
    return make_dataset(seed=3, lengths=LENGTHS)


def _split(t: Transitions, episodes_per_part: Sequence[int]) -> list[Transitions]:
    """Parts of ``episodes_per_part`` whole episodes each (uneven on purpose)."""
    bounds = t.episode_bounds()
    cuts = np.cumsum([0, *episodes_per_part])
    assert cuts[-1] == len(bounds) - 1
    return [
        Transitions(**{c: getattr(t, c)[bounds[a] : bounds[b]] for c in Transitions.columns()})
        for a, b in itertools.pairwise(cuts)
    ]


def _commit(cat: Catalog, name: str, ds: Dataset, parts: Sequence[Transitions]) -> str:
    txn = cat.begin(name, ds.info)
    written = [txn.write_part(i, p) for i, p in enumerate(parts)]
    return str(txn.commit(expected_parts=len(parts), written=written))


def _flat(stats: Any) -> list[float]:
    if isinstance(stats, dict):
        return [x for k in sorted(stats) for x in _flat(stats[k])]
    if isinstance(stats, list):
        return [float(x) for x in stats]
    return [float(stats)]


SPLITS = [(11,), (1, 10), (5, 1, 3, 2), (1,) * 11, (2, 7, 2)]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "-".join(map(str, s)))
def test_merged_stats_equal_stats_of_the_concatenated_data(catalog: Catalog, split: tuple[int, ...]) -> None:
    ds = _dataset()
    parts = _split(ds.transitions, split)
    ref = _commit(catalog, "toy", ds, parts)
    man = catalog.manifest(ref)
    whole = column_stats(ds.transitions)
    assert sorted(man["stats"]) == sorted(whole)
    for group in whole:
        assert sorted(man["stats"][group]) == sorted(whole[group]), group
    got, want = np.array(_flat(man["stats"])), np.array(_flat(whole))
    if len(split) == 1:
        np.testing.assert_array_equal(got, want)  # one part: the very same computation
    else:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    for key in ("min", "max"):  # never rounded
        assert man["stats"]["observations"][key] == whole["observations"][key]
    t = ds.transitions
    assert man["counts"] == {
        "episodes": len(LENGTHS),
        "transitions": len(t),
        "terminated_episodes": int(t.terminals.sum()),
        "truncated_episodes": int((t.timeouts & ~t.terminals).sum()),
    }
    assert [p["rows"] for p in man["parts"]] == [len(p) for p in parts]
    assert catalog.verify(ref)["ok"]
    assert_same_transitions(catalog.read(ref, use_cache=False), ds)


def test_content_hash_is_the_same_for_every_split(catalog: Catalog) -> None:
    ds = _dataset()
    hashes = {
        catalog.manifest(_commit(catalog, f"s{i}", ds, _split(ds.transitions, s)))["content_hash"]
        for i, s in enumerate(SPLITS)
    }
    hashes.add(catalog.manifest(catalog.write("whole", ds))["content_hash"])
    assert len(hashes) == 1


def test_summaries_are_consumed_and_never_published(catalog: Catalog, tmp_path: Path) -> None:
    ds = _dataset()
    txn = catalog.begin("toy", ds.info)
    out = txn.write_part(0, ds.transitions)
    staged = sorted(p.name for p in Path(txn.staging_dir()).iterdir())
    assert staged == ["part-00000.parquet", "part-00000.parquet.summary.json"]
    assert out["bytes"] == (Path(txn.staging_dir()) / "part-00000.parquet").stat().st_size
    ref = txn.commit()
    version = Path(catalog.root) / "toy" / "_v1"
    assert sorted(p.name for p in version.iterdir()) == ["manifest.json", "part-00000.parquet"]
    assert "key" not in repr(txn) and txn.key not in (version / "manifest.json").read_text()
    assert catalog.verify(ref)["ok"]


def test_non_local_catalog_commits_from_summaries() -> None:
    cat = Catalog("mock:///merge")
    ds = _dataset()
    ref = _commit(cat, "toy", ds, _split(ds.transitions, (3, 8)))
    assert cat.verify(ref)["ok"]
    assert cat.manifest(ref)["content_hash"] == cat.manifest(cat.write("one", ds))["content_hash"]


def test_part_written_in_another_process_is_merged(catalog: Catalog) -> None:
    ds = _dataset()
    parts = _split(ds.transitions, (4, 7))
    txn = catalog.begin("toy", ds.info)
    with mp.get_context("spawn").Pool(2) as pool:
        written = pool.starmap(txn.write_part, list(enumerate(parts)))
    ref = txn.commit(expected_parts=2, written=written)
    assert catalog.verify(ref)["ok"]
    assert_same_transitions(catalog.read(ref), ds)


# -- refusals ----------------------------------------------------------------------------------------
def _staged(txn: Transaction, name: str) -> Path:
    return Path(txn.staging_dir()) / name


def _refused(catalog: Catalog, txn: Transaction, match: str, **kw: Any) -> None:
    with pytest.raises(CatalogError, match=match) as err:
        txn.commit(**kw)
    line = str(err.value)
    assert "\n" not in line and line.endswith("nothing committed"), line
    assert catalog.versions(txn.name) == []
    assert not list(Path(catalog.root).rglob("manifest.json"))


def _two_parts(catalog: Catalog) -> tuple[Transaction, list[dict[str, Any]], list[Transitions]]:
    ds = _dataset()
    parts = _split(ds.transitions, (4, 7))
    txn = catalog.begin("toy", ds.info)
    return txn, [txn.write_part(i, p) for i, p in enumerate(parts)], parts


def test_tampered_summary_is_refused(catalog: Catalog) -> None:
    txn, _, _ = _two_parts(catalog)
    path = _staged(txn, "part-00001.parquet.summary.json")
    doc = json.loads(path.read_text())
    doc["summary"]["moments"]["rewards"]["mean"] = [123.0]  # the mac left as it was
    path.write_text(json.dumps(doc))
    _refused(catalog, txn, r"part part-00001\.parquet: its summary is not the one this transaction wrote")


def test_summary_from_another_transaction_is_refused(catalog: Catalog) -> None:
    txn, _, parts = _two_parts(catalog)
    other = catalog.begin("toy", txn.info)
    other.write_part(1, parts[1])
    for name in ("part-00001.parquet", "part-00001.parquet.summary.json"):
        _staged(txn, name).write_bytes(_staged(other, name).read_bytes())
    _refused(catalog, txn, "its summary is not the one this transaction wrote")


def test_summary_moved_to_another_part_is_refused(catalog: Catalog) -> None:
    txn, _, _ = _two_parts(catalog)
    for suffix in ("", ".summary.json"):
        src = _staged(txn, f"part-00000.parquet{suffix}").read_bytes()
        _staged(txn, f"part-00001.parquet{suffix}").write_bytes(src)
    _refused(catalog, txn, r"its summary is for 'part-00000\.parquet'")


def test_part_changed_after_its_summary_is_refused(catalog: Catalog) -> None:
    txn, _, parts = _two_parts(catalog)
    summary = _staged(txn, "part-00000.parquet.summary.json").read_bytes()
    changed = Transitions(
        **{c: getattr(parts[0], c) for c in Transitions.columns()} | {"rewards": parts[0].rewards + 1}
    )
    txn.write_part(0, changed)  # e.g. two attempts of one task racing: one's part, the other's summary
    _staged(txn, "part-00000.parquet.summary.json").write_bytes(summary)
    _refused(catalog, txn, r"part part-00000\.parquet changed after it was written \(its SHA-256 differs")


def test_part_grown_after_its_summary_is_refused(catalog: Catalog) -> None:
    txn, _, _ = _two_parts(catalog)
    with _staged(txn, "part-00001.parquet").open("ab") as f:
        f.write(b"x")
    _refused(catalog, txn, r"part part-00001\.parquet changed after it was written")


def test_part_without_summary_is_refused(catalog: Catalog) -> None:
    txn, _, _ = _two_parts(catalog)
    _staged(txn, "part-00001.parquet.summary.json").unlink()
    _refused(catalog, txn, r"part part-00001\.parquet has no summary")


def test_episode_in_two_parts_is_refused(catalog: Catalog) -> None:
    ds = _dataset()
    parts = _split(ds.transitions, (4, 7))
    txn = catalog.begin("toy", ds.info)
    txn.write_part(0, parts[0])
    txn.write_part(1, parts[0])  # each part is valid alone; together episode 0 appears twice
    _refused(catalog, txn, r"episode 0 appears in more than one part \(part-00000\.parquet, part-00001")


def test_commit_checks_what_write_part_returned(catalog: Catalog) -> None:
    txn, written, _ = _two_parts(catalog)
    _refused(catalog, txn, r"staged parts .* are not the ones written", written=written[:1])
    stale = [written[0], {**written[1], "sha256": "0" * 64}]
    _refused(catalog, txn, r"part part-00001\.parquet is not the one written", written=stale)
    assert str(txn.commit(written=written)) == "toy@1"


def test_write_commits_its_held_rows_without_decoding_and_with_the_same_hash(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _dataset()
    # The same parts through a plain transaction, whose commit decodes each one.
    staged = _commit(catalog, "staged", ds, list(catalog_module.split_rows(ds.transitions, 40)))
    decoded: list[int] = []
    real = catalog_module.read_part
    monkeypatch.setattr(catalog_module, "read_part", lambda *a, **k: decoded.append(1) or real(*a, **k))
    ref = catalog.write("held", ds, rows_per_part=40)
    assert decoded == []  # the rows were in memory: the commit hashed them, the files were checked
    assert len(catalog.manifest(ref)["parts"]) > 1
    assert catalog.manifest(ref)["content_hash"] == catalog.manifest(staged)["content_hash"]
    assert catalog.manifest(ref)["stats"] == catalog.manifest(staged)["stats"]
    assert_same_transitions(catalog.read(ref, use_cache=False), ds)


def test_write_refuses_a_part_changed_between_its_write_and_the_commit(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Transaction.write_part

    def write_then_damage(self: Transaction, index: int, t: Transitions) -> dict[str, Any]:
        out = real(self, index, t)
        if index == 1:
            part = Path(self.staging_dir()) / f"part-{index:05d}.parquet"
            data = bytearray(part.read_bytes())
            data[len(data) // 2] ^= 0x01
            part.write_bytes(bytes(data))
        return out

    monkeypatch.setattr(Transaction, "write_part", write_then_damage)
    with pytest.raises(CatalogError, match=r"part part-00001\.parquet changed after it was written"):
        catalog.write("held", _dataset(), rows_per_part=40)
    assert catalog.list() == []
