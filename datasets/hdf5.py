"""D4RL-layout HDF5: read any such file into a :class:`Dataset`, write one from a dataset.

Layout: one row per transition, ``observations, actions, rewards, terminals, timeouts`` and optionally
``next_observations``; episodes are the runs of rows between end flags, in order. The file attribute
``env_id`` (written by rlsynth and by ../shared/data's builder) names the environment.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from datasets.atomic import publish_file
from datasets.envs import env_info
from datasets.errors import ExportError, SourceError, ValidationError
from datasets.types import BoxSpace, Dataset, DatasetInfo, Transitions
from datasets.validation import validate_transitions

REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")


def _read_array(f: object, key: str, where: str) -> np.ndarray:
    import h5py

    assert isinstance(f, h5py.File)
    node = f.get(key)
    if node is None:
        raise ValidationError(
            f"missing (a D4RL-layout file needs {', '.join(REQUIRED)})", where=where, field=key
        )
    if not isinstance(node, h5py.Dataset):
        raise ValidationError("is a group, expected an array", where=where, field=key)
    try:
        return np.asarray(node[()])
    except (OSError, ValueError) as e:
        raise ValidationError(f"cannot be read: {e}", where=where, field=key) from None


def _as_float32(a: np.ndarray, key: str, where: str, ndim: int) -> np.ndarray:
    if a.ndim == ndim + 1 and ndim == 1 and a.shape[1:] == (1,):
        a = a.reshape(-1)
    if a.ndim != ndim:
        raise ValidationError(f"expected {ndim} dimension(s), got shape {a.shape}", where=where, field=key)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValidationError(f"dtype {a.dtype}, expected floating point", where=where, field=key)
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_flags(a: np.ndarray, key: str, where: str) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValidationError(f"expected 1 dimension, got shape {a.shape}", where=where, field=key)
    if a.dtype == np.bool_:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValidationError(f"dtype {a.dtype}, expected bool or 0/1", where=where, field=key)
    if not np.all((a == 0) | (a == 1)):
        raise ValidationError("holds values other than 0 and 1", where=where, field=key)
    return a.astype(bool)


def _info_for(env_id: str | None, obs_dim: int, act_dim: int, where: str) -> tuple[DatasetInfo, list[str]]:
    if not env_id:
        note = f"{where}: no env_id attribute and no --env; spaces are taken as unbounded"
        return DatasetInfo(None, BoxSpace.unbounded(obs_dim), BoxSpace.unbounded(act_dim)), [note]
    info = env_info(env_id)
    if info.observation_space.dim != obs_dim:
        raise ValidationError(
            f"width {obs_dim} does not match {env_id}'s observation space ({info.observation_space.dim})",
            where=where,
            field="observations",
        )
    if info.action_space.dim != act_dim:
        raise ValidationError(
            f"width {act_dim} does not match {env_id}'s action space ({info.action_space.dim})",
            where=where,
            field="actions",
        )
    return info, []


def read_hdf5(path: str | os.PathLike[str], env_id: str | None = None) -> Dataset:
    """Read a D4RL-layout file. ``env_id`` overrides the file's ``env_id`` attribute.

    A trailing run of rows with no end flag (collection stopped mid-episode) becomes a truncated episode,
    with a note. Without ``next_observations`` the last step of each episode has no successor state and is
    dropped (the episode then ends truncated), with a note saying how many rows that cost.
    """
    import h5py

    where = str(path)
    if not Path(path).is_file():
        raise SourceError(f"{where}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SourceError(f"{where}: not a readable HDF5 file ({e})") from None
    with f:
        raw = {k: _read_array(f, k, where) for k in REQUIRED}
        has_next = "next_observations" in f
        if has_next:
            raw["next_observations"] = _read_array(f, "next_observations", where)
        attr = f.attrs.get("env_id")
        file_env = attr.decode() if isinstance(attr, bytes) else (str(attr) if attr is not None else None)
    obs = _as_float32(raw["observations"], "observations", where, 2)
    act = _as_float32(raw["actions"], "actions", where, 2)
    rew = _as_float32(raw["rewards"], "rewards", where, 1)
    term = _as_flags(raw["terminals"], "terminals", where)
    tout = _as_flags(raw["timeouts"], "timeouts", where)
    n = obs.shape[0]
    fields = {"actions": act, "rewards": rew, "terminals": term, "timeouts": tout}
    if has_next:
        fields["next_observations"] = _as_float32(raw["next_observations"], "next_observations", where, 2)
    for key, a in fields.items():
        if a.shape[0] != n:
            raise ValidationError(f"{a.shape[0]} rows where observations has {n}", where=where, field=key)
    if n == 0:
        raise ValidationError("file holds no transitions", where=where, field="observations")
    if has_next and fields["next_observations"].shape[1] != obs.shape[1]:
        raise ValidationError(
            f"width {fields['next_observations'].shape[1]} differs from observations' {obs.shape[1]}",
            where=where,
            field="next_observations",
        )
    info, notes = _info_for(env_id or file_env, obs.shape[1], act.shape[1], where)
    ends = term | tout
    if not ends[-1]:
        last_end = int(np.flatnonzero(ends)[-1]) if ends.any() else -1
        tail = n - 1 - last_end
        notes.append(f"{where}: the last {tail} rows have no end flag; imported as a truncated episode")
        tout = tout.copy()
        tout[-1] = True
        ends = term | tout
    if has_next:
        t = _flat(obs, act, rew, fields["next_observations"], term, tout)
    else:
        t, dropped = _flat_without_next(obs, act, rew, term, tout)
        notes.append(
            f"{where}: no next_observations; the last step of each episode ({dropped} rows) is dropped"
        )
    validate_transitions(t, info, where)
    return Dataset(info=info, transitions=t, source=where, notes=tuple(notes))


def _ids_and_steps(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Episode id and step of every row, episodes being the runs of rows closed by an end flag."""
    ep = np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
    starts = np.ones(len(ep), bool)
    starts[1:] = ep[1:] != ep[:-1]
    idx = np.arange(len(ep))
    step = (idx - np.maximum.accumulate(np.where(starts, idx, 0))).astype(np.int32)
    return ep, step


