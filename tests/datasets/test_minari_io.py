"""Minari export and import: ``minari.load_dataset`` reads back identical episodes."""

from __future__ import annotations

import os
from pathlib import Path

import minari
import numpy as np
import pytest
from helpers import assert_same_transitions, make_dataset

from rlsynth.datasets.errors import ExportError, SourceError
from rlsynth.datasets.minari_io import read_minari, write_minari
from rlsynth.datasets.types import Dataset


def test_export_then_minari_load_dataset_gives_identical_episodes() -> None:
    ds = make_dataset()
    path = write_minari(ds, "rlsynth/toy-v0")
    assert path == Path(os.environ["MINARI_DATASETS_PATH"]) / "rlsynth/toy-v0"
    loaded = minari.load_dataset("rlsynth/toy-v0")
    assert loaded.total_episodes == 4 and loaded.total_steps == 29
    for ours, theirs in zip(ds.episodes(), loaded.iterate_episodes(), strict=True):
        np.testing.assert_array_equal(theirs.observations, ours.observations)
        np.testing.assert_array_equal(theirs.actions, ours.actions)
        np.testing.assert_array_equal(theirs.rewards, ours.rewards)
        np.testing.assert_array_equal(theirs.terminations, ours.terminations)
        np.testing.assert_array_equal(theirs.truncations, ours.truncations)
    assert loaded.spec.env_spec is not None and loaded.spec.env_spec.id == "Hopper-v5"
    assert_same_transitions(read_minari("rlsynth/toy-v0"), ds)
    assert "rlsynth/toy-v0" in minari.list_local_datasets()


def test_reference_scores_travel() -> None:
    ds = make_dataset()
    ds = Dataset(
        info=ds.info.__class__(**{**ds.info.__dict__, "ref_min_score": -20.0, "ref_max_score": 3000.0}),
        transitions=ds.transitions,
    )
    write_minari(ds, "rlsynth/ref-v0")
    back = read_minari("rlsynth/ref-v0")
    assert (back.info.ref_min_score, back.info.ref_max_score) == (-20.0, 3000.0)


@pytest.mark.parametrize("bad_id", ["no-version", "../escape-v0", "a//b-v0", "rlsynth/x-vx"])
def test_bad_ids_are_refused_and_nothing_is_left(bad_id: str) -> None:
    with pytest.raises(ExportError, match="invalid Minari dataset id"):
        write_minari(make_dataset(), bad_id)
    root = Path(os.environ["MINARI_DATASETS_PATH"])
    assert not root.exists() or not any(root.rglob("*"))


def test_existing_id_is_refused_and_kept() -> None:
    write_minari(make_dataset(seed=0), "rlsynth/toy-v0")
    with pytest.raises(ExportError, match="already exists"):
        write_minari(make_dataset(seed=1), "rlsynth/toy-v0")
    assert_same_transitions(read_minari("rlsynth/toy-v0"), make_dataset(seed=0))
    assert [p.name for p in Path(os.environ["MINARI_DATASETS_PATH"]).iterdir()] == ["rlsynth"]


def test_unknown_minari_id_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match="minari:nobody/none-v0: not found under"):
        read_minari("nobody/none-v0")
