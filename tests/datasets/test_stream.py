"""Versions written block by block while their rows are made (``Catalog.stream``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_transitions, make_dataset

from rlsynth.datasets import catalog as C
from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.errors import CatalogError, ValidationError
from rlsynth.datasets.types import Transitions

LENGTHS = (4, 6, 3, 8, 2, 7, 1, 9, 5, 5)


def _blocks(t: Transitions, cuts: list[int]) -> list[Transitions]:
    """``t`` cut at the episode bounds numbered in ``cuts`` (each block whole episodes)."""
    bounds = t.episode_bounds()
    edges = [0, *(int(bounds[k]) for k in cuts), len(t)]
    return [
        Transitions(**{c: getattr(t, c)[a:b] for c in Transitions.columns()})
        for a, b in itertools.pairwise(edges)
    ]


def _staged(catalog: Catalog, name: str) -> list[str]:
    return sorted(p.name for p in Path(catalog.uri).joinpath(name).rglob("part-*.parquet"))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("cuts", [[1], [1, 2, 3, 4, 5, 6, 7, 8, 9], [7], [2, 3, 9]])
def test_streamed_blocks_give_the_files_and_hash_of_one_write(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, threads: int, cuts: list[int]
) -> None:
    ds = make_dataset(lengths=LENGTHS)
    whole = catalog.manifest(catalog.write("whole", ds, rows_per_part=7))
    monkeypatch.setattr(C, "cores", lambda: threads)
    with catalog.stream("streamed", ds.info, rows_per_part=7) as s:
        for b in _blocks(ds.transitions, cuts):
            s.add(b)
        ref = s.commit(tags={"how": "streamed"})
    streamed = catalog.manifest(ref)
    assert streamed["parts"] == whole["parts"]  # same cuts, same bytes (SHA-256 per part)
    assert streamed["content_hash"] == whole["content_hash"] and streamed["stats"] == whole["stats"]
    assert streamed["counts"] == whole["counts"] and streamed["tags"] == {"how": "streamed"}
    assert_same_transitions(ds, catalog.read(ref, use_cache=False))
    assert catalog.verify(ref)["ok"]


def test_parts_are_written_while_blocks_still_come(catalog: Catalog) -> None:
    ds = make_dataset(lengths=LENGTHS)
    blocks = _blocks(ds.transitions, list(range(1, len(LENGTHS))))
    with catalog.stream("toy", ds.info, rows_per_part=7) as s:
        for b in blocks[:6]:  # 30 rows: the first parts are cut and written before the stream ends
            s.add(b)
        s.add(Transitions(**{c: getattr(blocks[6], c)[:0] for c in Transitions.columns()}))  # no-op
        staged_midway = _staged(catalog, "toy")
        for b in blocks[6:]:
            s.add(b)
        s.commit()
    assert len(staged_midway) >= 2 and staged_midway[0] == "part-00000.parquet"
    assert catalog.versions("toy") == [1]


def test_leaving_without_a_commit_or_by_an_error_writes_nothing(catalog: Catalog) -> None:
    ds = make_dataset(lengths=LENGTHS)
    with catalog.stream("toy", ds.info, rows_per_part=7) as s:
        s.add(ds.transitions)
    assert catalog.versions("toy") == [] and _staged(catalog, "toy") == []
    with pytest.raises(CatalogError, match="closed"):
        s.add(ds.transitions)
    with pytest.raises(RuntimeError, match="sampler died"), catalog.stream("toy", ds.info) as s:
        s.add(ds.transitions)
        raise RuntimeError("sampler died")
    assert catalog.versions("toy") == [] and _staged(catalog, "toy") == []


@pytest.mark.parametrize("threads", [1, 2])
def test_a_bad_block_mid_stream_leaves_nothing(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(C, "cores", lambda: threads)
    ds = make_dataset(lengths=LENGTHS)
    first, second = _blocks(ds.transitions, [5])
    cols = {c: np.array(getattr(second, c)) for c in Transitions.columns()}
    cols["observations"][3, 0] = np.nan
    bad = Transitions(**cols)
    with (
        pytest.raises(ValidationError, match="toy part"),
        catalog.stream("toy", ds.info, rows_per_part=7) as s,
    ):
        s.add(first)
        s.add(bad)
        s.commit()
    assert catalog.versions("toy") == [] and _staged(catalog, "toy") == []


def test_blocks_must_continue_the_episode_ids(catalog: Catalog) -> None:
    ds = make_dataset(lengths=LENGTHS)
    with (
        pytest.raises(CatalogError, match="more than one part"),
        catalog.stream("toy", ds.info, rows_per_part=7) as s,
    ):
        s.add(ds.transitions)
        s.add(ds.transitions)  # the same episode ids again
        s.commit()
    assert catalog.versions("toy") == [] and _staged(catalog, "toy") == []


def test_an_empty_stream_commits_nothing(catalog: Catalog) -> None:
    ds = make_dataset()
    with pytest.raises(CatalogError, match="nothing to commit"), catalog.stream("toy", ds.info) as s:
        s.commit()
    with pytest.raises(CatalogError, match="rows_per_part must be positive"):
        catalog.stream("toy", ds.info, rows_per_part=0)
    assert catalog.versions("toy") == [] and _staged(catalog, "toy") == []
