"""D4RL-layout HDF5 in and out."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import assert_same_transitions, make_dataset

from rlsynth.datasets.errors import ExportError, SourceError, ValidationError
from rlsynth.datasets.hdf5 import read_hdf5, write_hdf5

KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def _write(path: Path, arrays: dict[str, np.ndarray], env_id: str | None = "Hopper-v5") -> Path:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        if env_id:
            f.attrs["env_id"] = env_id
    return path


def _arrays(lengths: tuple[int, ...] = (6, 4, 5)) -> dict[str, np.ndarray]:
    t = make_dataset(lengths=lengths).transitions
    return {k: np.array(getattr(t, k)) for k in KEYS}


def test_round_trip_is_exact(tmp_path: Path) -> None:
    ds = make_dataset()
    path = write_hdf5(ds, tmp_path / "x.hdf5")
    back = read_hdf5(path)
    assert_same_transitions(ds, back)
    assert back.info.env_id == "Hopper-v5" and back.notes == ()
    with h5py.File(path) as f:
        assert sorted(f.keys()) == sorted(KEYS) and f["terminals"].dtype == bool


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "x.hdf5"
    path.write_bytes(b"precious")
    with pytest.raises(ExportError, match="already exists"):
        write_hdf5(make_dataset(), path)
    assert path.read_bytes() == b"precious"
    assert list(tmp_path.iterdir()) == [path]


def test_trailing_rows_without_end_flag_become_a_truncated_episode(tmp_path: Path) -> None:
    a = _arrays((6, 4, 5))
    a["terminals"][-1] = False
    a["timeouts"][-1] = False  # the collection stopped mid-episode
    ds = read_hdf5(_write(tmp_path / "x.hdf5", a))
    assert ds.n_episodes == 3 and ds.n_transitions == 15
    last = ds.episodes()[-1]
    assert last.truncated and not last.terminated and last.length == 5
    assert len(ds.notes) == 1 and "last 5 rows have no end flag" in ds.notes[0]


def test_float64_and_integer_flags_are_normalised(tmp_path: Path) -> None:
    a = _arrays()
    a64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v.astype(np.uint8)) for k, v in a.items()}
    a64["rewards"] = a64["rewards"][:, None]  # some D4RL files store rewards as (N, 1)
    ds = read_hdf5(_write(tmp_path / "x.hdf5", a64))
    assert ds.transitions.observations.dtype == np.float32 and ds.transitions.terminals.dtype == bool
    np.testing.assert_array_equal(ds.transitions.rewards, a["rewards"])


def test_without_next_observations_each_episode_loses_its_last_step(tmp_path: Path) -> None:
    a = _arrays((6, 4, 5))
    del a["next_observations"]
    ds = read_hdf5(_write(tmp_path / "x.hdf5", a))
    assert [e.length for e in ds.episodes()] == [5, 3, 4]
    assert all(e.truncated for e in ds.episodes())
    np.testing.assert_array_equal(ds.episodes()[0].observations, a["observations"][:6])
    assert "(3 rows) is dropped" in ds.notes[0]


def test_env_override_and_missing_env(tmp_path: Path) -> None:
    a = _arrays()
    no_env = read_hdf5(_write(tmp_path / "x.hdf5", a, env_id=None))
    assert no_env.info.env_id is None and "spaces are taken as unbounded" in no_env.notes[0]
    assert read_hdf5(tmp_path / "x.hdf5", env_id="Hopper-v5").info.env_id == "Hopper-v5"


@pytest.mark.parametrize(
    "options",
    [
        {"compression": "gzip", "compression_opts": 9, "shuffle": True, "fletcher32": True},
        {"compression": "lzf"},
        {"chunks": True},
    ],
    ids=["gzip-shuffle-fletcher32", "lzf", "chunked"],
)
def test_standard_filters_read_even_at_their_best_ratio(tmp_path: Path, options: dict[str, object]) -> None:
    """All-zero columns in single large chunks: near deflate's 1032:1, under the declared-size bound."""
    n = 200_000
    ends = np.zeros(n, bool)
    a = {
        "observations": np.zeros((n, 11), np.float32),
        "next_observations": np.zeros((n, 11), np.float32),
        "actions": np.zeros((n, 3), np.float32),
        "rewards": np.zeros(n, np.float32),
        "terminals": ends,
        "timeouts": np.r_[ends[:-1], True],
    }
    path = tmp_path / "zeros.hdf5"
    with h5py.File(path, "w") as f:
        for k, v in a.items():
            chunks = options.get("chunks", v.shape)
            f.create_dataset(k, data=v, **{**options, "chunks": chunks})
        f.attrs["env_id"] = "Hopper-v5"
    ds = read_hdf5(path)
    assert ds.n_transitions == n and ds.n_episodes == 1


def test_declared_size_is_checked_before_reading(tmp_path: Path) -> None:
    """A chunk-written file that lost most of its chunks (or never wrote them) is refused, not padded."""
    a = _arrays()
    path = tmp_path / "x.hdf5"
    with h5py.File(path, "w") as f:
        for k, v in a.items():
            if k != "rewards":
                f.create_dataset(k, data=v)
        f.create_dataset("rewards", shape=(15,), dtype="f4", chunks=(1,))
        f["rewards"][:2] = 1.0  # 2 of 15 chunks stored: the rest would read as fill values
        f.attrs["env_id"] = "Hopper-v5"
    with pytest.raises(SourceError, match=r"x\.hdf5: dataset 'rewards': declares shape \(15,\)"):
        read_hdf5(path)


@pytest.mark.parametrize("env_id", ["gymnasium.envs:Hopper-v5", "Hopper-v5\n", ""])
def test_env_ids_are_checked_where_they_enter(tmp_path: Path, env_id: str) -> None:
    path = _write(tmp_path / "x.hdf5", _arrays())
    with pytest.raises(ValidationError, match="--env: environment id"):
        read_hdf5(path, env_id=env_id)
    if env_id:
        _write(tmp_path / "y.hdf5", _arrays(), env_id=env_id)
        with pytest.raises(ValidationError, match=r"y\.hdf5: attribute 'env_id': environment id"):
            read_hdf5(tmp_path / "y.hdf5")
