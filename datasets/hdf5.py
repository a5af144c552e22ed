"""D4RL-layout HDF5: read any such file into a :class:`Dataset`, write one from a dataset.

Layout: one row per transition, ``observations, actions, rewards, terminals, timeouts`` and optionally
``next_observations``; episodes are the runs of rows between end flags, in order. The file attribute
``env_id`` (written by rlsynth and by ../shared/data's builder) names the environment.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rlsynth.datasets.atomic import publish_file
from rlsynth.datasets.envs import env_info
from rlsynth.datasets.errors import ExportError, SourceError, ValidationError, brief
from rlsynth.datasets.types import BoxSpace, Dataset, DatasetInfo, Transitions, check_env_id
from rlsynth.datasets.validation import validate_transitions

REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")
OPTIONAL = ("next_observations",)
# Which D4RL keys hold one row per transition as a matrix (rows, width) and which as a column (rows,)
# (a (rows, 1) column is accepted too).
MATRICES = ("observations", "actions", "next_observations")

# Filters h5py and HDF5 carry built in. Any other id would make HDF5 search HDF5_PLUGIN_PATH and load a
# shared library named by the file, so it is refused before a byte of the dataset is read.
FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
COMPRESSORS = frozenset({1, 32000})
# Deflate cannot expand its input more than 1032-fold (a 258-byte match costs at least 2 bits) and LZF
# far less, so data declared beyond this multiple of the bytes that store it cannot be real: it is unwritten
# space that would read as fill values, or a decompression bomb.
MAX_COMPRESSION_RATIO = 1100
# Sanity bounds on any one declared array, far beyond any real dataset: they keep the products below
# from overflowing and refuse nonsense dimensions before they are multiplied.
MAX_ROWS = 1 << 40
MAX_WIDTH = 1 << 24
# Small files are mostly headers; this slack keeps the whole-file bound meaningful for them.
FILE_SLACK_BYTES = 1 << 16


def _where_key(path: str, key: str) -> str:
    return f"{path}: dataset '{key}'"


def _refuse(path: str, key: str, what: str) -> SourceError:
    return SourceError(f"{_where_key(path, key)}: {what}")


def open_hdf5(path: str | os.PathLike[str]) -> Any:
    """Open ``path`` read-only with h5py; a missing, special or unreadable file is a one-line SourceError."""
    import h5py

    where = str(path)
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{where}: no such file")
    if not p.is_file():
        raise SourceError(f"{where}: not a regular file")
    if p.stat().st_size == 0:
        raise SourceError(f"{where}: empty file, not HDF5")
    try:
        return h5py.File(p, "r")
    except (OSError, ValueError) as e:
        raise SourceError(f"{where}: not a readable HDF5 file ({brief(e)})") from None


def hard_link(group: Any, name: str, path: str, shown: str | None = None) -> Any | None:
    """The object ``group[name]`` when it is reached by a hard link; ``None`` when there is no such name.

    Soft and external links (and user-defined ones) are refused without being followed: an external link
    opens another file, a soft link can alias a key the reader already checked under another name.
    """
    import h5py

    key = shown or name
    try:
        link = group.get(name, getlink=True)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise _refuse(path, key, f"link cannot be read ({brief(e)})") from None
    if link is None:
        return None
    if isinstance(link, h5py.ExternalLink):
        raise _refuse(path, key, f"is an external link to {link.filename}:{link.path}; refused")
    if isinstance(link, h5py.SoftLink):
        raise _refuse(path, key, f"is a soft link to {link.path}; refused")
    if not isinstance(link, h5py.HardLink):
        raise _refuse(path, key, f"is a {type(link).__name__}; only plain (hard) links are read")
    try:
        return group[name]
    except (OSError, KeyError, ValueError) as e:
        raise _refuse(path, key, f"cannot be opened ({brief(e)})") from None


def declared_bytes(dset: Any, path: str, key: str, *, strings: bool = False) -> int:
    """Check what reading ``dset`` would cost against what the file stores, before reading it.

    Refuses data kept outside the file (external storage, virtual datasets), non-standard filters, types
    that are not plain numbers (object, variable-length, compound, reference, array, opaque; fixed-size
    byte strings only where ``strings``), nonsense shapes, and declared sizes the stored bytes cannot
    hold. Returns the declared size in bytes.
    """
    if dset.is_virtual:
        raise _refuse(path, key, "is a virtual dataset (its data lives in other files); refused")
    if dset.external:
        raise _refuse(path, key, "keeps its data in external files; refused")
    dtype = dset.dtype
    plain = dtype.kind in "biuf" or (strings and dtype.kind == "S")
    if not plain or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize > 16:
        raise _refuse(path, key, f"has type {dtype}; only plain numbers and booleans are read")
    shape = dset.shape
    if shape is None:
        raise _refuse(path, key, "has no dataspace (an empty placeholder)")
    if len(shape) > 4 or any(d > MAX_ROWS for d in shape) or any(d > MAX_WIDTH for d in shape[1:]):
        raise _refuse(path, key, f"declares shape {shape}; beyond any dataset rlsynth reads")
    filters = _filters(dset, path, key)
    declared = math.prod(shape) * dtype.itemsize
    stored = int(dset.id.get_storage_size())
    bound = stored * (MAX_COMPRESSION_RATIO if filters & COMPRESSORS else 1)
    if declared > bound:
        raise _refuse(
            path,
            key,
            f"declares shape {shape} ({_size(declared)}) but the file stores {_size(stored)} of it",
        )
    return declared


def _filters(dset: Any, path: str, key: str) -> set[int]:
    plist = dset.id.get_create_plist()
    ids = [int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters())]
    unknown = [i for i in ids if i not in FILTERS]
    if unknown:
        raise _refuse(
            path, key, f"uses HDF5 filter {unknown[0]}; only {', '.join(FILTERS.values())} are read"
        )
    if sum(i in COMPRESSORS for i in ids) > 1 or len(ids) != len(set(ids)):
        # Stacked compressors multiply their ratios: the bound above would no longer hold.
        raise _refuse(path, key, f"stacks filters {[FILTERS[i] for i in ids]}; one compressor at most")
    return set(ids)


def check_total(total_declared: int, total_stored: int, file_size: int, path: str) -> None:
    """Declared and stored bytes of all datasets together against the file's size on disk.

    Stored bytes beyond the file mean chunk entries share bytes (a crafted index); declared bytes beyond
    the compression bound of the whole file cannot be real either way.
    """
    if total_stored > file_size + FILE_SLACK_BYTES:
        raise SourceError(
            f"{path}: its datasets claim {_size(total_stored)} of storage in a {_size(file_size)} file"
        )
    if total_declared > (file_size + FILE_SLACK_BYTES) * MAX_COMPRESSION_RATIO:
        raise SourceError(
            f"{path}: declares {_size(total_declared)} of data in a {_size(file_size)} file; refused"
        )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _rows(shape: tuple[int, ...], key: str, path: str) -> int:
    """Rows of a D4RL column or matrix, after checking its rank (same words as the per-array checks)."""
    if key in MATRICES:
        if len(shape) != 2:
            raise ValidationError(f"expected 2 dimension(s), got shape {shape}", where=path, field=key)
    elif not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise ValidationError(f"expected 1 dimension, got shape {shape}", where=path, field=key)
    return int(shape[0])


def _plan(f: Any, path: str) -> dict[str, Any]:
    """The D4RL datasets of ``f`` by key, every check that needs no data done: links, storage, types,
    ranks, row counts, declared sizes against the file. Nothing is read until this has passed."""
    import h5py

    nodes: dict[str, Any] = {}
    for key in (*REQUIRED, *OPTIONAL):
        node = hard_link(f, key, path)
        if node is None:
            if key in REQUIRED:
                raise ValidationError(
                    f"missing (a D4RL-layout file needs {', '.join(REQUIRED)})", where=path, field=key
                )
            continue
        if not isinstance(node, h5py.Dataset):
            raise ValidationError("is a group, expected an array", where=path, field=key)
        nodes[key] = node
    declared = {k: declared_bytes(d, path, k) for k, d in nodes.items()}
    stored = sum(int(d.id.get_storage_size()) for d in nodes.values())
    check_total(sum(declared.values()), stored, Path(path).stat().st_size, path)
    n = _rows(nodes["observations"].shape, "observations", path)
    for key, d in nodes.items():
        rows = _rows(d.shape, key, path)
        if rows != n:
            raise ValidationError(f"{rows} rows where observations has {n}", where=path, field=key)
    if n == 0:
        raise ValidationError("file holds no transitions", where=path, field="observations")
    return nodes


def _env_attribute(f: Any, path: str) -> str | None:
    """The file's ``env_id`` attribute, checked as an id before anything can pass it to gymnasium."""
    if "env_id" not in f.attrs:
        return None
    try:
        attr = f.attrs.get_id("env_id")
        if attr.shape not in ((), (1,)) or attr.dtype.kind not in "SUO":
            raise SourceError(f"{path}: attribute 'env_id' is not a string (shape {attr.shape})")
        value = f.attrs["env_id"]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise SourceError(f"{path}: attribute 'env_id' cannot be read ({brief(e)})") from None
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise SourceError(f"{path}: attribute 'env_id' is not UTF-8 text") from None
    return check_env_id(value, f"{path}: attribute 'env_id'")


def _read_array(node: Any, key: str, where: str) -> np.ndarray:
    try:
        return np.asarray(node[()])
    except (OSError, ValueError, TypeError) as e:
        raise ValidationError(f"cannot be read ({brief(e)})", where=where, field=key) from None


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
    where = str(path)
    if env_id is not None:
        env_id = check_env_id(env_id, "--env")
    with open_hdf5(path) as f:
        nodes = _plan(f, where)
        file_env = _env_attribute(f, where)
        raw = {k: _read_array(node, k, where) for k, node in nodes.items()}
    has_next = "next_observations" in raw
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


EXPORT_ROWS = 1 << 16
"""Rows written per HDF5 write of an export."""


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
                a = getattr(t, key)
                out_ds = f.create_dataset(key, shape=a.shape, dtype=a.dtype)
                # Block by block: a memory-mapped version (Catalog.read) is exported without holding it.
                for lo in range(0, len(a), EXPORT_ROWS):
                    out_ds[lo : lo + EXPORT_ROWS] = a[lo : lo + EXPORT_ROWS]
            if dataset.info.env_id:
                f.attrs["env_id"] = dataset.info.env_id
        publish_file(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