def _flat(
    obs: np.ndarray, act: np.ndarray, rew: np.ndarray, nxt: np.ndarray, term: np.ndarray, tout: np.ndarray
) -> Transitions:
    ep, step = _ids_and_steps(term | tout)
    return Transitions(
        episode_id=ep,
        step=step,
        observations=obs,
        actions=act,
        rewards=rew,
        next_observations=nxt,
        terminals=term,
        timeouts=tout,
    )


def _flat_without_next(
    obs: np.ndarray, act: np.ndarray, rew: np.ndarray, term: np.ndarray, tout: np.ndarray
) -> tuple[Transitions, int]:
    """Successor of row t is row t+1 inside an episode; an episode's last row has none and is dropped.

    The row before a dropped end row becomes its episode's last step and ends truncated: its successor
    state is known but the episode did not terminate there.
    """
    n = obs.shape[0]
    ends = term | tout
    ep, step = _ids_and_steps(ends)
    keep = ~ends
    nxt = np.empty_like(obs)
    nxt[:-1] = obs[1:]
    nxt[-1] = obs[-1]
    new_tout = np.zeros(n, bool)
    new_tout[:-1] = ends[1:]
    kept_ep = ep[keep]
    dense = np.concatenate([[0], np.cumsum(np.diff(kept_ep) != 0)]).astype(np.int64)[: kept_ep.size]
    t = Transitions(
        episode_id=dense,
        step=step[keep],
        observations=obs[keep],
        actions=act[keep],
        rewards=rew[keep],
        next_observations=nxt[keep],
        terminals=np.zeros(int(keep.sum()), bool),
        timeouts=new_tout[keep],
    )
    return t, int(n - keep.sum())


def write_hdf5(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write a D4RL-layout file (with next_observations) atomically; refuse an existing path."""
    import h5py

    out = Path(path)
    if out.exists():
        raise ExportError(f"{out}: already exists; exports never overwrite")
    if not out.parent.is_dir():
        raise ExportError(f"{out}: folder {out.parent} does not exist")
    t = dataset.transitions
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
                f.create_dataset(key, data=getattr(t, key))
            if dataset.info.env_id:
                f.attrs["env_id"] = dataset.info.env_id
        publish_file(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
