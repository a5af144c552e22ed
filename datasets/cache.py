"""A local cache of decoded versions, keyed by content hash.

Decoding Parquet's fixed-size-list columns costs ~10x a plain array read (Arrow decodes a repetition
level per float), and training jobs read the same immutable versions again and again. So the first read
of a version also stores its columns as ``.npy`` files under ``$RLSYNTH_CACHE`` (default
``~/.cache/rlsynth``), named by the version's content hash; later reads memory-map them. Each file's
CRC-32 is recorded and checked on every cached read, so a damaged cache is detected, deleted and
rebuilt from the catalog, never served. ``RLSYNTH_CACHE=off`` disables the cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from datasets.types import Transitions

log = logging.getLogger(__name__)
INDEX = "index.json"
CRC_CHUNK = 1 << 24


def cache_root() -> Path | None:
    raw = os.environ.get("RLSYNTH_CACHE", "")
    if raw.lower() in ("off", "0", "none", "false"):
        return None
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "rlsynth"


def _crc32(a: np.ndarray) -> int:
    # zlib.crc32 releases the GIL on large buffers, so columns are checked in parallel threads.
    view = np.ascontiguousarray(a).reshape(-1).view(np.uint8).data
    crc = 0
    for lo in range(0, len(view), CRC_CHUNK):
        crc = zlib.crc32(view[lo : lo + CRC_CHUNK], crc)
    return crc


def _key_dir(root: Path, content_hash: str) -> Path:
    algo, _, digest = content_hash.partition(":")
    if algo != "sha256" or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a content hash: {content_hash!r}")
    return root / "arrays" / digest


def load(content_hash: str) -> Transitions | None:
    """The cached columns of a version, CRC-checked; ``None`` on a miss or a damaged entry."""
    root = cache_root()
    if root is None:
        return None
    d = _key_dir(root, content_hash)
    try:
        index = json.loads((d / INDEX).read_text())
        cols = {c: np.load(d / f"{c}.npy", mmap_mode="r") for c in Transitions.columns()}
    except (OSError, ValueError, KeyError):
        return None
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        crcs = dict(zip(cols, pool.map(_crc32, cols.values()), strict=True))
    if any(crcs[c] != index.get(c) for c in cols):
        log.warning("cache entry %s is damaged; it is removed and rebuilt from the catalog", d)
        shutil.rmtree(d, ignore_errors=True)
        return None
    return Transitions(**cols)


def store(content_hash: str, t: Transitions) -> None:
    """Store a version's columns (best effort: a full disk or a race only costs the speed-up)."""
    root = cache_root()
    if root is None:
        return
    d = _key_dir(root, content_hash)
    if (d / INDEX).exists():
        return
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
        index = {}
        for c in Transitions.columns():
            a = getattr(t, c)
            np.save(tmp / f"{c}.npy", a, allow_pickle=False)
            index[c] = _crc32(a)
        (tmp / INDEX).write_text(json.dumps(index))
        os.rename(tmp, d)
    except OSError as e:
        log.info("not caching %s: %s", content_hash, e)
        if "tmp" in locals():
            shutil.rmtree(tmp, ignore_errors=True)
