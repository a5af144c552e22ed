"""Minari datasets in and out.

Reading goes through ``minari.load_dataset`` (local first; Minari's download path when asked and its
remote is reachable). Writing goes through ``minari.create_dataset_from_buffers`` after rlsynth's own
validation (Minari has none), into a private staging root that is then renamed into
``$MINARI_DATASETS_PATH``: a failed create never leaves the half-made folder that breaks
``minari.list_local_datasets``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rlsynth.datasets.errors import (
    ExportError,
    RlsynthError,
    SourceError,
    ValidationError,
    brief,
    one_line,
    read_bounded,
)
from rlsynth.datasets.hdf5 import MAX_ROWS, MAX_WIDTH, check_total, declared_bytes, hard_link, open_hdf5
from rlsynth.datasets.types import (
    BoxSpace,
    Dataset,
    DatasetInfo,
    Episode,
    check_env_id,
    episodes_to_transitions,
    iter_episodes,
)
from rlsynth.datasets.validation import validate_episodes, validate_transitions

# Minari's own id grammar: (namespace/)name-vN, components of word characters, dots and dashes.
MINARI_ID_RE = re.compile(r"(?:[\w.-]+/)*[\w.-]+-v\d+", re.ASCII)


def minari_root() -> Path:
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env else Path.home() / ".minari" / "datasets"


def _valid_id(dataset_id: str) -> bool:
    # The id becomes a path under the Minari root: a full match, and no component that walks out of it.
    return bool(MINARI_ID_RE.fullmatch(dataset_id)) and not {".", ".."} & set(dataset_id.split("/"))


def check_minari_id(dataset_id: str) -> str:
    if not _valid_id(dataset_id):
        raise ExportError(f"invalid Minari dataset id '{dataset_id}': expected namespace/name-vN")
    return dataset_id


@contextlib.contextmanager
def _minari_path(path: Path) -> Iterator[None]:
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _float32(a: Any, field: str, where: str, index: int) -> np.ndarray:
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValidationError(
            f"dtype {arr.dtype}, expected floating point", where=where, field=field, episode=index
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


# What rlsynth reads of a local Minari dataset: data/metadata.json, and data/main_data.hdf5 or one folder
# of Arrow files per episode.
METADATA_FILE = "metadata.json"
HDF5_FILE = "main_data.hdf5"
# Metadata is a few KB (Box bounds are listed per dimension); anything this large is not metadata.
MAX_METADATA_BYTES = 64 << 20
# Floating dtypes a Box space may declare (Minari deserialises low/high with the declared dtype).
BOX_DTYPES = frozenset({"float16", "float32", "float64"})
# Groups nest episode > field > dict keys in Minari's HDF5 layout; deeper nesting is not Minari's.
MAX_GROUP_DEPTH = 8


def _dataset_folder(dataset_id: str, where: str) -> Path:
    """The dataset's folder under the Minari root, its id checked as a path that stays inside it.

    Folders on the way may be links (a user moving a namespace to another disk); the data files in it
    may not (see :func:`_plain_file`).
    """
    if not _valid_id(dataset_id):
        raise SourceError(f"{where}: not a Minari dataset id (expected namespace/name-vN)")
    return minari_root() / dataset_id


def _plain_file(path: Path, where: str) -> int:
    """Size of ``path``, refusing links and special files (their bytes would come from elsewhere)."""
    if path.is_symlink():
        raise SourceError(f"{where}: {path} is a symbolic link; refused")
    if not path.is_file():
        raise SourceError(f"{where}: {path} is missing or not a regular file")
    return path.stat().st_size


def _metadata(data: Path, where: str) -> dict[str, Any]:
    path = data / METADATA_FILE
    _plain_file(path, where)
    raw = read_bounded(path, MAX_METADATA_BYTES, "Minari metadata file", SourceError)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SourceError(f"{where}: {path} is not readable JSON ({brief(e)})") from None
    if not isinstance(meta, dict):
        raise SourceError(f"{where}: {path} is not a JSON object")
    return meta


def _count(meta: dict[str, Any], key: str, where: str) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ROWS:
        raise SourceError(f"{where}: metadata {key} is {str(v)[:40]!r}, not a count")
    return v


def _check_space(meta: dict[str, Any], key: str, where: str) -> None:
    """A serialised flat Box, checked before Minari deserialises it.

    Minari fills low/high out to the declared shape, so an unchecked shape allocates as much as it says;
    a space missing from the metadata makes Minari build the environment from ``env_spec`` (its entry
    point is an import) just to learn it.
    """
    text = meta.get(key)
    if not isinstance(text, str):
        raise SourceError(f"{where}: metadata has no {key}; rlsynth reads datasets that record their spaces")
    try:
        space = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SourceError(f"{where}: metadata {key} is not JSON ({brief(e)})") from None
    if not isinstance(space, dict) or space.get("type") != "Box":
        kind = space.get("type") if isinstance(space, dict) else type(space).__name__
        raise SourceError(
            f"{where}: {key} is {str(kind)[:40]!r}, not a flat Box; rlsynth supports flat Box spaces"
        )
    shape = space.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 1
        or not isinstance(shape[0], int)
        or isinstance(shape[0], bool)
        or not 1 <= shape[0] <= MAX_WIDTH
    ):
        raise SourceError(f"{where}: {key} has shape {str(shape)[:40]}; rlsynth supports flat Box spaces")
    if space.get("dtype") not in BOX_DTYPES:
        raise SourceError(f"{where}: {key} has dtype {str(space.get('dtype'))[:40]!r}, not floating point")
    for bound in ("low", "high"):
        values = space.get(bound)
        if not isinstance(values, list) or len(values) != shape[0]:
            raise SourceError(f"{where}: {key} {bound} does not list {shape[0]} values")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise SourceError(f"{where}: {key} {bound} holds values that are not numbers")


def _check_env_spec(meta: dict[str, Any], key: str, where: str) -> None:
    """The env id an ``env_spec`` records, checked before Minari parses it or rlsynth keeps it."""
    text = meta.get(key)
    if text is None:
        return
    try:
        spec = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError) as e:
        raise SourceError(f"{where}: metadata {key} is not JSON ({brief(e)})") from None
    if not isinstance(spec, dict):
        raise SourceError(f"{where}: metadata {key} is not a JSON object")
    check_env_id(spec.get("id"), f"{where}: metadata {key}")


def _check_hdf5_data(path: Path, where: str, episodes: int) -> None:
    """Every object of Minari's HDF5 file: hard links only, data in the file, declared sizes it can hold."""
    import h5py

    size = _plain_file(path, where)
    shown = f"{where} ({path})"
    with open_hdf5(path) as f:
        totals = [0, 0]
        seen: set[int] = set()

        def walk(group: Any, prefix: str, depth: int) -> None:
            if depth > MAX_GROUP_DEPTH:
                raise SourceError(f"{shown}: groups nest deeper than {MAX_GROUP_DEPTH} at {prefix}")
            for name in group:
                key = f"{prefix}{name}"
                node = hard_link(group, name, shown, key)
                if node is None:  # listed a moment ago: the name cannot be missing
                    raise SourceError(f"{shown}: '{key}' vanished while being read")
                # A second hard link to one object could close a cycle (a group inside itself).
                addr = h5py.h5o.get_info(node.id).addr
                if addr in seen:
                    raise SourceError(f"{shown}: '{key}' is a second hard link to one object; refused")
                seen.add(addr)
                if isinstance(node, h5py.Group):
                    walk(node, f"{key}/", depth + 1)
                elif isinstance(node, h5py.Dataset):
                    totals[0] += declared_bytes(node, shown, key, strings=True)
                    totals[1] += int(node.id.get_storage_size())
                else:
                    raise SourceError(f"{shown}: '{key}' is a {type(node).__name__}, not data")

        walk(f, "", 0)
        check_total(totals[0], totals[1], size, shown)
        found = sum(1 for name in f if name.startswith("episode_"))
    if found != episodes:
        raise SourceError(f"{where}: metadata says {episodes} episodes, {path.name} holds {found}")


