"""d3rlpy buffers built from catalog data hold exactly the dataset's transitions, aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import make_dataset

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.hdf5 import read_hdf5, write_hdf5
from rlsynth.offline_rl.buffers import buffer_transitions, to_replay_buffer


def test_hdf5_to_catalog_to_d3rlpy_buffer_keeps_every_transition(tmp_path: Path, catalog: Catalog) -> None:
    ds = make_dataset(lengths=(5, 9, 3, 12, 1, 2))  # terminated, truncated alternately; 1-step episodes too
    path = write_hdf5(ds, tmp_path / "x.hdf5")
    ref = catalog.write("toy", read_hdf5(path))
    back = catalog.read(ref)
    buf = to_replay_buffer(back)
    t = ds.transitions
    assert buf.transition_count == len(t)
    got = buffer_transitions(buf)
    np.testing.assert_array_equal(got["observations"], t.observations)
    np.testing.assert_array_equal(got["actions"], t.actions)
    np.testing.assert_array_equal(got["rewards"], t.rewards)
    np.testing.assert_array_equal(got["terminals"], t.terminals)
    # Truncated episodes keep their last transition with its true successor; terminal successors are
    # zeroed by d3rlpy and never bootstrapped from.
    live = ~t.terminals
    np.testing.assert_array_equal(got["next_observations"][live], t.next_observations[live])
    assert not np.any(got["next_observations"][t.terminals])


def test_buffer_minibatches_have_dataset_shapes() -> None:
    buf = to_replay_buffer(make_dataset())
    batch = buf.sample_transition_batch(16)
    assert batch.observations.shape == (16, 11) and batch.actions.shape == (16, 3)
    assert batch.rewards.shape == (16, 1) and batch.terminals.shape == (16, 1)
