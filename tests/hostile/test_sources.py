"""Hostile dataset sources, through the real CLI: D4RL-layout HDF5 files, Minari datasets and ``--env``.

Each case crafts one input that a trusted reader must refuse before it costs anything: an env id that
would import a module, a few-KB file declaring terabytes, data kept in other files or reached by links,
types that are not numbers, files that are not HDF5 at all. :func:`hostile_harness.assert_refused`
checks the refusal (exit code, one short message naming the file, no traceback, no foreign code, bounded
memory, nothing written under the catalog or the Minari root).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from helpers import make_dataset
from hostile_harness import EVIL_ENV_ID, EVIL_MODULE, assert_refused

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.minari_io import write_minari

KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
HUGE_ROWS = 10**10


def _arrays() -> dict[str, np.ndarray]:
    t = make_dataset(lengths=(10, 10, 10)).transitions
    return {k: np.array(getattr(t, k)) for k in KEYS}


def d4rl(
    path: Path,
    replace: Callable[[h5py.File, Path], None] | None = None,
    *,
    skip: tuple[str, ...] = (),
    env_id: Any = "Hopper-v5",
) -> Path:
    """A valid Hopper D4RL file, except for what ``replace`` writes in place of the ``skip`` keys."""
    with h5py.File(path, "w") as f:
        for k, v in _arrays().items():
            if k not in skip:
                f.create_dataset(k, data=v)
        if replace is not None:
            replace(f, path.parent)
        if env_id is not None:
            f.attrs["env_id"] = env_id
    return path


def _import(path: Path | str, *extra: str) -> list[str]:
    return ["datasets", "import", str(path), "--name", "hostile", *extra]


# Each case: (id, build(tmp) -> CLI args without --catalog, texts the one-line refusal must contain).
Case = tuple[str, Callable[[Path], list[str]], tuple[str, ...]]


def _env_attr(value: Any) -> Callable[[Path], list[str]]:
    return lambda tmp: _import(d4rl(tmp / "env.hdf5", env_id=value))


def _huge_chunked(f: h5py.File, _: Path) -> None:
    f.create_dataset("observations", shape=(HUGE_ROWS, 11), dtype="f4", chunks=(4096, 11), compression="gzip")
    f.create_dataset("next_observations", shape=(HUGE_ROWS, 11), dtype="f4", chunks=(4096, 11))


def _huge_contiguous(f: h5py.File, _: Path) -> None:
    f.create_dataset("actions", shape=(10**9, 3), dtype="f8")  # never written: no storage allocated


def _object(f: h5py.File, _: Path) -> None:
    f.create_dataset("observations", data=np.array(["x"] * 30, dtype=object), dtype=h5py.string_dtype())


def _compound(f: h5py.File, _: Path) -> None:
    f.create_dataset("actions", data=np.zeros(30, dtype=[("a", "f4"), ("b", "f4"), ("c", "f4")]))


def _reference(f: h5py.File, _: Path) -> None:
    f.create_dataset("rewards", shape=(30,), dtype=h5py.ref_dtype)


def _array_type(f: h5py.File, _: Path) -> None:
    f.create_dataset("actions", shape=(30,), dtype=np.dtype(("f4", (3,))))


def _external_storage(f: h5py.File, folder: Path) -> None:
    raw = folder / "raw.bin"
    raw.write_bytes(_arrays()["observations"].astype("<f4").tobytes())
    f.create_dataset("observations", shape=(30, 11), dtype="<f4", external=[(str(raw), 0, 30 * 11 * 4)])


def _source_file(folder: Path) -> Path:
    return d4rl(folder / "elsewhere.hdf5")


def _virtual(f: h5py.File, folder: Path) -> None:
    src = _source_file(folder)
    layout = h5py.VirtualLayout(shape=(30, 11), dtype="f4")
    layout[:] = h5py.VirtualSource(str(src), "observations", shape=(30, 11))
    f.create_virtual_dataset("observations", layout)


def _soft_link(f: h5py.File, _: Path) -> None:
    f.create_dataset("stash", data=_arrays()["observations"])
    f["observations"] = h5py.SoftLink("/stash")


def _external_link(f: h5py.File, folder: Path) -> None:
    f["observations"] = h5py.ExternalLink(str(_source_file(folder)), "/observations")


def _plugin_filter(f: h5py.File, _: Path) -> None:
    # scale-offset is built into HDF5 but not one of the filters rlsynth reads (lossy, rarely used).
    f.create_dataset("observations", data=_arrays()["observations"], scaleoffset=4)


def _short_rows(f: h5py.File, _: Path) -> None:
    f.create_dataset("actions", data=_arrays()["actions"][:-7])


def _custom(name: str, build: Callable[[h5py.File, Path], None], *keys: str) -> Callable[[Path], list[str]]:
    return lambda tmp: _import(d4rl(tmp / name, build, skip=keys))


def _not_hdf5(tmp: Path) -> list[str]:
    (tmp / "fake.hdf5").write_bytes(b"PK\x03\x04 this is a zip archive, not HDF5" * 20)
    return _import(tmp / "fake.hdf5")


def _truncated(tmp: Path) -> list[str]:
    path = d4rl(tmp / "cut.hdf5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _import(path)


def _empty(tmp: Path) -> list[str]:
    (tmp / "empty.hdf5").write_bytes(b"")
    return _import(tmp / "empty.hdf5")


def _folder(tmp: Path) -> list[str]:
    (tmp / "folder.hdf5").mkdir()
    return _import(tmp / "folder.hdf5")


def _good(tmp: Path) -> Path:
    return d4rl(tmp / "good.hdf5")


HDF5_CASES: list[Case] = [
    ("evil env_id attribute", _env_attr(EVIL_ENV_ID), ("env.hdf5", "not a registered id")),
    ("env_id attribute with newline", _env_attr("Hopper-v5\nrm -rf ~"), ("env.hdf5", "env_id")),
    ("env_id attribute with spaces", _env_attr(" Hopper-v5 "), ("env.hdf5", "not a registered id")),
    ("env_id attribute too long", _env_attr("H" * 300 + "-v5"), ("env.hdf5", "not a registered id")),
    ("env_id attribute is numbers", _env_attr(np.arange(4)), ("env.hdf5", "env_id")),
    (
        "huge chunked shape",
        _custom("huge.hdf5", _huge_chunked, "observations", "next_observations"),
        ("huge.hdf5", "observations", "declares shape"),
    ),
    (
        "huge unwritten contiguous",
        _custom("unwritten.hdf5", _huge_contiguous, "actions"),
        ("unwritten.hdf5", "actions", "declares shape"),
    ),
    ("mismatched rows", _custom("rows.hdf5", _short_rows, "actions"), ("rows.hdf5", "23 rows")),
    ("string dtype", _custom("str.hdf5", _object, "observations"), ("str.hdf5", "observations", "type")),
    ("compound dtype", _custom("cmp.hdf5", _compound, "actions"), ("cmp.hdf5", "actions", "type")),
    ("reference dtype", _custom("ref.hdf5", _reference, "rewards"), ("ref.hdf5", "rewards", "type")),
    ("array dtype", _custom("arr.hdf5", _array_type, "actions"), ("arr.hdf5", "actions", "type")),
    (
        "external storage",
        _custom("ext.hdf5", _external_storage, "observations"),
        ("ext.hdf5", "observations", "external files"),
    ),
    (
        "virtual dataset",
        _custom("vds.hdf5", _virtual, "observations"),
        ("vds.hdf5", "observations", "virtual"),
    ),
    (
        "soft link",
        _custom("soft.hdf5", _soft_link, "observations"),
        ("soft.hdf5", "observations", "soft link"),
    ),
    (
        "external link",
        _custom("elink.hdf5", _external_link, "observations"),
        ("elink.hdf5", "observations", "external link"),
    ),
    (
        "non-standard filter",
        _custom("filt.hdf5", _plugin_filter, "observations"),
        ("filt.hdf5", "observations", "filter"),
    ),
    ("not an HDF5 file", _not_hdf5, ("fake.hdf5", "not a readable HDF5 file")),
    ("truncated file", _truncated, ("cut.hdf5",)),
    ("empty file", _empty, ("empty.hdf5", "empty")),
    ("folder named .hdf5", _folder, ("folder.hdf5", "not a regular file")),
]

ENV_OPTION_CASES: list[Case] = [
    (
        "import --env evil",
        lambda tmp: _import(_good(tmp), "--env", EVIL_ENV_ID),
        ("--env", "not a registered id"),
    ),
    ("import --env newline", lambda tmp: _import(_good(tmp), "--env", "Hopper-v5\nx"), ("--env",)),
    ("import --env empty", lambda tmp: _import(_good(tmp), "--env", ""), ("--env",)),
    (
        "make --env evil",
        lambda tmp: ["datasets", "make", "random", "--env", EVIL_ENV_ID, "--name", "m", "--no-minari"],
        ("not a registered id",),
    ),
    (
        "make --env whitespace",
        lambda tmp: ["datasets", "make", "random", "--env", "Hopper v5", "--name", "m", "--no-minari"],
        ("not a registered id",),
    ),
]


def _run_case(tmp_path: Path, build: Callable[[Path], list[str]], expect: tuple[str, ...]) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    minari = tmp_path / "minari"
    minari.mkdir(exist_ok=True)
    args = [*build(inputs), "--catalog", str(catalog)]
    assert_refused(args, cwd=tmp_path, watch=[catalog, minari], expect=expect)


@pytest.mark.parametrize(
    ("case", "build", "expect"),
    HDF5_CASES + ENV_OPTION_CASES,
    ids=[c[0] for c in HDF5_CASES + ENV_OPTION_CASES],
)
def test_hostile_source_is_refused(
    tmp_path: Path, case: str, build: Callable[[Path], list[str]], expect: tuple[str, ...]
) -> None:
    _run_case(tmp_path, build, expect)


def test_evaluate_with_an_evil_env_is_refused(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    Catalog(catalog).write("good", make_dataset())
    args = ["datasets", "evaluate", "good@1", "--env", EVIL_ENV_ID, "--no-store", "--catalog", str(catalog)]
    assert_refused(args, cwd=tmp_path, watch=[catalog], expect="not a registered id")
    assert not list(tmp_path.glob("*.png"))


# --- Minari ------------------------------------------------------------------------------------------

MINARI_ID = "rlsynth/hostile-v0"


@pytest.fixture(scope="module")
def minari_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid local Minari dataset; each case copies it and damages the copy."""
    root = tmp_path_factory.mktemp("minari-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        write_minari(make_dataset(), MINARI_ID)
    return root / MINARI_ID


def _edit_metadata(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        path = data / "metadata.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))

    return apply


def _spec_edit(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        spec = json.loads(meta["env_spec"])
        spec.update(fields)
        meta["env_spec"] = json.dumps(spec)

    return edit


def _no_space_evil_entry(meta: dict[str, Any]) -> None:
    # Without a recorded space Minari makes the env from env_spec, importing its entry point.
    _spec_edit(entry_point=f"{EVIL_MODULE}:Evil")(meta)
    del meta["observation_space"]


def _huge_box(meta: dict[str, Any]) -> None:
    space = json.loads(meta["observation_space"])
    space.update(shape=[10**10], low=-1.0, high=1.0)
    meta["observation_space"] = json.dumps(space)


def _external_link_in_episode(data: Path) -> None:
    outside = d4rl(data.parent.parent.parent / "outside.hdf5")
    with h5py.File(data / "main_data.hdf5", "a") as f:
        del f["episode_0/rewards"]
        f["episode_0/rewards"] = h5py.ExternalLink(str(outside), "/rewards")


def _symlinked_data(data: Path) -> None:
    outside = data.parent.parent.parent / "outside.hdf5"
    shutil.move(data / "main_data.hdf5", outside)
    (data / "main_data.hdf5").symlink_to(outside)


def _huge_episode(data: Path) -> None:
    with h5py.File(data / "main_data.hdf5", "a") as f:
        del f["episode_1/actions"]
        f.create_dataset(
            "episode_1/actions", shape=(HUGE_ROWS, 3), dtype="f4", chunks=(1024, 3), compression="gzip"
        )


MINARI_CASES: list[tuple[str, Callable[[Path], object], str, tuple[str, ...]]] = [
    ("env_spec id evil", _edit_metadata(_spec_edit(id=EVIL_ENV_ID)), MINARI_ID, ("not a registered id",)),
    (
        "env_spec evil entry point, no space",
        _edit_metadata(_no_space_evil_entry),
        MINARI_ID,
        ("observation_space",),
    ),
    ("huge Box", _edit_metadata(_huge_box), MINARI_ID, ("observation_space", "shape")),
    (
        "huge total_episodes",
        _edit_metadata(lambda m: m.update(total_episodes=10**12)),
        MINARI_ID,
        ("total_episodes",),
    ),
    (
        "huge episode and step counts",
        _edit_metadata(lambda m: m.update(total_episodes=10**11, total_steps=10**12)),
        MINARI_ID,
        ("100000000000 episodes", "main_data.hdf5"),
    ),
    (
        "reference score not a number",
        _edit_metadata(lambda m: m.update(ref_min_score="-inf; rm")),
        MINARI_ID,
        ("ref_min_score",),
    ),
    (
        "unknown data format",
        _edit_metadata(lambda m: m.update(data_format="pickle")),
        MINARI_ID,
        ("data_format",),
    ),
    (
        "metadata not JSON",
        lambda d: (d / "metadata.json").write_bytes(b"{'not': json"),
        MINARI_ID,
        ("metadata.json",),
    ),
    (
        "external link in episode",
        _external_link_in_episode,
        MINARI_ID,
        ("episode_0/rewards", "external link"),
    ),
    ("data file is a symlink", _symlinked_data, MINARI_ID, ("main_data.hdf5", "symbolic link")),
    ("huge episode array", _huge_episode, MINARI_ID, ("episode_1/actions", "declares shape")),
    ("id walks out of the root", lambda d: None, "../../outside/x-v0", ("not a Minari dataset id",)),
    ("id with a newline", lambda d: None, "rlsynth/hostile-v0\n", ("not a Minari dataset id",)),
]


@pytest.mark.parametrize(
    ("case", "damage", "dataset_id", "expect"), MINARI_CASES, ids=[c[0] for c in MINARI_CASES]
)
def test_hostile_minari_dataset_is_refused(
    tmp_path: Path,
    minari_template: Path,
    case: str,
    damage: Callable[[Path], object],
    dataset_id: str,
    expect: tuple[str, ...],
) -> None:
    minari = tmp_path / "minari"
    shutil.copytree(minari_template.parent.parent, minari, dirs_exist_ok=True)
    damage(minari / MINARI_ID / "data")
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    args = ["datasets", "import", f"minari:{dataset_id}", "--name", "hostile", "--catalog", str(catalog)]
    assert_refused(
        args,
        cwd=tmp_path,
        watch=[catalog, minari],
        expect=expect,
        env={"MINARI_DATASETS_PATH": str(minari)},
    )


def test_the_untouched_inputs_import(tmp_path: Path, minari_template: Path) -> None:
    """The hostile cases damage valid inputs: the same inputs undamaged import (so refusals are earned)."""
    from hostile_harness import run_cli

    minari = tmp_path / "minari"
    shutil.copytree(minari_template.parent.parent, minari, dirs_exist_ok=True)
    good = _good(tmp_path)
    for source in (str(good), f"minari:{MINARI_ID}"):
        out = run_cli(
            ["datasets", "import", source, "--name", "fine", "--catalog", str(tmp_path / "catalog")],
            cwd=tmp_path,
            env={"MINARI_DATASETS_PATH": str(minari)},
        )
        assert out.code == 0, out.output
