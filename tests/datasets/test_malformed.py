"""A table of malformed inputs: each is refused with one clear line naming what is wrong, nothing written.

The HDF5 cases run the real CLI entry point (``pipeline.cli.main``) in-process, so the exit code and
the printed line are what a user sees.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from helpers import hopper_info, make_dataset

from rlsynth.datasets.errors import ValidationError
from rlsynth.datasets.types import Episode
from rlsynth.datasets.validation import validate_episodes
from rlsynth.pipeline.cli import main


def good_arrays() -> dict[str, Any]:
    """A valid Hopper-shaped D4RL layout: 3 episodes of 10 steps (terminal, timeout, terminal)."""
    t = make_dataset(lengths=(10, 10, 10)).transitions
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    return {k: np.array(getattr(t, k)) for k in keys}


def write_file(path: Path, arrays: dict[str, Any], env_id: str | None = "Hopper-v5") -> Path:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if isinstance(v, str) and v == "group":
                f.create_group(k)
            else:
                f.create_dataset(k, data=v)
        if env_id is not None:
            f.attrs["env_id"] = env_id
    return path


def _set(key: str, fn: Callable[[np.ndarray], Any]) -> Callable[[dict[str, Any]], None]:
    def edit(a: dict[str, Any]) -> None:
        a[key] = fn(a[key])

    return edit


def _nan_at(i: int, j: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x[i, j] = np.nan
        return x

    return f


def _value_at(i: int, value: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x[i] = value
        return x

    return f


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda a: a.pop(key)


def _break_continuity(a: dict[str, Any]) -> None:
    a["next_observations"] = a["next_observations"].copy()
    a["next_observations"][14, 2] += 0.5


def _terminal_mid_episode_and_no_next(a: dict[str, Any]) -> None:
    a["terminals"] = a["terminals"].copy()
    a["terminals"][4] = True
    a["terminals"][9] = False
    a["next_observations"] = a["next_observations"].copy()
    a["next_observations"][4, 0] += 1.0  # the file claims an episode ends at row 4 but row 5 continues it


HDF5_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("missing actions", _drop("actions"), "field 'actions': missing"),
    ("missing timeouts", _drop("timeouts"), "field 'timeouts': missing"),
    (
        "observations 1-D",
        _set("observations", lambda x: x[:, 0]),
        "field 'observations': expected 2 dimension",
    ),
    (
        "actions short",
        _set("actions", lambda x: x[:-1]),
        "field 'actions': 29 rows where observations has 30",
    ),
    ("rewards long", _set("rewards", lambda x: np.r_[x, 0]), "field 'rewards': 31 rows"),
    ("terminal value 2", _set("terminals", lambda x: x.astype(np.int8) * 2), "values other than 0 and 1"),
    ("terminals 2-D", _set("terminals", lambda x: np.stack([x, x], 1)), "field 'terminals': expected 1 dim"),
    ("NaN observation", _set("observations", _nan_at(12, 3)), "field 'observations', episode 1: non-finite"),
    (
        "inf reward",
        _set("rewards", _value_at(25, np.inf)),
        "field 'rewards', episode 2: non-finite value at step 5",
    ),
    ("integer actions", _set("actions", lambda x: x.astype(np.int32)), "field 'actions': dtype int32"),
    (
        "action width",
        _set("actions", lambda x: x[:, :2]),
        "field 'actions': width 2 does not match Hopper-v5",
    ),
    (
        "observation width",
        lambda a: a.update(
            observations=a["observations"][:, :10], next_observations=a["next_observations"][:, :10]
        ),
        "field 'observations': width 10 does not match Hopper-v5",
    ),
    ("next_obs width", _set("next_observations", lambda x: x[:, :9]), "field 'next_observations': width 9"),
    (
        "next_obs discontinuity",
        _break_continuity,
        "field 'next_observations', episode 1: next_observations at step 4 differs",
    ),
    ("action out of bounds", _set("actions", _value_at(3, 5.0)), "field 'actions', episode 0: action[0] = 5"),
    ("rewards is a group", _set("rewards", lambda x: "group"), "field 'rewards': is a group"),
    ("empty file", lambda a: a.update({k: v[:0] for k, v in a.items()}), "holds no transitions"),
    (
        "end flag mid-episode",
        _terminal_mid_episode_and_no_next,
        "field 'next_observations', episode 1: next_observations at step",
    ),
]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def _no_files(root: Path) -> bool:
    return not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def test_the_good_file_imports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_file(tmp_path / "good.hdf5", good_arrays())
    code, err = _run(
        ["datasets", "import", str(path), "--name", "good", "--catalog", str(tmp_path / "c")], capsys
    )
    assert code == 0, err


@pytest.mark.parametrize(("case", "edit", "message"), HDF5_CASES, ids=[c[0] for c in HDF5_CASES])
def test_malformed_hdf5_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    edit: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    arrays = good_arrays()
    edit(arrays)
    path = write_file(tmp_path / "bad.hdf5", arrays)
    cat = tmp_path / "c"
    code, err = _run(["datasets", "import", str(path), "--name", "bad", "--catalog", str(cat)], capsys)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert str(path) in lines[0] and message in lines[0], lines[0]
    assert "Traceback" not in err
    assert _no_files(cat)


def test_unknown_env_attribute_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_file(tmp_path / "bad.hdf5", good_arrays(), env_id="NoSuchEnv-v9")
    code, err = _run(
        ["datasets", "import", str(path), "--name", "bad", "--catalog", str(tmp_path / "c")], capsys
    )
    assert code == 1 and "environment 'NoSuchEnv-v9' cannot be made" in err
    assert _no_files(tmp_path / "c")


@pytest.mark.parametrize(
    ("content", "message"), [(b"not an hdf5 file at all", "not a readable HDF5 file"), (None, "no such file")]
)
def test_unreadable_files_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    path = tmp_path / "x.hdf5"
    if content is not None:
        path.write_bytes(content)
    code, err = _run(
        ["datasets", "import", str(path), "--name", "bad", "--catalog", str(tmp_path / "c")], capsys
    )
    assert code == 1 and message in err and "Traceback" not in err
    assert _no_files(tmp_path / "c")


def _episode_case(fn: Callable[[Episode], dict[str, Any]]) -> Callable[[Episode], Episode]:
    def make(e: Episode) -> Episode:
        fields = {
            k: getattr(e, k).copy()
            for k in ("observations", "actions", "rewards", "terminations", "truncations")
        }
        fields.update(fn(e))
        return Episode(**fields)

    return make


EPISODE_CASES: list[tuple[str, Callable[[Episode], Episode], str]] = [
    (
        "T observations",
        _episode_case(lambda e: {"observations": e.observations[:-1].copy()}),
        "field 'observations', episode 1: 5 observations for 5 actions",
    ),
    (
        "float64 observations",
        _episode_case(lambda e: {"observations": e.observations.astype(np.float64)}),
        "field 'observations', episode 1: dtype float64",
    ),
    (
        "int rewards",
        _episode_case(lambda e: {"rewards": e.rewards.astype(np.int64)}),
        "field 'rewards', episode 1: dtype int64",
    ),
    (
        "no end flag",
        _episode_case(lambda e: {"truncations": np.zeros(5, bool), "terminations": np.zeros(5, bool)}),
        "field 'terminals', episode 1: episode's last step has neither",
    ),
    (
        "flag before the end",
        _episode_case(lambda e: {"terminations": np.array([0, 1, 0, 0, 0], bool)}),
        "field 'terminals', episode 1: end flag at step 1 before the episode's last step",
    ),
    (
        "empty episode",
        _episode_case(
            lambda e: {
                "observations": e.observations[:1].copy(),
                "actions": e.actions[:0].copy(),
                "rewards": e.rewards[:0].copy(),
                "terminations": e.terminations[:0].copy(),
                "truncations": e.truncations[:0].copy(),
            }
        ),
        "field 'actions', episode 1: episode has no steps",
    ),
    (
        "rewards shape",
        _episode_case(lambda e: {"rewards": e.rewards[:, None].copy()}),
        "field 'rewards', episode 1: expected shape (5,)",
    ),
]


@pytest.mark.parametrize(("case", "edit", "message"), EPISODE_CASES, ids=[c[0] for c in EPISODE_CASES])
def test_malformed_episodes_are_refused(case: str, edit: Callable[[Episode], Episode], message: str) -> None:
    eps = list(make_dataset(lengths=(4, 5, 6)).episodes())
    eps[1] = edit(eps[1])
    with pytest.raises(ValidationError) as info:
        validate_episodes(eps, hopper_info(), "memory")
    assert message in str(info.value) and str(info.value).startswith("memory")
