"""A local cache of decoded versions, keyed by content hash.

Decoding Parquet's fixed-size-list columns costs ~10x a plain array read (Arrow decodes a repetition
level per float), and training jobs read the same immutable versions again and again. So the first read
of a version also stores its columns as ``.npy`` files under ``$RLSYNTH_CACHE`` (default
``~/.cache/rlsynth``), named by the version's content hash; later reads memory-map them.
``RLSYNTH_CACHE=off`` disables the cache.

What a cache hit trusts, exactly:

* **The cache folder is this user's.** Only rlsynth writes it, and only after the catalog has recomputed
  the content hash of the decoded arrays and found the manifest's (so the key names the content, and a
  crafted manifest cannot plant its arrays under another dataset's hash). Each column's CRC-32 is
  checked on every hit: damage is detected, the entry deleted and rebuilt, never served. A CRC is not a
  signature: someone who can write the cache folder can forge an entry.
* **A part file keeps its bytes while it keeps its size and mtime.** Each entry records, per version
  folder it was checked against, every part's (name, size, mtime). A hit requires the version's parts
  as they are now (regular files, no links, the manifest's sizes, checked by the catalog) to match that
  record exactly; a deleted, truncated, replaced or touched part makes the read a miss, so the catalog
  re-reads and re-checks every part. An in-place rewrite that keeps size and mtime is not seen by a
  read; ``datasets verify`` never uses the cache and finds it.
* Nothing else: the arrays must also have the manifest's row count and widths, or the entry is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rlsynth.datasets.parallel import cores, thread_map
from rlsynth.datasets.types import Transitions

log = logging.getLogger(__name__)
INDEX = "index.json"
SEEN = "seen"
# Entries written before the content hash was checked at store time are not trusted: a miss, rebuilt.
FORMAT = 2
CRC_CHUNK = 1 << 24
MAX_INDEX_BYTES = 1 << 16
DTYPES = {
    "episode_id": np.int64,
    "step": np.int32,
    "observations": np.float32,
    "actions": np.float32,
    "rewards": np.float32,
    "next_observations": np.float32,
    "terminals": np.bool_,
    "timeouts": np.bool_,
}


@dataclass(frozen=True)
class PartStamp:
    """A part file as it is on disk now: its name in the version folder, size and mtime (ns)."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Expected:
    """What the manifest says the cached arrays are: rows and the observation and action widths."""

    rows: int
    obs_dim: int
    act_dim: int

    def shape(self, column: str) -> tuple[int, ...]:
        if column in ("observations", "next_observations"):
            return (self.rows, self.obs_dim)
        if column == "actions":
            return (self.rows, self.act_dim)
        return (self.rows,)


def cache_root() -> Path | None:
    raw = os.environ.get("RLSYNTH_CACHE", "")
    if raw.lower() in ("off", "0", "none", "false"):
        return None
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "rlsynth"


def _crc32(a: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of ``a``'s bytes, continuing ``crc`` (the CRC of the bytes before them)."""
    # zlib.crc32 releases the GIL on large buffers, so columns are checked in parallel threads.
    view = np.ascontiguousarray(a).reshape(-1).view(np.uint8).data
    for lo in range(0, len(view), CRC_CHUNK):
        crc = zlib.crc32(view[lo : lo + CRC_CHUNK], crc)
    return crc


def _key_dir(root: Path, content_hash: str) -> Path:
    algo, _, digest = content_hash.partition(":")
    if algo != "sha256" or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a content hash: {content_hash!r}")
    return root / "arrays" / digest


def _seen_file(d: Path, folder: str) -> Path:
    return d / SEEN / f"{hashlib.sha256(folder.encode()).hexdigest()}.json"


def _stamps_json(folder: str, stamps: Sequence[PartStamp]) -> dict[str, Any]:
    return {"folder": folder, "parts": [[s.path, s.size, s.mtime_ns] for s in stamps]}


def _read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read(MAX_INDEX_BYTES + 1)[:MAX_INDEX_BYTES])


def _discard(d: Path, why: str) -> None:
    log.warning("cache entry %s %s; it is removed and rebuilt from the catalog", d, why)
    shutil.rmtree(d, ignore_errors=True)


def load(
    content_hash: str, *, folder: str, stamps: Sequence[PartStamp], expected: Expected
) -> Transitions | None:
    """The cached columns of a version, or ``None`` on a miss.

    A hit needs an intact entry (CRC-checked, ``expected`` rows and widths) that was checked against
    ``folder`` when its parts had exactly ``stamps``.
    """
    root = cache_root()
    if root is None:
        return None
    d = _key_dir(root, content_hash)
    try:
        index = _read_json(d / INDEX)
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        _discard(d, "is from an older rlsynth")
        return None
    try:
        seen = _read_json(_seen_file(d, folder))
    except (OSError, ValueError):
        seen = None
    if seen != _stamps_json(folder, stamps):
        return None  # never checked against these parts as they are now: the catalog re-reads them
    cols = _intact(d, expected, index.get("crc"))
    return None if cols is None else Transitions(**cols)


