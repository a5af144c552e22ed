"""The versioned Parquet catalog.

Layout under the catalog root (any pyarrow filesystem URI; a plain path is a local directory)::

    <name>/_v<N>/part-00000.parquet ...   Parquet parts (zstd, fixed-size float32 lists)
    <name>/_v<N>/files/<file>             artifacts kept with the version (e.g. the agent of a recipe)
    <name>/_v<N>/manifest.json            written last; a version exists iff its manifest does
    <name>/_staging/<txn>/                parts of a commit in progress (never visible)

Names are ``[a-z0-9][a-z0-9._-]*`` components joined by ``/``; version folders start with ``_`` so they can
never collide with a name. A commit writes parts (from any process: a :class:`Transaction` is a plain
picklable value; each part is validated and summarised where it is written), checks and hashes them,
writes the manifest, and publishes the whole folder:

* local filesystem: one ``rename(2)`` of the staging folder to ``_v<N>``; rename refuses a non-empty target,
  so two writers racing for N get N and N+1, and a writer killed at any point leaves no version;
* other filesystems (``s3://``, ...): parts are moved into ``_v<N>`` and the manifest is written last, so a
  killed writer still leaves no version; object stores have no exclusive create, so two writers racing on
  the same name there are not separated (documented limitation).

Nothing under the root is trusted (a catalog may come from a shared bucket or a stranger's archive):
every manifest goes through :func:`datasets.manifest.parse_manifest`; on a local disk every file is
opened component by component from the root with ``O_NOFOLLOW``, so a symbolic link anywhere below the
root (a part, an artifact, a version or name folder) is refused, never followed; reads check each part's
size and SHA-256, decode it only after its footer agrees with the manifest, and recompute the content
hash before the data is used or cached (:meth:`Catalog.iter_batches`, which streams a version larger
than memory part by part, can only do so after its last batch: see there). A stray entry named like a
version folder (a file, a link) is never a version and never blocks a commit: commits take the next
free number.

A writer killed by SIGKILL leaves its staging folder; ``_staging/<txn>.writer.json`` names the process
that owns it, and each commit clears the staging of writers on this host that are dead
(:meth:`Catalog.clear_stale_staging` also clears by age, for writers on other hosts).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import hmac
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import stat
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from rlsynth.datasets import cache
from rlsynth.datasets.atomic import Writer
from rlsynth.datasets.errors import CatalogError, RlsynthError
from rlsynth.datasets.manifest import (
    FILE_NAME_RE,
    MAX_FILE_NAME,
    MAX_MANIFEST_BYTES,
    PART_RE,
    Manifest,
    PartRecord,
    parse_manifest,
    schema_json,
)
from rlsynth.datasets.parallel import cores, thread_map
from rlsynth.datasets.parquet import (
    FORMAT_VERSION,
    encode_part,
    from_table,
    read_part,
    table_arrays,
)
from rlsynth.datasets.types import Dataset, DatasetInfo, Transitions, concat_transitions
from rlsynth.datasets.validation import validate_transitions

log = logging.getLogger(__name__)

# Every grammar is applied with ``fullmatch``: ``re.match`` with ``$`` also accepts a trailing newline.
COMPONENT_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)*")
MAX_NAME_LENGTH = 200
DEFAULT_CATALOG = "~/.rlsynth/catalog"
MANIFEST = "manifest.json"
STAGING = "_staging"
WRITER_SUFFIX = ".writer.json"
VERSION_RE = re.compile(r"_v([1-9]\d{0,17})")
REF_VERSION_RE = re.compile(r"[1-9]\d{0,17}")
TXN_RE = re.compile(r"[0-9a-f]{32}")
ANNOTATION_KEYS = frozenset({"fidelity"})
MAX_WRITER_BYTES = 4096
# Beside each staged part: what its writer computed (size, SHA-256, moments), authenticated; never a part.
SUMMARY_SUFFIX = ".summary.json"
SUMMARY_FORMAT = "rlsynth.part-summary/1"
# Rows per streamed batch: a few MB for typical spaces, a usual trainer or exporter chunk.
DEFAULT_BATCH_ROWS = 65_536
ROWS_PER_PART = 250_000
"""Rows per part that :meth:`Catalog.write` aims at (whole episodes, so parts run a little short). Small
enough that a reader holds one part of a D4RL-size dataset in tens of megabytes and that a 1M-transition
write has parts for every core to encode; fixed, so the same data gives the same files on any machine."""
PARALLEL_HASH_ROWS = 65_536
"""Parts of at least this many rows have their columns hashed in parallel (below it threads cost more)."""
MOMENT_BLOCK_ROWS = 65_536
"""Rows per float64 block in :func:`part_moments`: the squared deviations never need a whole float64 copy."""

# A streamed batch: column name -> numpy array, the shapes and dtypes of :class:`Transitions`' columns.
ColumnBatch = dict[str, np.ndarray]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass(frozen=True, order=True)
class VersionRef:
    """A committed version ``name@version``."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def check_name(name: str) -> str:
    """Refuse names that are malformed or could escape the catalog root (``..``, ``/x``, ``a//b``, ...)."""
    if not isinstance(name, str) or not name:
        raise CatalogError("dataset name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise CatalogError(f"dataset name '{name[:40]}...' is longer than {MAX_NAME_LENGTH} characters")
    if not NAME_RE.fullmatch(name):
        raise CatalogError(
            f"invalid dataset name '{name}': use [a-z0-9][a-z0-9._-]* components separated by '/'"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` -> (NAME, None) meaning latest; ``NAME@N`` -> (NAME, N)."""
    name, sep, ver = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not REF_VERSION_RE.fullmatch(ver):
        raise CatalogError(f"invalid version in '{ref}': expected NAME@N with N = 1, 2, ...")
    return name, int(ver)


def default_catalog_uri() -> str:
    return os.environ.get("RLSYNTH_CATALOG") or DEFAULT_CATALOG


def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"rlsynth {version('rlsynth')}"
    except PackageNotFoundError:
        return "rlsynth (not installed)"


class ContentHasher:
    """Hash of a dataset's logical content, independent of how rows are split into parts.

    One running SHA-256 per column is fed the parts in order; the result hashes the format, the info
    and the column digests. Re-splitting the same rows gives the same hash; any changed value does not.
    A running hash cannot be resumed from per-part digests, so whoever computes it reads every part in
    order (a commit streams them one at a time; see :meth:`Transaction.commit`).
    """

    def __init__(self, info: DatasetInfo) -> None:
        self._info = json.dumps(info.to_json(), sort_keys=True)
        self._cols = {c: hashlib.sha256() for c in Transitions.columns()}

    def update(self, t: Transitions) -> None:
        """Feed one part; the columns' hashes run on one thread per core (hashlib releases the GIL)."""

        def feed(c: str) -> None:
            a = np.ascontiguousarray(getattr(t, c))
            self._cols[c].update(
                a.astype(a.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(-1).data
            )

        thread_map(feed, list(self._cols), cores() if len(t) >= PARALLEL_HASH_ROWS else 1)

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        h.update(FORMAT_VERSION.encode())
        h.update(self._info.encode())
        for c, ch in self._cols.items():
            h.update(c.encode())
            h.update(ch.digest())
        return "sha256:" + h.hexdigest()


def column_stats(t: Transitions) -> dict[str, Any]:
    """Per-dimension mean/std/min/max of vectors and rewards, and episode return/length summaries."""

    def summary(a: np.ndarray) -> dict[str, list[float]]:
        a = a.reshape(len(a), -1).astype(np.float64)
        return {
            "mean": a.mean(0).tolist(),
            "std": a.std(0).tolist(),
            "min": a.min(0).tolist(),
            "max": a.max(0).tolist(),
        }

    bounds = t.episode_bounds()
    returns = np.add.reduceat(t.rewards.astype(np.float64), bounds[:-1])
    lengths = np.diff(bounds)
    return {
        "observations": summary(t.observations),
        "actions": summary(t.actions),
        "rewards": {k: v[0] for k, v in summary(t.rewards).items()},
        **episode_stats(returns, lengths),
    }


def episode_stats(returns: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
    """The manifest's episode return and length summaries."""
    return {
        "episode_return": {
            "mean": float(returns.mean()),
            "std": float(returns.std()),
            "min": float(returns.min()),
            "max": float(returns.max()),
        },
        "episode_length": {
            "mean": float(lengths.mean()),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
        },
    }


_FILESYSTEMS: dict[str, tuple[pafs.FileSystem, str]] = {}


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem object per URI and process: reuses connections, and lets every Transaction of a
    process see the same in-memory ``mock://`` store (used by the tests of the non-local path)."""
    if uri not in _FILESYSTEMS:
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise CatalogError(f"catalog '{uri}': {e}") from None
        _FILESYSTEMS[uri] = (fs, root.rstrip("/"))
    return _FILESYSTEMS[uri]


# -- file access -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One entry of a catalog folder, as it is (links not followed). ``kind``: file, dir, link, other."""

    name: str
    kind: str
    size: int
    mtime_ns: int


class _Files(Protocol):
    """Read access below the catalog root, by path components (each one already checked by a grammar)."""

    def display(self, parts: Sequence[str]) -> str: ...
    def listdir(self, parts: Sequence[str]) -> list[Entry]: ...
    def stat(self, parts: Sequence[str]) -> Entry | None: ...
    def read(self, parts: Sequence[str], max_bytes: int) -> pa.Buffer: ...
    def makedirs(self, parts: Sequence[str]) -> None: ...


def _entry_of(name: str, st: os.stat_result) -> Entry:
    mode = st.st_mode
    kind = (
        "link"
        if stat.S_ISLNK(mode)
        else "dir"
        if stat.S_ISDIR(mode)
        else "file"
        if stat.S_ISREG(mode)
        else "other"
    )
    return Entry(name, kind, st.st_size, st.st_mtime_ns)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted where a part should be must not hang; it is refused after fstat.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class _LocalFiles:
    """A local catalog: every path is opened from the root one component at a time with ``O_NOFOLLOW``,
    so no symbolic link below the root is ever followed (and none can be swapped in between a check and
    the open)."""

    root: str

    def display(self, parts: Sequence[str]) -> str:
        return "/".join([self.root, *parts])

    def _refusal(self, fd: int, parts: Sequence[str], e: OSError) -> OSError | CatalogError:
        where = self.display(parts)
        if isinstance(e, FileNotFoundError):
            return e
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False) if parts else None
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return CatalogError(f"{where}: is a symbolic link; the catalog never follows links")
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            return CatalogError(f"{where}: is not a folder")
        return CatalogError(f"{where}: cannot be read ({e.strerror or type(e).__name__})")

    def _open_dir(self, parts: Sequence[str]) -> int:
        """An fd of the folder ``parts``; FileNotFoundError if it is not there."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise CatalogError(f"catalog {self.root}: cannot be opened ({e.strerror})") from None
        for i, part in enumerate(parts):
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                err = self._refusal(fd, parts[: i + 1], e)
                os.close(fd)
                raise err from None
            os.close(fd)
            fd = nfd
        return fd

    def listdir(self, parts: Sequence[str]) -> list[Entry]:
        try:
            fd = self._open_dir(parts)
        except FileNotFoundError:
            return []
        try:
            out = []
            with os.scandir(fd) as it:
                for de in it:
                    try:
                        out.append(_entry_of(de.name, de.stat(follow_symlinks=False)))
                    except OSError:
                        continue  # vanished while listed
            return out
        except OSError as e:
            raise CatalogError(f"{self.display(parts)}: cannot be listed ({e.strerror})") from None
        finally:
            os.close(fd)

    def stat(self, parts: Sequence[str]) -> Entry | None:
        try:
            fd = self._open_dir(parts[:-1])
        except FileNotFoundError:
            return None
        try:
            return _entry_of(parts[-1], os.stat(parts[-1], dir_fd=fd, follow_symlinks=False))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CatalogError(f"{self.display(parts)}: cannot be read ({e.strerror})") from None
        finally:
            os.close(fd)

    def read(self, parts: Sequence[str], max_bytes: int) -> pa.Buffer:
        """The whole file, memory-mapped; refused before reading when it is larger than ``max_bytes``."""
        where = self.display(parts)
        dfd = self._open_dir(parts[:-1])
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
        except OSError as e:
            raise self._refusal(dfd, parts, e) from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CatalogError(f"{where}: is not a regular file")
            if st.st_size > max_bytes:
                raise CatalogError(f"{where}: is {st.st_size} bytes, more than the {max_bytes} expected")
            if st.st_size == 0:
                return pa.py_buffer(b"")
            return pa.py_buffer(mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ))
        except OSError as e:
            if e.errno == errno.ENOMEM:  # no address space left: the process's limit, not the file
                raise MemoryError(f"{where}: no address space left to map it") from None
            raise CatalogError(f"{where}: cannot be read ({e.strerror})") from None
        finally:
            os.close(fd)

    def makedirs(self, parts: Sequence[str]) -> None:
        """Create the folders ``parts`` below the root (and the root), refusing a link on the way."""
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise CatalogError(f"catalog {self.root}: cannot create the root ({e.strerror})") from None
        for i in range(len(parts)):
            fd = self._open_dir(parts[:i])
            try:
                os.mkdir(parts[i], dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise CatalogError(
                    f"{self.display(parts[: i + 1])}: cannot be created ({e.strerror})"
                ) from None
            finally:
                os.close(fd)
        os.close(self._open_dir(parts))  # refuses a link or a file where a folder should be


@dataclass(frozen=True)
class _ArrowFiles:
    """A catalog on another pyarrow filesystem (object stores have no links)."""

    fs: pafs.FileSystem
    root: str

    def display(self, parts: Sequence[str]) -> str:
        return "/".join([self.root, *parts])

    def _info_entry(self, fi: pafs.FileInfo) -> Entry:
        kind = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(fi.type, "other")
        return Entry(fi.base_name, kind, int(fi.size or 0), int(fi.mtime_ns or 0))

    def listdir(self, parts: Sequence[str]) -> list[Entry]:
        try:
            sel = pafs.FileSelector(self.display(parts), allow_not_found=True)
            return [self._info_entry(fi) for fi in self.fs.get_file_info(sel)]
        except OSError as e:
            raise CatalogError(f"{self.display(parts)}: cannot be listed ({e})") from None

    def stat(self, parts: Sequence[str]) -> Entry | None:
        try:
            fi = self.fs.get_file_info(self.display(parts))
        except OSError as e:
            raise CatalogError(f"{self.display(parts)}: cannot be read ({e})") from None
        return None if fi.type == pafs.FileType.NotFound else self._info_entry(fi)

    def read(self, parts: Sequence[str], max_bytes: int) -> pa.Buffer:
        where = self.display(parts)
        e = self.stat(parts)
        if e is None:
            raise FileNotFoundError(where)
        if e.kind != "file":
            raise CatalogError(f"{where}: is not a regular file")
        if e.size > max_bytes:
            raise CatalogError(f"{where}: is {e.size} bytes, more than the {max_bytes} expected")
        try:
            with self.fs.open_input_file(where) as f:
                data: pa.Buffer = f.read_buffer(max_bytes + 1)
        except OSError as err:
            raise CatalogError(f"{where}: cannot be read ({err})") from None
        if data.size > max_bytes:
            raise CatalogError(f"{where}: is more than the {max_bytes} bytes expected")
        return data

    def makedirs(self, parts: Sequence[str]) -> None:
        try:
            self.fs.create_dir(self.display(parts), recursive=True)
        except OSError as e:
            raise CatalogError(f"{self.display(parts)}: cannot be created ({e})") from None


@dataclass(frozen=True)
class Listing:
    """What :meth:`Catalog.scan` found: the readable versions, and one line per entry it skipped."""

    manifests: tuple[Manifest, ...]
    problems: tuple[str, ...]


# The columns whose per-dimension moments the manifest's stats summarise.
MOMENT_COLUMNS = ("observations", "actions", "rewards")

# One part's moments of one column, per dimension (float64): mean, m2 (the sum of squared deviations
# from the mean), min, max.
Moments = dict[str, np.ndarray]


def part_moments(t: Transitions) -> dict[str, Moments]:
    """The moments of one part's vectors and rewards, what :class:`_Stats` merges across parts."""
    k = len(t)
    out = {}
    for c in MOMENT_COLUMNS:
        a = getattr(t, c).reshape(k, -1)
        mean = a.sum(0, dtype=np.float64) / k
        m2 = np.zeros_like(mean)
        for start in range(0, k, MOMENT_BLOCK_ROWS):
            d = a[start : start + MOMENT_BLOCK_ROWS].astype(np.float64)
            d -= mean
            m2 += np.einsum("ij,ij->j", d, d)
        out[c] = {
            "mean": mean,
            "m2": m2,
            "min": a.min(0).astype(np.float64),
            "max": a.max(0).astype(np.float64),
        }
    return out


@dataclass(frozen=True)
class _Episodes:
    """What a commit needs of one part's rows besides their moments: one value per episode."""

    starts: np.ndarray
    """The part's episode ids, in order (no id may start in two parts)."""
    returns: np.ndarray
    lengths: np.ndarray
    terminated: int
    truncated: int

    @classmethod
    def of(cls, t: Transitions) -> _Episodes:
        bounds = t.episode_bounds()
        return cls(
            starts=t.episode_id[bounds[:-1]],
            returns=np.add.reduceat(t.rewards.astype(np.float64), bounds[:-1]),
            lengths=np.diff(bounds),
            terminated=int(t.terminals.sum()),
            truncated=int((t.timeouts & ~t.terminals).sum()),
        )


@dataclass
class _Stats:
    """Per-part running moments (Chan et al.'s pairwise update), so the manifest's stats are merged
    part by part without holding the whole dataset: at commit from the moments each part's writer
    computed (:meth:`merge`), in ``verify`` from the decoded parts (:meth:`update`); both merge the same
    per-part moments in the same order, so they agree exactly."""

    n: int = 0
    mean: dict[str, np.ndarray] = field(default_factory=dict)
    m2: dict[str, np.ndarray] = field(default_factory=dict)
    lo: dict[str, np.ndarray] = field(default_factory=dict)
    hi: dict[str, np.ndarray] = field(default_factory=dict)
    returns: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    terminated: int = 0
    truncated: int = 0

    def update(self, t: Transitions) -> None:
        """Take in one decoded part: its episodes and its moments."""
        self.add_episodes(_Episodes.of(t))
        self.merge(len(t), part_moments(t))

    def add_episodes(self, e: _Episodes) -> None:
        """One part's episode returns, lengths and end counts."""
        self.returns.append(e.returns)
        self.lengths.append(e.lengths)
        self.terminated += e.terminated
        self.truncated += e.truncated

    def merge(self, k: int, moments: Mapping[str, Moments]) -> None:
        """Merge the moments of ``k`` more rows (one part's, from :func:`part_moments`)."""
        for c in MOMENT_COLUMNS:
            m = moments[c]
            if not self.n:
                self.mean[c], self.m2[c], self.lo[c], self.hi[c] = m["mean"], m["m2"], m["min"], m["max"]
                continue
            delta = m["mean"] - self.mean[c]
            total = self.n + k
            self.mean[c] = self.mean[c] + delta * k / total
            self.m2[c] = self.m2[c] + m["m2"] + delta**2 * self.n * k / total
            self.lo[c], self.hi[c] = np.minimum(self.lo[c], m["min"]), np.maximum(self.hi[c], m["max"])
        self.n += k

    def result(self) -> dict[str, Any]:
        def summary(c: str) -> dict[str, list[float]]:
            std = np.sqrt(self.m2[c] / self.n)
            return {
                "mean": self.mean[c].tolist(),
                "std": std.tolist(),
                "min": self.lo[c].tolist(),
                "max": self.hi[c].tolist(),
            }

        returns, lengths = np.concatenate(self.returns), np.concatenate(self.lengths)
        return {
            "observations": summary("observations"),
            "actions": summary("actions"),
            "rewards": {k: v[0] for k, v in summary("rewards").items()},
            **episode_stats(returns, lengths),
        }


class _VersionCheck:
    """What a version's data must pass however it is read, fed one decoded part at a time in order.

    Each part is validated on its own (the episode contract); since no episode spans two parts, the
    parts together pass the contract iff each does and no episode id starts in two of them. The content
    hash is updated part by part. So ``read``, ``iter_batches`` and ``verify`` check the same things
    without holding more than one part.
    """

    def __init__(self, man: Manifest) -> None:
        self._man = man
        self._hasher = ContentHasher(man.info)
        self._starts: list[np.ndarray] = []

    def add(self, t: Transitions, where: str) -> None:
        """Validate one part (raises :class:`ValidationError`), then take it into the whole's checks."""
        validate_transitions(t, self._man.info, where)
        self._hasher.update(t)
        self._starts.append(t.episode_id[t.episode_bounds()[:-1]])

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def problems(self) -> list[str]:
        """What is wrong with the whole, once every part was added."""
        out = []
        if self.hexdigest() != self._man.content_hash:
            out.append("content hash differs from the manifest")
        ids = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            out.append(f"episode {int(uniq[counts > 1][0])} appears in more than one part")
        return out

    def finish(self, r: VersionRef) -> None:
        problems = self.problems()
        if problems:
            raise CatalogError(f"{r}: {'; '.join(problems)} (data or manifest altered)")


# Stats are recomputed in another summation order than at commit; they agree to ~1e-12 relative.
STATS_RTOL = 1e-6


def _stats_differences(recorded: Mapping[str, Any], recomputed: Mapping[str, Any]) -> list[str]:
    out = []
    for group, values in recomputed.items():
        rec = recorded.get(group, {})
        scale = 1.0 + float(np.max(np.abs([values["min"], values["max"]])))
        for key, v in values.items():
            a, b = np.asarray(rec.get(key), dtype=np.float64), np.asarray(v, dtype=np.float64)
            if a.shape != b.shape or not np.allclose(a, b, rtol=STATS_RTOL, atol=STATS_RTOL * scale):
                out.append(f"stats.{group}.{key}")
    return out


def _part_label(r: VersionRef, p: PartRecord) -> str:
    return f"{r} part {p.path}"


def _projection(columns: Sequence[str] | None) -> tuple[str, ...]:
    """The asked column names, checked and without repeats; all of them when None."""
    valid = Transitions.columns()
    if columns is None:
        return valid
    if isinstance(columns, str):
        raise CatalogError(f"columns must be a list of names, not the string {columns!r}")
    names = tuple(dict.fromkeys(columns))
    if not names:
        raise CatalogError(f"no columns asked for (columns: {', '.join(valid)})")
    unknown = [c for c in names if c not in valid]
    if unknown:
        which = "column" if len(unknown) == 1 else "columns"
        raise CatalogError(
            f"unknown {which} {', '.join(repr(c) for c in unknown)} (columns: {', '.join(valid)})"
        )
    return names


class Catalog:
    """A store of immutable dataset versions on a pyarrow filesystem.

    Opening a catalog creates nothing: reading a missing catalog finds no datasets; the root is created
    by the first commit.
    """

    def __init__(self, uri: str | os.PathLike[str] | None = None) -> None:
        raw = str(uri) if uri is not None else default_catalog_uri()
        self.uri = raw
        self._files: _Files
        if "://" in raw:
            self.fs, self.root = _filesystem(raw)
            self._files = _ArrowFiles(self.fs, self.root)
        else:
            path = Path(raw).expanduser().resolve()
            self.fs = pafs.LocalFileSystem(use_mmap=True)
            self.root = path.as_posix()
            self.uri = self.root
            self._files = _LocalFiles(self.root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths ---------------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _version_dir(self, ref: VersionRef) -> str:
        return self._join(check_name(ref.name), f"_v{ref.version}")

    @staticmethod
    def _vparts(ref: VersionRef, *rest: str) -> list[str]:
        return [*check_name(ref.name).split("/"), f"_v{ref.version}", *rest]

    def _exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type != pafs.FileType.NotFound)

    # -- reading -------------------------------------------------------------------------------------
    def _version_entries(self, name: str) -> list[tuple[int, Entry]]:
        """Every entry named ``_v<N>`` in ``name``'s folder, whatever it is (a stray file, a link)."""
        out = []
        for e in self._files.listdir(check_name(name).split("/")):
            m = VERSION_RE.fullmatch(e.name)
            if m:
                out.append((int(m.group(1)), e))
        return sorted(out, key=lambda ne: ne[0])

    def _is_version(self, name: str, n: int, e: Entry) -> bool:
        """A version is a real folder holding a manifest entry (a broken manifest is refused on reading)."""
        return e.kind == "dir" and self._files.stat(self._vparts(VersionRef(name, n), MANIFEST)) is not None

    def _version_dirs(self, name: str) -> list[tuple[int, bool]]:
        """(N, visible) for each ``_v<N>`` entry of ``name``."""
        return [(n, self._is_version(name, n, e)) for n, e in self._version_entries(name)]

    def versions(self, name: str) -> list[int]:
        return [n for n, visible in self._version_dirs(name) if visible]

    def resolve(self, ref: str | VersionRef) -> VersionRef:
        version: int | None
        if isinstance(ref, VersionRef):
            name, version = ref.name, ref.version
        else:
            name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise CatalogError(f"no dataset named '{name}' in catalog {self.uri}")
        if version is None:
            return VersionRef(name, versions[-1])
        if version not in versions:
            raise CatalogError(
                f"'{name}@{version}' does not exist (versions: {', '.join(map(str, versions))})"
            )
        return VersionRef(name, version)

    def _manifest(self, r: VersionRef) -> Manifest:
        parts = self._vparts(r, MANIFEST)
        where = self._files.display(parts)
        try:
            data = self._files.read(parts, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise CatalogError(f"{where}: is missing") from None
        return parse_manifest(data.to_pybytes(), where, name=r.name, version=r.version)

    def checked_manifest(self, ref: str | VersionRef) -> Manifest:
        """The manifest of ``ref``, every field checked (see :mod:`datasets.manifest`)."""
        return self._manifest(self.resolve(ref))

    def manifest(self, ref: str | VersionRef) -> dict[str, Any]:
        return dict(self.checked_manifest(ref).raw)

    def scan(self) -> Listing:
        """Every version in the catalog; an unreadable one, a link or a damaged manifest is skipped with a
        line in ``problems``, so one bad version never hides the others."""
        found: list[Manifest] = []
        problems: list[str] = []
        for name, entries in self._names(problems):
            for e in entries:
                m = VERSION_RE.fullmatch(e.name)
                if not m:
                    continue
                where = self._files.display([*name.split("/"), e.name])
                if e.kind == "link":
                    problems.append(f"{where}: skipped, a symbolic link (the catalog never follows links)")
                    continue
                try:
                    if self._is_version(name, int(m.group(1)), e):
                        found.append(self._manifest(VersionRef(name, int(m.group(1)))))
                except RlsynthError as err:
                    problems.append(f"skipped {name}@{m.group(1)}: {err}")
        found.sort(key=lambda man: (man.name, man.version))
        return Listing(tuple(found), tuple(problems))

    def _names(self, problems: list[str]) -> Iterator[tuple[str, list[Entry]]]:
        """(name, entries of its folder) for every folder below the root that is a valid name."""
        stack: list[tuple[str, ...]] = [()]
        while stack:
            parts = stack.pop()
            try:
                entries = self._files.listdir(parts)
            except RlsynthError as err:
                problems.append(f"skipped: {err}")
                continue
            if parts:
                yield "/".join(parts), entries
            for e in sorted(entries, key=lambda x: x.name, reverse=True):
                child = "/".join([*parts, e.name])
                if not COMPONENT_RE.fullmatch(e.name) or len(child) > MAX_NAME_LENGTH:
                    continue
                if e.kind == "link":
                    problems.append(
                        f"{self._files.display([*parts, e.name])}: skipped, a symbolic link "
                        "(the catalog never follows links)"
                    )
                elif e.kind == "dir":
                    stack.append((*parts, e.name))

    def _read_checked(self, parts: Sequence[str], size: int, sha256: str, label: str) -> pa.Buffer:
        """A whole file (memory-mapped on a local disk), checked against its recorded size and SHA-256."""
        try:
            data = self._files.read(parts, size)
        except FileNotFoundError:
            raise CatalogError(f"{label}: is missing") from None
        if data.size != size:
            raise CatalogError(f"{label}: is {data.size} bytes where the manifest records {size}")
        if _sha256_bytes(memoryview(data)) != sha256:
            raise CatalogError(f"{label}: checksum mismatch (the file was altered or damaged)")
        return data

    def _part_stamps(self, r: VersionRef, man: Manifest) -> list[cache.PartStamp]:
        """Each part as it is on disk now; refused unless it is a regular file of its recorded size."""
        stamps = []
        for p in man.parts:
            parts = self._vparts(r, p.path)
            e = self._files.stat(parts)
            label = f"{r} part {p.path}"
            if e is None:
                raise CatalogError(f"{label}: is missing")
            if e.kind == "link":
                raise CatalogError(f"{label}: is a symbolic link; the catalog never follows links")
            if e.kind != "file":
                raise CatalogError(f"{label}: is not a regular file")
            if e.size != p.bytes:
                raise CatalogError(f"{label}: is {e.size} bytes where the manifest records {p.bytes}")
            stamps.append(cache.PartStamp(p.path, e.size, e.mtime_ns))
        return stamps

    def _part_table(
        self, r: VersionRef, man: Manifest, p: PartRecord, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """One part, its size and SHA-256 checked before its footer and then ``columns`` (all when None)
        are decoded. The file's bytes are dropped on return: only the decoded columns stay."""
        label = _part_label(r, p)
        data = self._read_checked(self._vparts(r, p.path), p.bytes, p.sha256, label)
        return read_part(data, p.rows, man.info, label, columns)

    def _checked_part(self, r: VersionRef, man: Manifest, p: PartRecord, check: _VersionCheck) -> Transitions:
        """One part decoded whole, validated and taken into ``check``."""
        t = from_table(self._part_table(r, man, p), _part_label(r, p))
        check.add(t, _part_label(r, p))
        return t

    def _checked_parts(self, r: VersionRef, man: Manifest) -> Iterator[Transitions]:
        """Every part in order, each checked before it is yielded; raises after the last one if the whole
        is not the version the manifest records (content hash, an episode in two parts)."""
        check = _VersionCheck(man)
        for p in man.parts:
            # Yielded without a local name, so this frame holds no part while the next one decodes.
            yield self._checked_part(r, man, p, check)
        check.finish(r)

    def _part_arrays(
        self, r: VersionRef, man: Manifest, columns: tuple[str, ...]
    ) -> Iterator[dict[str, np.ndarray]]:
        """Each part's asked columns in order, checked as :meth:`iter_batches` says."""
        if set(columns) == set(Transitions.columns()):
            for t in self._checked_parts(r, man):
                yield {c: getattr(t, c) for c in columns}
                del t  # the loop name would keep this part alive while the next one decodes
        else:
            # A projection cannot be validated or content-hashed (both need every column); each part's
            # size and SHA-256 still cover all its bytes.
            for p in man.parts:
                yield table_arrays(self._part_table(r, man, p, columns), columns, _part_label(r, p))

    def _part_batches(
        self, r: VersionRef, man: Manifest, columns: tuple[str, ...], max_rows: int
    ) -> Iterator[ColumnBatch]:
        for arrays in self._part_arrays(r, man, columns):
            rows = len(arrays[columns[0]])
            for lo in range(0, rows, max_rows):
                yield {c: a[lo : lo + max_rows].copy() for c, a in arrays.items()}
            del arrays  # as above: no part outlives its batches

    def iter_batches(
        self,
        ref: str | VersionRef,
        *,
        columns: Sequence[str] | None = None,
        max_rows: int = DEFAULT_BATCH_ROWS,
    ) -> Iterator[ColumnBatch]:
        """Stream a version part by part, in batches of at most ``max_rows`` rows, without holding it.

        Each batch maps the asked ``columns`` (default: all, in :meth:`Transitions.columns` order) to
        numpy arrays with the dtypes and shapes of :class:`Transitions` (vectors ``(n, dim)`` float32):
        what trainers (``torch.from_numpy``), HDF5/Minari writers and numpy reductions take directly.
        Batches are copies that own their memory (writable, so ``torch.from_numpy`` takes them without a
        warning; keeping one does not pin its whole part). Rows keep the version's order; a batch never
        spans two parts, and an episode may span two batches.

        Memory: one decoded part of the asked columns (only those are decompressed), plus the batch the
        consumer holds; never the whole version. The cache is neither read nor written.

        Checks: the reference, the column names and every part's presence and size before this returns;
        each part's size and SHA-256 before it is decoded, so a damaged part raises
        :class:`CatalogError` naming it. With all columns, each part passes the episode contract before
        its first batch, and after the last batch the iterator raises :class:`CatalogError` unless the
        content hash matches the manifest and no episode appears in two parts. So a consumer must not
        commit anything it derived (an export, a trained model) before the iterator is exhausted
        without error. A projection (some columns) skips those two whole-version checks.
        """
        names = _projection(columns)
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise CatalogError(f"max_rows must be a positive integer, got {max_rows!r}")
        r = self.resolve(ref)
        man = self._manifest(r)
        self._part_stamps(r, man)  # a missing or truncated part fails now, before any batch
        return self._part_batches(r, man, names, max_rows)

    def read(self, ref: str | VersionRef, *, use_cache: bool = True) -> Dataset:
        """Load a version. Every part must be a regular file of its recorded size; on a cache hit (see
        :mod:`datasets.cache` for what it trusts) that is all that is read. Otherwise each part is
        checked against its SHA-256, decoded and validated, and the whole's content hash recomputed
        before it is returned or cached. To read a version larger than memory, see :meth:`iter_batches`."""
        r = self.resolve(ref)
        man = self._manifest(r)
        stamps = self._part_stamps(r, man)
        folder = self._version_dir(r)
        if use_cache:
            expected = cache.Expected(
                man.counts["transitions"], man.info.observation_space.dim, man.info.action_space.dim
            )
            cached = cache.load(man.content_hash, folder=folder, stamps=stamps, expected=expected)
            if cached is not None:
                return Dataset(info=man.info, transitions=cached, source=str(r))
            filled = self._fill_cache(r, man, expected, folder, stamps)
            if filled is not None:
                return Dataset(info=man.info, transitions=filled, source=str(r))
        t = concat_transitions(list(self._checked_parts(r, man)))
        return Dataset(info=man.info, transitions=t, source=str(r))

    def _fill_cache(
        self,
        r: VersionRef,
        man: Manifest,
        expected: cache.Expected,
        folder: str,
        stamps: Sequence[cache.PartStamp],
    ) -> Transitions | None:
        """Read a version into a new cache entry part by part (one decoded part in memory at a time) and
        return the entry's memory-mapped columns; ``None`` if the cache cannot take it (then the caller
        reads into memory). The entry is published only after the content hash has been checked. Where
        an entry of this content exists but was not checked against this folder's parts, the parts are
        read and checked as before and the entry is served only if its CRCs are theirs (else rebuilt)."""
        fill = cache.Filling.open(man.content_hash, expected)
        if fill is None:
            return None
        filled = self._stream_into(fill, r, man, folder, stamps)
        if filled is None and fill.stale:
            # The existing entry did not hold this version's content (it was discarded): fill a new one.
            fill = cache.Filling.open(man.content_hash, expected)
            return None if fill is None else self._stream_into(fill, r, man, folder, stamps)
        return filled

    def _stream_into(
        self,
        fill: cache.Filling,
        r: VersionRef,
        man: Manifest,
        folder: str,
        stamps: Sequence[cache.PartStamp],
    ) -> Transitions | None:
        try:
            for t in self._checked_parts(r, man):
                fill.add(t)
                del t  # the loop name would keep this part alive while the next one decodes
        except OSError as e:
            # The cache's disk (a part that cannot be read fails again in the caller's in-memory read).
            fill.abort()
            log.info("not caching %s: %s", r, e)
            return None
        except BaseException:
            fill.abort()
            raise
        return fill.finish(folder, stamps)

    def file_buffer(self, ref: str | VersionRef, file_name: str) -> pa.Buffer:
        """An artifact stored with a version, checked against its size and hash (memory-mapped)."""
        if len(file_name) > MAX_FILE_NAME or not FILE_NAME_RE.fullmatch(file_name):
            raise CatalogError(f"invalid artifact name '{file_name[:80]}'")
        r = self.resolve(ref)
        man = self._manifest(r)
        rec = man.file(file_name)
        if rec is None:
            names = ", ".join(f.name for f in man.files) or "none"
            raise CatalogError(f"{r} has no file '{file_name}' (files: {names})")
        parts = self._vparts(r, "files", file_name)
        return self._read_checked(parts, rec.bytes, rec.sha256, f"{r} file {file_name}")

    def file_bytes(self, ref: str | VersionRef, file_name: str) -> bytes:
        """An artifact stored with a version (checked against its hash)."""
        return self.file_buffer(ref, file_name).to_pybytes()

    def verify(self, ref: str | VersionRef) -> dict[str, Any]:
        """Check everything a version's manifest says against its files; never raises for damaged data.

        The manifest's every field (:func:`datasets.manifest.parse_manifest`); the folder (no links, no
        part or artifact that the manifest does not list); each part (size, SHA-256, footer, schema,
        rows, the episode contract) and artifact (size, SHA-256); then over the whole: episode ids
        unique across parts, the content hash, the counts and the per-column stats. One part is decoded
        at a time (only per-episode summaries are kept), so a version larger than memory verifies too.
        """
        r = self.resolve(ref)
        try:
            man = self._manifest(r)
        except RlsynthError as e:
            return _verify_report(r, None, None, [str(e)])
        problems = self._folder_problems(r, man)
        check, stats = _VersionCheck(man), _Stats()
        data_ok = True
        for p in man.parts:
            try:
                # Not kept: one part is decoded at a time, and only its per-episode summaries stay.
                stats.update(self._checked_part(r, man, p, check))
            except MemoryError:
                raise  # running out is this process's problem, not a finding about the data
            except (RlsynthError, pa.ArrowException, OSError) as e:
                problems.append(str(e))
                data_ok = False
        for f in man.files:
            try:
                self._read_checked(self._vparts(r, "files", f.name), f.bytes, f.sha256, f"file {f.name}")
            except RlsynthError as e:
                problems.append(str(e))
        recomputed = check.hexdigest() if data_ok else None
        if data_ok:
            problems += _whole_problems(man, check, stats)
        return _verify_report(r, man, recomputed, problems)

    def _folder_problems(self, r: VersionRef, man: Manifest) -> list[str]:
        """Links anywhere in the version folder, and parts or artifacts the manifest does not list."""
        problems = []
        listed_parts = {p.path for p in man.parts}
        listed_files = {f.name for f in man.files}
        folders: list[tuple[list[str], set[str], str]] = [(self._vparts(r), listed_parts, "part file")]
        if (self._files.stat(self._vparts(r, "files")) or Entry("", "", 0, 0)).kind == "dir":
            folders.append((self._vparts(r, "files"), listed_files, "artifact"))
        for parts, listed, what in folders:
            try:
                entries = self._files.listdir(parts)
            except RlsynthError as err:
                problems.append(str(err))
                continue
            for e in entries:
                where = self._files.display([*parts, e.name])
                if e.kind == "link":
                    problems.append(f"{where}: is a symbolic link; the catalog never follows links")
                elif what == "part file" and PART_RE.fullmatch(e.name) and e.name not in listed:
                    problems.append(f"{where}: part file not listed in the manifest")
                elif what == "artifact" and e.name not in listed and not e.name.startswith("."):
                    problems.append(f"{where}: artifact not listed in the manifest")
        return problems

    def annotate(self, ref: str | VersionRef, key: str, value: Any) -> dict[str, Any]:
        """Record an evaluation result (``fidelity``) in a version's manifest, atomically.

        Only annotation keys may change: the data, its hashes and its lineage stay as committed, and
        ``verify`` still checks the same content hash.
        """
        if key not in ANNOTATION_KEYS:
            raise CatalogError(
                f"'{key}' is not an annotation (annotations: {', '.join(sorted(ANNOTATION_KEYS))})"
            )
        r = self.resolve(ref)
        man = dict(self._manifest(r).raw)
        man[key] = value
        folder = self._version_dir(r)
        data = json.dumps(man, indent=2, sort_keys=True, default=_json_default).encode()
        tmp = f"{folder}/{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, f"{folder}/{MANIFEST}")
        return man

    # -- staging -------------------------------------------------------------------------------------
    def clear_stale_staging(self, name: str | None = None, *, older_than_s: float | None = None) -> list[str]:
        """Remove what killed writers left in ``_staging`` (of ``name``, or of every name); returns what
        was removed.

        A staging folder goes when the writer that opened it ran on this host and is gone, or, with
        ``older_than_s``, when it was last changed longer ago than that (the only way to clear a writer
        on another host, or staging from before writers were recorded). A live writer's is never touched.
        """
        names = [check_name(name)] if name is not None else [n for n, _ in self._names([])]
        removed = []
        now = time.time()
        for n in names:
            base = [*n.split("/"), STAGING]
            entries = {e.name: e for e in self._files.listdir(base)}
            for txn, e in entries.items():
                if not TXN_RE.fullmatch(txn) or e.kind not in ("dir", "link"):
                    continue
                writer = self._writer(base, txn)
                dead = writer is not None and writer.is_dead()
                old = older_than_s is not None and now - e.mtime_ns / 1e9 > older_than_s
                if (dead or old) and self._remove_staging(base, txn, e):
                    removed.append(self._files.display([*base, txn]))
            for fname in entries:
                txn = fname.removesuffix(WRITER_SUFFIX)
                if fname.endswith(WRITER_SUFFIX) and TXN_RE.fullmatch(txn) and txn not in entries:
                    writer = self._writer(base, txn)
                    if writer is None or writer.is_dead() or older_than_s is not None:
                        self._remove_path([*base, fname], is_dir=False)
        return removed

    def _writer(self, base: Sequence[str], txn: str) -> Writer | None:
        try:
            data = self._files.read([*base, f"{txn}{WRITER_SUFFIX}"], MAX_WRITER_BYTES)
            return Writer.from_json(json.loads(data.to_pybytes()))
        except (OSError, ValueError, RlsynthError):
            return None

    def _remove_staging(self, base: Sequence[str], txn: str, e: Entry) -> bool:
        ok = self._remove_path([*base, txn], is_dir=e.kind == "dir")
        self._remove_path([*base, f"{txn}{WRITER_SUFFIX}"], is_dir=False)
        return ok

    def _remove_path(self, parts: Sequence[str], *, is_dir: bool) -> bool:
        path = self._files.display(parts)
        try:
            if not self.local:
                (self.fs.delete_dir if is_dir else self.fs.delete_file)(path)
            elif is_dir:
                shutil.rmtree(path)  # fd-based on Linux: never follows a link inside
            else:
                os.unlink(path)  # a link itself, never its target
        except FileNotFoundError:
            return False
        except OSError as err:
            log.info("cannot remove stale staging %s: %s", path, err)
            return False
        return True

    # -- writing -------------------------------------------------------------------------------------
    def begin(self, name: str, info: DatasetInfo) -> Transaction:
        """Open a commit of a new version of ``name``; nothing is visible until :meth:`Transaction.commit`.

        The writer's identity is recorded first, so a staging folder without a live writer is garbage.
        """
        check_name(name)
        txn = Transaction(self.uri, name, uuid.uuid4().hex, info)
        base = [*name.split("/"), STAGING]
        self._files.makedirs(base)
        record = json.dumps(Writer.this_process().to_json()).encode()
        with self.fs.open_output_stream(self._join(*base, f"{txn.txn_id}{WRITER_SUFFIX}")) as f:
            f.write(record)
        self._files.makedirs([*base, txn.txn_id])
        return txn

    def write(
        self,
        name: str,
        dataset: Dataset,
        *,
        lineage: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        files: Mapping[str, str | os.PathLike[str]] | None = None,
        rows_per_part: int = ROWS_PER_PART,
    ) -> VersionRef:
        """Validate and commit a whole in-memory dataset as the next version of ``name`` (through
        :meth:`stream`: parts written by one thread per core; the files do not depend on the threads)."""
        validate_transitions(dataset.transitions, dataset.info, f"dataset for '{name}'")
        with self.stream(name, dataset.info, rows_per_part=rows_per_part) as s:
            s.add(dataset.transitions)
            return s.commit(lineage=lineage, tags=tags, files=files)

    def stream(self, name: str, info: DatasetInfo, *, rows_per_part: int | None = None) -> PartStream:
        """Open a commit of ``name`` that takes its rows block by block as they are made (a sampler's
        chunks): use it as a context manager, :meth:`PartStream.add` each block, then
        :meth:`PartStream.commit`; leaving the ``with`` without a commit, or by an error, writes nothing.
        Parts of ``rows_per_part`` rows (default :data:`ROWS_PER_PART`)."""
        if rows_per_part is None:
            rows_per_part = ROWS_PER_PART
        if rows_per_part < 1:
            raise CatalogError(f"rows_per_part must be positive, got {rows_per_part}")
        return PartStream(self.begin(name, info), rows_per_part, cores())

    def list(self) -> list[dict[str, Any]]:
        """Manifests of every readable version, sorted by name then version (see :meth:`scan`)."""
        return [dict(m.raw) for m in self.scan().manifests]


def _whole_problems(man: Manifest, check: _VersionCheck, stats: _Stats) -> list[str]:
    problems = check.problems()
    lengths = np.concatenate(stats.lengths)
    counts = {
        "episodes": len(lengths),
        "transitions": stats.n,
        "terminated_episodes": stats.terminated,
        "truncated_episodes": stats.truncated,
    }
    for key, value in counts.items():
        if value != man.counts[key]:
            problems.append(f"counts.{key} is {man.counts[key]}, the data holds {value}")
    diff = _stats_differences(man.raw["stats"], stats.result())
    if diff:
        problems.append(f"{', '.join(diff[:4])} differ from the data")
    return problems


def _verify_report(
    r: VersionRef, man: Manifest | None, recomputed: str | None, problems: list[str]
) -> dict[str, Any]:
    return {
        "name": r.name,
        "version": r.version,
        "ok": not problems,
        "content_hash": recomputed,
        "expected_content_hash": man.content_hash if man else None,
        "problems": problems,
    }


def split_rows(t: Transitions, rows: int) -> Iterable[Transitions]:
    """Cut transitions into parts of whole episodes, each about ``rows`` rows (an episode is never split)."""
    bounds = t.episode_bounds()
    lo = 0
    while lo < len(t):
        # The last episode start at or below lo + rows, but always at least one whole episode.
        k = int(np.searchsorted(bounds, lo + rows, side="right")) - 1
        hi = int(bounds[k]) if bounds[k] > lo else int(bounds[np.searchsorted(bounds, lo, side="right")])
        yield Transitions(**{c: getattr(t, c)[lo:hi] for c in Transitions.columns()})
        lo = hi


def _summary_name(part_file: str) -> str:
    return f"{part_file}{SUMMARY_SUFFIX}"


def _max_summary_bytes(info: DatasetInfo) -> int:
    # Four float64 lists per moment column, each value at most ~25 characters in JSON.
    dims = 2 * info.observation_space.dim + 2 * info.action_space.dim + 2
    return 4096 + 4 * 32 * dims


def _summary_mac(key: str, body: Mapping[str, Any]) -> str:
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hmac.new(key.encode(), data, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class _PartSummary:
    """What :meth:`Transaction.write_part` recorded of one part, its authenticity already checked."""

    rows: int
    bytes: int
    sha256: str
    moments: dict[str, Moments]


@dataclass(frozen=True)
class _Held:
    """What the process that wrote a part knows of it: the SHA-256 its file was written with, its row
    count and its episodes."""

    sha256: str
    rows: int
    episodes: _Episodes


@dataclass(frozen=True)
class _HeldParts:
    """Every part of a commit as its writer knew them, and the content hash it fed them to in order:
    the commit checks the files against these instead of decoding them."""

    parts: Mapping[int, _Held]
    content_hash: str


class PartStream:
    """A version written while its rows are still being made (see :meth:`Catalog.stream`).

    Blocks of whole episodes, episode ids increasing from block to block, are cut into the parts
    :func:`split_rows` cuts from their concatenation, so the files are :meth:`Catalog.write`'s of the
    same rows. Each part is written on a pool of one thread per core (encoding, SHA-256 and moments run
    outside the GIL) as soon as the next block shows where it ends, with at most one part per thread in
    flight: memory holds a few parts, not the version. The content hash is fed the parts in order as they
    are cut, so the commit checks each file's size and SHA-256 and merges summaries, decoding nothing.
    On an error or an interrupt, parts not yet started are dropped and running ones finish before the
    transaction aborts, so the abort never races a write.
    """

    def __init__(self, txn: Transaction, rows_per_part: int, threads: int) -> None:
        self._txn, self._rows = txn, rows_per_part
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self._threads = threads
        self._buffer: list[Transitions] = []
        self._buffered = 0
        self._hasher = ContentHasher(txn.info)
        self._pending: deque[tuple[int, _Episodes, Future[dict[str, Any]]]] = deque()
        self._held: dict[int, _Held] = {}
        self._done = False

    @property
    def transaction(self) -> Transaction:
        return self._txn

    def __enter__(self) -> PartStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, t: Transitions) -> None:
        """Take one block of whole episodes (its rows are not copied until a part is cut from them)."""
        if self._done:
            raise CatalogError(f"{self._txn.name}: this stream is closed")
        if len(t):
            self._buffer.append(t)
            self._buffered += len(t)
        if self._buffered > self._rows:
            # Every part but the last is where split_rows of the whole would cut it: past it lie more
            # than a part's rows, so each of its episode bounds is known. The last may still grow.
            self._write(list(split_rows(concat_transitions(self._buffer), self._rows)), keep_last=True)

    def commit(
        self,
        *,
        lineage: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        files: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> VersionRef:
        """Write what is left, wait for every part, add ``files`` and publish the version."""
        if self._done:
            raise CatalogError(f"{self._txn.name}: this stream is closed")
        if self._buffer:
            self._write(list(split_rows(concat_transitions(self._buffer), self._rows)), keep_last=False)
        while self._pending:
            self._settle()
        for fname, src in (files or {}).items():
            self._txn.add_file(fname, src)
        held = _HeldParts(dict(self._held), self._hasher.hexdigest())
        ref = self._txn._commit(lineage or {}, tags or {}, len(self._held), None, held)
        self._done = True
        self._shutdown()
        return ref

    def close(self) -> None:
        """Abort unless committed (what leaving the ``with`` block does)."""
        if self._done:
            return
        self._done = True
        try:
            self._shutdown()
        finally:
            self._txn.abort()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _write(self, parts: list[Transitions], *, keep_last: bool) -> None:
        last = parts.pop() if keep_last else None
        self._buffer = [] if last is None else [last]
        self._buffered = 0 if last is None else len(last)
        for part in parts:
            index = len(self._held) + len(self._pending)
            self._hasher.update(part)
            episodes = _Episodes.of(part)
            if self._pool is None:
                w = self._txn.write_part(index, part)
                self._held[index] = _Held(str(w["sha256"]), int(w["rows"]), episodes)
                continue
            while len(self._pending) >= self._threads:
                self._settle()
            self._pending.append((index, episodes, self._pool.submit(self._txn.write_part, index, part)))

    def _settle(self) -> None:
        index, episodes, future = self._pending.popleft()
        w = future.result()
        self._held[index] = _Held(str(w["sha256"]), int(w["rows"]), episodes)


@dataclass(frozen=True)
class Transaction:
    """A commit in progress. A plain value: send it to another process (a Ray task) to write parts there.

    ``key`` authenticates the summary each :meth:`write_part` leaves beside its part; it travels only
    inside this value (never to the catalog's files), so a summary altered in staging is refused.
    """

    catalog_uri: str
    name: str
    txn_id: str
    info: DatasetInfo
    key: str = field(default_factory=lambda: secrets.token_hex(32), repr=False, compare=False)

    def catalog(self) -> Catalog:
        return Catalog(self.catalog_uri)

    def staging_dir(self, cat: Catalog | None = None) -> str:
        c = cat or self.catalog()
        return c._join(self.name, STAGING, self.txn_id)

    def _writer_file(self, cat: Catalog) -> str:
        return cat._join(self.name, STAGING, f"{self.txn_id}{WRITER_SUFFIX}")

    def _drop_writer_file(self, cat: Catalog) -> None:
        # Already gone: an abort after a commit, or a clean-up by another process.
        with contextlib.suppress(OSError):
            cat.fs.delete_file(self._writer_file(cat))

    def write_part(self, index: int, t: Transitions) -> dict[str, Any]:
        """Write part ``index``: whole episodes, validated; a retried task's rewrite replaces it atomically.

        Parts are concatenated in index order at commit; episode ids must keep increasing across parts.
        Beside the part goes its summary (size, SHA-256, per-column moments), computed here so that the
        commit merges summaries instead of recomputing statistics over all the data.
        Returns ``{"index", "rows", "bytes", "sha256"}``.
        """
        if not 0 <= index < 100_000:
            raise CatalogError(f"part index {index} out of range [0, 99999]")
        validate_transitions(t, self.info, f"{self.name} part {index}")
        cat = self.catalog()
        data = encode_part(t, self.info)
        fname = f"part-{index:05d}.parquet"
        sha = _sha256_bytes(data)
        moments = {c: {k: v.tolist() for k, v in m.items()} for c, m in part_moments(t).items()}
        body = {
            "format": SUMMARY_FORMAT,
            "txn": self.txn_id,
            "part": fname,
            "rows": len(t),
            "bytes": len(data),
            "sha256": sha,
            "moments": moments,
        }
        summary = json.dumps({"summary": body, "mac": _summary_mac(self.key, body)}).encode()
        # The part first, then its summary: a writer killed in between leaves a part without one (refused
        # at commit until the retried task writes both again).
        for name, payload in ((fname, data), (_summary_name(fname), summary)):
            final = f"{self.staging_dir(cat)}/{name}"
            tmp = f"{final}.{uuid.uuid4().hex}.tmp"
            with cat.fs.open_output_stream(tmp) as f:
                f.write(payload)
            cat.fs.move(tmp, final)
        return {"index": index, "rows": len(t), "bytes": len(data), "sha256": sha}

    def add_file(self, file_name: str, src: str | os.PathLike[str]) -> None:
        if len(file_name) > MAX_FILE_NAME or not FILE_NAME_RE.fullmatch(file_name):
            raise CatalogError(f"invalid artifact name '{file_name}'")
        cat = self.catalog()
        with open(src, "rb") as f:
            data = f.read()
        cat.fs.create_dir(f"{self.staging_dir(cat)}/files", recursive=True)
        with cat.fs.open_output_stream(f"{self.staging_dir(cat)}/files/{file_name}") as out:
            out.write(data)

    def abort(self) -> None:
        cat = self.catalog()
        d = self.staging_dir(cat)
        if cat._exists(d):
            cat.fs.delete_dir(d)
        self._drop_writer_file(cat)

    def _parts(self, cat: Catalog) -> list[tuple[int, str]]:
        sel = pafs.FileSelector(self.staging_dir(cat), allow_not_found=True)
        out = []
        for fi in cat.fs.get_file_info(sel):
            m = PART_RE.fullmatch(fi.base_name)
            if m:
                out.append((int(m.group(1)), fi.base_name))
        return sorted(out)

    def commit(
        self,
        *,
        lineage: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        expected_parts: int | None = None,
        written: Sequence[Mapping[str, Any]] | None = None,
    ) -> VersionRef:
        """Check, hash and publish the staged parts as the next version. Returns its reference.

        ``expected_parts``: refuse to commit unless exactly parts 0..expected_parts-1 exist (a lost shard
        must never yield a smaller dataset). ``written``: what :meth:`write_part` returned for each part
        (from any process); when given, the staged parts must be exactly those.

        Cost: each part is read once, in order, one at a time (memory: one decoded part). Its size and
        SHA-256 are checked against the summary its writer left (authenticated with this transaction's
        key), then it is decoded for the content hash (a running hash over the parts in order: it cannot
        be merged from per-part digests, see :class:`ContentHasher`) and its episode ids. The per-part
        episode contract was checked by :meth:`write_part` on exactly these bytes, and the statistics are
        merged from the summaries; across parts, episode ids must be unique. Any failure raises
        :class:`CatalogError` in one line and publishes nothing.
        """
        return self._commit(lineage or {}, tags or {}, expected_parts, written, None)

    def _commit(
        self,
        lineage: Mapping[str, Any],
        tags: Mapping[str, Any],
        expected_parts: int | None,
        written: Sequence[Mapping[str, Any]] | None,
        held: _HeldParts | None,
    ) -> VersionRef:
        """:meth:`commit`; with ``held`` (what this process wrote: :class:`PartStream`), every part is
        checked by size and SHA-256 against it and none is decoded again."""
        cat = self.catalog()
        parts = self._parts(cat)
        if not parts:
            raise CatalogError(f"{self.name}: nothing to commit (no parts were written)")
        indices = [i for i, _ in parts]
        if expected_parts is not None and indices != list(range(expected_parts)):
            raise CatalogError(
                f"{self.name}: expected parts 0..{expected_parts - 1}, found {indices}; nothing committed"
            )
        manifest = self._build_manifest(cat, parts, lineage, tags, held)
        if written is not None:
            self._check_written(manifest["parts"], written)
        ref = self._publish_local(cat, manifest) if cat.local else self._publish_generic(cat, manifest)
        self._drop_writer_file(cat)
        self._clear_dead_writers(cat)
        return ref

    def _check_written(
        self, staged: Sequence[Mapping[str, Any]], written: Sequence[Mapping[str, Any]]
    ) -> None:
        by_path = {f"part-{int(w['index']):05d}.parquet": w for w in written}
        if sorted(by_path) != [p["path"] for p in staged]:
            raise CatalogError(
                f"{self.name}: staged parts {[p['path'] for p in staged]} are not the ones written "
                f"{sorted(by_path)}; nothing committed"
            )
        for p in staged:
            w = by_path[p["path"]]
            if (
                w.get("sha256") != p["sha256"]
                or w.get("rows") != p["rows"]
                or w.get("bytes", p["bytes"]) != p["bytes"]
            ):
                raise CatalogError(
                    f"{self.name}: part {p['path']} is not the one written (rows, size or SHA-256 differ); "
                    "nothing committed"
                )

    def _clear_dead_writers(self, cat: Catalog) -> None:
        """What writers of this name that were killed on this host left (best effort, after publishing:
        a failure here never fails the commit)."""
        try:
            for path in cat.clear_stale_staging(self.name):
                log.info("removed the staging of a killed writer: %s", path)
        except (RlsynthError, OSError) as e:
            log.info("stale staging of %s not cleared: %s", self.name, e)

    def _staged(self, fname: str) -> list[str]:
        return [*self.name.split("/"), STAGING, self.txn_id, fname]

    def _summary(self, cat: Catalog, fname: str) -> _PartSummary:
        """The summary :meth:`write_part` left beside ``fname``, refused unless this transaction wrote it."""
        label = f"{self.name}: part {fname}"
        try:
            raw = cat._files.read(self._staged(_summary_name(fname)), _max_summary_bytes(self.info))
        except FileNotFoundError:
            raise CatalogError(
                f"{label} has no summary (its writer was killed before finishing it, or it was removed); "
                "write the part again; nothing committed"
            ) from None
        except CatalogError as e:
            raise CatalogError(f"{label}: summary refused ({e}); nothing committed") from None
        try:
            doc = json.loads(raw.to_pybytes())
            body, mac = doc["summary"], doc["mac"]
            ok = isinstance(mac, str) and hmac.compare_digest(_summary_mac(self.key, body), mac)
        except (ValueError, TypeError, KeyError, RecursionError):
            ok = False
        if not ok or body.get("format") != SUMMARY_FORMAT or body.get("txn") != self.txn_id:
            raise CatalogError(
                f"{label}: its summary is not the one this transaction wrote (altered, or from another "
                "writer); nothing committed"
            )
        if body.get("part") != fname:
            raise CatalogError(f"{label}: its summary is for {body.get('part')!r}; nothing committed")
        moments = {
            c: {k: np.asarray(body["moments"][c][k], dtype=np.float64) for k in ("mean", "m2", "min", "max")}
            for c in MOMENT_COLUMNS
        }
        return _PartSummary(int(body["rows"]), int(body["bytes"]), str(body["sha256"]), moments)

    def _staged_part(self, cat: Catalog, fname: str, summary: _PartSummary) -> Transitions:
        """One staged part, checked against its summary's size and SHA-256, then decoded."""
        label = f"{self.name}: part {fname}"
        data = self._checked_bytes(cat, fname, summary)
        try:
            return from_table(read_part(data, summary.rows, self.info, label), label)
        except CatalogError as e:
            raise CatalogError(f"{e}; nothing committed") from None

    def _held_part(self, cat: Catalog, fname: str, summary: _PartSummary, held: _Held | None) -> _Episodes:
        """The episodes of a part this process wrote (:class:`PartStream` encoded the staged file from
        rows it took them from), once the file is checked to be still the one written: no decode."""
        if held is None or summary.sha256 != held.sha256 or summary.rows != held.rows:
            raise CatalogError(f"{self.name}: part {fname} is not the one written; nothing committed")
        self._checked_bytes(cat, fname, summary)
        return held.episodes

    def _checked_bytes(self, cat: Catalog, fname: str, summary: _PartSummary) -> pa.Buffer:
        label = f"{self.name}: part {fname}"
        changed = "changed after it was written ({}); nothing committed"
        try:
            data = cat._files.read(self._staged(fname), summary.bytes)
        except FileNotFoundError:
            raise CatalogError(f"{label} vanished from staging; nothing committed") from None
        except CatalogError as e:
            raise CatalogError(f"{label} {changed.format(e)}") from None
        if data.size != summary.bytes:
            raise CatalogError(
                f"{label} {changed.format(f'{data.size} bytes, its summary says {summary.bytes}')}"
            )
        if _sha256_bytes(memoryview(data)) != summary.sha256:
            raise CatalogError(f"{label} {changed.format('its SHA-256 differs from its summary')}")
        return data

    def _build_manifest(
        self,
        cat: Catalog,
        parts: Sequence[tuple[int, str]],
        lineage: Mapping[str, Any],
        tags: Mapping[str, Any],
        held: _HeldParts | None,
    ) -> dict[str, Any]:
        sdir = self.staging_dir(cat)
        hasher = ContentHasher(self.info)
        stats = _Stats()
        starts: list[np.ndarray] = []
        part_meta = []
        for index, fname in parts:
            summary = self._summary(cat, fname)
            if held is not None:
                episodes = self._held_part(cat, fname, summary, held.parts.get(index))
            else:
                t = self._staged_part(cat, fname, summary)
                hasher.update(t)
                episodes = _Episodes.of(t)
                del t  # one decoded part at a time
            starts.append(episodes.starts)
            stats.add_episodes(episodes)
            stats.merge(summary.rows, summary.moments)
            part_meta.append(
                {"path": fname, "rows": summary.rows, "bytes": summary.bytes, "sha256": summary.sha256}
            )
        self._check_episode_ids(parts, starts)
        files = {}
        for fi in cat.fs.get_file_info(pafs.FileSelector(f"{sdir}/files", allow_not_found=True)):
            with cat.fs.open_input_stream(fi.path) as f:
                data = f.read()
            files[fi.base_name] = {"sha256": _sha256_bytes(data), "bytes": len(data)}
        full_lineage = {
            "sources": [],
            "generator": None,
            "guidance": None,
            "agent": None,
            "seeds": None,
            "code_version": code_version(),
            **dict(lineage),
        }
        return {
            "name": self.name,
            "version": None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "content_hash": hasher.hexdigest() if held is None else held.content_hash,
            "env_id": self.info.env_id,
            "info": self.info.to_json(),
            "schema": schema_json(self.info),
            "counts": {
                "episodes": int(sum(len(x) for x in stats.lengths)),
                "transitions": stats.n,
                "terminated_episodes": stats.terminated,
                "truncated_episodes": stats.truncated,
            },
            "stats": stats.result(),
            "lineage": full_lineage,
            "fidelity": None,
            "tags": dict(tags),
            "parts": part_meta,
            "files": files,
        }

    def _check_episode_ids(self, parts: Sequence[tuple[int, str]], starts: Sequence[np.ndarray]) -> None:
        """Each part passed the episode contract when written; together they do iff no episode id
        starts in two parts."""
        ids = np.concatenate(starts)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = int(uniq[counts > 1][0])
            where = [fname for (_, fname), s in zip(parts, starts, strict=True) if (s == dup).any()]
            raise CatalogError(
                f"{self.name}: episode {dup} appears in more than one part ({', '.join(where)}); "
                "nothing committed"
            )

    def _write_manifest(self, cat: Catalog, folder: str, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default).encode()
        tmp = f"{folder}/{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with cat.fs.open_output_stream(tmp) as f:
            f.write(data)
        cat.fs.move(tmp, f"{folder}/{MANIFEST}")

    def _next_version(self, cat: Catalog) -> int:
        # Any entry named _v<N> takes N, whatever it is: a stray file or link there is never a version,
        # and skipping its number (rather than refusing) keeps the name committable without clean-up.
        entries = cat._version_entries(self.name)
        return (entries[-1][0] + 1) if entries else 1

    def _publish_local(self, cat: Catalog, manifest: dict[str, Any]) -> VersionRef:
        sdir = self.staging_dir(cat)
        for p in manifest["parts"]:  # the summaries are consumed: the folder becomes the version
            with contextlib.suppress(FileNotFoundError):
                cat.fs.delete_file(f"{sdir}/{_summary_name(p['path'])}")
        version = self._next_version(cat)
        while True:
            manifest["version"] = version
            self._write_manifest(cat, sdir, manifest)
            target = cat._join(self.name, f"_v{version}")
            try:
                os.rename(sdir, target)
            except OSError as e:
                # ENOTDIR/EISDIR: a stray file or link already holds that name.
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    version = max(version + 1, self._next_version(cat))
                    continue
                raise CatalogError(f"{self.name}: commit failed ({e})") from None
            return VersionRef(self.name, version)

    def _publish_generic(self, cat: Catalog, manifest: dict[str, Any]) -> VersionRef:
        sdir = self.staging_dir(cat)
        version = self._next_version(cat)
        target = cat._join(self.name, f"_v{version}")
        manifest["version"] = version
        cat.fs.create_dir(target, recursive=True)
        for p in manifest["parts"]:
            cat.fs.move(f"{sdir}/{p['path']}", f"{target}/{p['path']}")
        if manifest["files"]:
            cat.fs.create_dir(f"{target}/files", recursive=True)
            for fname in manifest["files"]:
                cat.fs.move(f"{sdir}/files/{fname}", f"{target}/files/{fname}")
        self._write_manifest(cat, target, manifest)
        cat.fs.delete_dir(sdir)
        return VersionRef(self.name, version)