def _check_arrow_data(data: Path, where: str, episodes: int) -> None:
    """One folder per episode, named by its index, of plain files (Arrow reads every file it finds)."""
    for i in range(episodes):
        folder = data / str(i)
        if folder.is_symlink() or not folder.is_dir():
            raise SourceError(f"{where}: metadata says {episodes} episodes; {folder} is missing or a link")
        for entry in folder.rglob("*"):
            if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
                raise SourceError(f"{where}: {entry} is a link or a special file; refused")


def preflight(dataset_id: str, where: str) -> Path:
    """Check a local Minari dataset before Minari opens it; returns its data folder.

    Minari trusts its metadata: it builds spaces of the declared shape, indexes ``range(total_episodes)``,
    and makes the environment from ``env_spec`` when a space is missing. Here every field it would act on
    is checked first, and the data file(s) get the same structural checks as an imported HDF5 file.
    """
    data = _dataset_folder(dataset_id, where) / "data"
    if not data.is_dir():
        raise FileNotFoundError(data)
    meta = _metadata(data, where)
    for key in ("observation_space", "action_space"):
        _check_space(meta, key, where)
    for key in ("env_spec", "eval_env_spec"):
        _check_env_spec(meta, key, where)
    episodes = _count(meta, "total_episodes", where)
    steps = _count(meta, "total_steps", where)
    if steps < episodes:
        raise SourceError(f"{where}: metadata total_steps {steps} is less than total_episodes {episodes}")
    fmt = meta.get("data_format")
    if fmt == "hdf5":
        _check_hdf5_data(data / HDF5_FILE, where, episodes)
    elif fmt == "arrow":
        _check_arrow_data(data, where, episodes)
    else:
        raise SourceError(f"{where}: data_format {str(fmt)[:40]!r} is not one Minari writes (hdf5, arrow)")
    return data


