"""Minari datasets in and out.

Reading goes through ``minari.load_dataset`` (local first; Minari's download path when asked and its
remote is reachable). Writing goes through ``minari.create_dataset_from_buffers`` after rlsynth's own
validation (Minari has none), into a private staging root that is then renamed into
``$MINARI_DATASETS_PATH``: a failed create never leaves the half-made folder that breaks
``minari.list_local_datasets``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from datasets.errors import ExportError, SourceError, ValidationError
from datasets.types import BoxSpace, Dataset, DatasetInfo, Episode, episodes_to_transitions
from datasets.validation import validate_episodes

# Minari's own id grammar: (namespace/)name-vN, components of word characters, dots and dashes.
MINARI_ID_RE = re.compile(r"^(?:[\w.-]+/)*[\w.-]+-v\d+$")


def minari_root() -> Path:
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env else Path.home() / ".minari" / "datasets"


def check_minari_id(dataset_id: str) -> str:
    if not MINARI_ID_RE.match(dataset_id) or ".." in dataset_id.split("/"):
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


def read_minari(dataset_id: str, download: bool = False) -> Dataset:
    """Load a Minari dataset (flat Box spaces) into a validated :class:`Dataset`."""
    import gymnasium
    import minari

    where = f"minari:{dataset_id}"
    try:
        ds = minari.load_dataset(dataset_id, download=download)
    except FileNotFoundError:
        hint = "" if download else " (pass --download to fetch it from Minari's remote)"
        raise SourceError(f"{where}: not found under {minari_root()}{hint}") from None
    except Exception as e:  # Minari raises TypeError/ValueError/network errors for bad ids or no remote.
        raise SourceError(f"{where}: cannot be loaded ({type(e).__name__}: {e})") from None
    for what, space in (("observation space", ds.observation_space), ("action space", ds.action_space)):
        if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
            raise SourceError(f"{where}: {what} {space} is not a flat Box; rlsynth supports flat Box spaces")
    env_spec = ds.spec.env_spec
    meta = ds.storage.metadata
    info = DatasetInfo(
        env_id=env_spec.id if env_spec is not None else None,
        observation_space=BoxSpace.from_gymnasium(ds.observation_space),
        action_space=BoxSpace.from_gymnasium(ds.action_space),
        ref_min_score=_opt_float(meta.get("ref_min_score")),
        ref_max_score=_opt_float(meta.get("ref_max_score")),
    )
    episodes = []
    for i, ep in enumerate(ds.iterate_episodes()):
        episodes.append(
            Episode(
                observations=_float32(ep.observations, "observations", where, i),
                actions=_float32(ep.actions, "actions", where, i),
                rewards=_float32(ep.rewards, "rewards", where, i),
                terminations=np.asarray(ep.terminations, dtype=bool),
                truncations=np.asarray(ep.truncations, dtype=bool),
            )
        )
    validate_episodes(episodes, info, where)
    return Dataset(info=info, transitions=episodes_to_transitions(episodes), source=where)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


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
    episodes = dataset.episodes()
    validate_episodes(episodes, dataset.info, f"export to minari:{dataset_id}")
    buffers = [
        EpisodeBuffer(
            id=i,
            observations=e.observations,
            actions=e.actions,
            rewards=list(e.rewards.astype(np.float64)),
            terminations=list(e.terminations),
            truncations=list(e.truncations),
            infos={},
        )
        for i, e in enumerate(episodes)
    ]
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
                raise ExportError(f"Minari rejected '{dataset_id}': {type(e).__name__}: {e}") from None
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