def _intact(d: Path, expected: Expected, crc: object) -> dict[str, np.ndarray] | None:
    """Entry ``d``'s columns memory-mapped, if they have ``expected``'s shapes and the CRC-32s ``crc``
    (column -> CRC); else ``None``, the entry discarded."""
    cols = _mapped(d, expected)
    if cols is None:
        return None
    crcs = dict(zip(cols, thread_map(_crc32, list(cols.values()), min(4, cores())), strict=True))
    if not isinstance(crc, dict) or any(crcs[c] != crc.get(c) for c in cols):
        _discard(d, "is damaged")
        return None
    return cols


def _mapped(d: Path, expected: Expected) -> dict[str, np.ndarray] | None:
    """Entry ``d``'s columns memory-mapped (read-only), or ``None`` (the entry discarded) if they cannot be
    read or do not have ``expected``'s rows and widths."""
    try:
        cols = {c: np.load(d / f"{c}.npy", mmap_mode="r", allow_pickle=False) for c in Transitions.columns()}
    except (OSError, ValueError):
        _discard(d, "cannot be read")
        return None
    if any(a.shape != expected.shape(c) or a.dtype != DTYPES[c] for c, a in cols.items()):
        _discard(d, "does not have the manifest's rows and widths")
        return None
    return cols


class Filling:
    """A cache entry written part by part while the catalog reads a version (so a first read never holds
    the version in memory): each column is one ``.npy`` file whose rows are appended in order, with its
    CRC-32 chained across parts. :meth:`finish` publishes it only after the caller has checked the
    content hash; :meth:`abort` (or any error) leaves nothing. Plain appends, not a writable memory map:
    a full disk is an ``OSError`` here, where a map would die of SIGBUS.

    Where the entry already exists (the same content under another name or folder, or parts touched
    since it was checked), the filling only checks: it takes the CRC-32s of the parts the catalog reads
    and checks, writes nothing, and :meth:`finish` serves the existing entry only if its files have
    exactly those CRCs (else it is discarded, and ``finish`` returns ``None`` with :attr:`stale` set)."""

    def __init__(self, d: Path, expected: Expected, *, check_only: bool = False) -> None:
        d.parent.mkdir(parents=True, exist_ok=True)
        self.final = d
        self.stale = False
        self.tmp = None if check_only else Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
        self.expected = expected
        self.files: dict[str, BinaryIO] = {}
        self.crc = dict.fromkeys(Transitions.columns(), 0)
        self.rows = 0
        if self.tmp is None:
            return
        try:
            for c in Transitions.columns():
                f = open(self.tmp / f"{c}.npy", "wb")  # noqa: SIM115 - closed by finish/abort
                self.files[c] = f
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPES[c])),
                          "fortran_order": False, "shape": expected.shape(c)}  # fmt: skip
                np.lib.format.write_array_header_2_0(f, header)
        except BaseException:
            self.abort()
            raise

    @classmethod
    def open(cls, content_hash: str, expected: Expected) -> Filling | None:
        """A filling for ``content_hash``, or ``None`` where the cache is off or cannot be written."""
        root = cache_root()
        if root is None:
            return None
        d = _key_dir(root, content_hash)
        try:
            return cls(d, expected, check_only=(d / INDEX).exists())
        except OSError as e:
            log.info("not caching %s: %s", content_hash, e)
            return None

    def add(self, t: Transitions) -> None:
        """Append one part's rows (in the version's order)."""
        for c in self.crc:
            a: np.ndarray = np.ascontiguousarray(getattr(t, c), dtype=DTYPES[c])
            self.crc[c] = _crc32(a, self.crc[c])
            if c in self.files:
                self.files[c].write(a.reshape(-1).view(np.uint8).data)
        self.rows += len(t)

    def finish(self, folder: str, stamps: Sequence[PartStamp]) -> Transitions | None:
        """Publish the entry as checked against ``folder``'s ``stamps`` and return its memory-mapped
        columns; ``None`` (nothing left behind) if it could not be written."""
        try:
            for f in self.files.values():
                f.close()
            if self.rows != self.expected.rows:
                raise OSError(f"{self.rows} rows read where {self.expected.rows} were expected")
            if self.tmp is not None:
                self._publish()
            # What is served is what was just read and checked, whoever wrote the entry.
            cols = _intact(self.final, self.expected, self.crc)
            if cols is None:
                self.stale = True
                return None
            _write_atomic(_seen_file(self.final, folder), json.dumps(_stamps_json(folder, stamps)).encode())
        except OSError as e:
            log.info("not caching %s: %s", self.final.name, e)
            self.abort()
            return None
        return Transitions(**cols)

    def _publish(self) -> None:
        assert self.tmp is not None
        (self.tmp / INDEX).write_text(json.dumps({"format": FORMAT, "rows": self.rows, "crc": self.crc}))
        (self.tmp / SEEN).mkdir()
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not (self.final / INDEX).exists():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # another process won the race

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