def _download(dataset_id: str, where: str) -> None:
    import minari

    try:
        minari.download_dataset(dataset_id)
    except Exception as e:  # Minari raises assorted ValueError/OSError/network errors for a failed fetch.
        raise SourceError(f"{where}: cannot be downloaded ({brief(e)})") from None


def read_minari(dataset_id: str, download: bool = False) -> Dataset:
    """Load a Minari dataset (flat Box spaces) into a validated :class:`Dataset`."""
    import gymnasium
    import minari

    where = one_line(f"minari:{dataset_id}", 200)
    try:
        try:
            preflight(dataset_id, where)
        except FileNotFoundError:
            if not download:
                raise
            _download(dataset_id, where)
            preflight(dataset_id, where)
    except FileNotFoundError:
        hint = "" if download else " (pass --download to fetch it from Minari's remote)"
        raise SourceError(f"{where}: not found under {minari_root()}{hint}") from None
    try:
        ds = minari.load_dataset(dataset_id)
    except Exception as e:  # Minari raises TypeError/ValueError/AssertionError/KeyError for bad data.
        raise SourceError(f"{where}: cannot be loaded ({brief(e)})") from None
    for what, space in (("observation space", ds.observation_space), ("action space", ds.action_space)):
        if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
            raise SourceError(f"{where}: {what} {space} is not a flat Box; rlsynth supports flat Box spaces")
    env_spec = ds.spec.env_spec
    meta = ds.storage.metadata
    info = DatasetInfo(
        env_id=check_env_id(env_spec.id, where) if env_spec is not None else None,
        observation_space=BoxSpace.from_gymnasium(ds.observation_space),
        action_space=BoxSpace.from_gymnasium(ds.action_space),
        ref_min_score=_opt_float(meta, "ref_min_score", where),
        ref_max_score=_opt_float(meta, "ref_max_score", where),
    )
    try:
        episodes = [_episode(ep, where, i) for i, ep in enumerate(ds.iterate_episodes())]
    except RlsynthError:
        raise
    except Exception as e:  # h5py/pyarrow errors for data that does not match the metadata.
        raise SourceError(f"{where}: episode data cannot be read ({brief(e)})") from None
    validate_episodes(episodes, info, where)
    return Dataset(info=info, transitions=episodes_to_transitions(episodes), source=where)


def _episode(ep: Any, where: str, i: int) -> Episode:
    return Episode(
        observations=_float32(ep.observations, "observations", where, i),
        actions=_float32(ep.actions, "actions", where, i),
        rewards=_float32(ep.rewards, "rewards", where, i),
        terminations=np.asarray(ep.terminations, dtype=bool),
        truncations=np.asarray(ep.truncations, dtype=bool),
    )


def _opt_float(meta: dict[str, Any], key: str, where: str) -> float | None:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        raise SourceError(f"{where}: metadata {key} is {str(v)[:40]!r}, not a finite number")
    return float(v)


def write_minari(
    dataset: Dataset, dataset_id: str, *, description: str | None = None, data_format: str | None = None
) -> Path:
    """Create Minari dataset ``dataset_id`` under ``$MINARI_DATASETS_PATH``; refuse an existing id."""
    import minari
    from minari.data_collector import EpisodeBuffer

    check_minari_id(dataset_id)
    root = minari_root()
    final = root / dataset_id
    if final.exists():
        raise ExportError(f"Minari dataset '{dataset_id}' already exists at {final}; exports never overwrite")
    # Checked on the columns, then handed to Minari one episode at a time (its storage only iterates):
    # an export holds one episode beside the version's columns, which a cached read memory-maps.
    validate_transitions(dataset.transitions, dataset.info, f"export to minari:{dataset_id}")
    buffers = (
        EpisodeBuffer(
            id=i,
            observations=e.observations,
            actions=e.actions,
            rewards=list(e.rewards.astype(np.float64)),
            terminations=list(e.terminations),
            truncations=list(e.truncations),
            infos={},
        )
        for i, e in enumerate(iter_episodes(dataset.transitions))
    )
    info = dataset.info
    refs = {}
    if info.ref_min_score is not None and info.ref_max_score is not None:
        refs = {"ref_min_score": info.ref_min_score, "ref_max_score": info.ref_max_score}
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".rlsynth-export-", dir=root))
    try:
        with _minari_path(staging), warnings.catch_warnings():
            # Minari warns about optional metadata (author email, permalink, eval env) on every create.
            warnings.simplefilter("ignore")
            try:
                minari.create_dataset_from_buffers(
                    dataset_id,
                    buffers,
                    env=info.env_id,
                    observation_space=info.observation_space.to_gymnasium(),
                    action_space=info.action_space.to_gymnasium(),
                    algorithm_name="rlsynth",
                    author="rlsynth",
                    description=description or f"rlsynth export of {dataset.source}",
                    data_format=data_format,
                    **refs,
                )
            except Exception as e:  # Minari's errors are assorted ValueError/TypeError/OSError.
                raise ExportError(f"Minari rejected '{dataset_id}': {brief(e)}") from None
        _ensure_namespaces(dataset_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging / dataset_id, final)
        except OSError as e:
            raise ExportError(
                f"Minari dataset '{dataset_id}' could not be published at {final}: {e}"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _ensure_namespaces(dataset_id: str) -> None:
    """Register the id's namespaces in the real root, as Minari's own create would have."""
    from minari.namespace import create_namespace, list_local_namespaces

    parts = dataset_id.split("/")[:-1]
    existing = set(list_local_namespaces())
    for k in range(1, len(parts) + 1):
        ns = "/".join(parts[:k])
        if ns not in existing:
            with contextlib.suppress(ValueError):
                create_namespace(ns)
