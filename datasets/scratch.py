"""Work arrays that may be larger than the memory a process can still take.

Training builds one table of its data (tokens, features, world-model inputs). For a version that fits,
that table is an ordinary array. For one that does not, :func:`scratch_array` returns the same zeroed
array backed by a file instead: an unlinked temporary file, its blocks reserved up front with
``posix_fallocate`` (so a full disk is an error here, not a SIGBUS in the middle of training), shared-mapped,
so the kernel pages it to and from the disk as the training batches touch it and its pages are never
counted as this process's private memory. The file disappears with the last reference to the array.

Where the file lives: ``$RLSYNTH_SCRATCH`` if set, else the cache folder (``$RLSYNTH_CACHE``, which is
meant to take datasets), else the system's temporary folder. A folder on a memory-backed file system
(tmpfs) would defeat the purpose: point ``RLSYNTH_SCRATCH`` at a disk.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
from pathlib import Path

import numpy as np

from rlsynth.datasets.cache import cache_root
from rlsynth.datasets.errors import ScratchError

SCRATCH_ENV = "RLSYNTH_SCRATCH"
HEADROOM_SHARE = 0.5
"""An array goes to a file when it needs more than this share of the memory the process may still take:
the rest is left for everything the stage allocates beside it (batches, activations, the model)."""


def _proc_kib(path: str, field: str) -> int | None:
    """The kB figure of ``field`` in a /proc file (``None`` where the platform has none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def headroom_bytes() -> float:
    """Bytes this process may still allocate privately: the least of the system's available memory, the
    data-segment limit less the data segment in use, and the address-space limit less the address space
    in use (each where the platform reports it; ``inf`` where none does)."""
    room = [math.inf]
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    if avail is not None:
        room.append(avail * 1024.0)
    for limit, field in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(limit)[0]
        used = _proc_kib("/proc/self/status", field)
        if soft != resource.RLIM_INFINITY and used is not None:
            room.append(max(0.0, float(soft) - used * 1024.0))
    return min(room)


def scratch_folder() -> Path:
    raw = os.environ.get(SCRATCH_ENV)
    if raw:
        return Path(raw).expanduser()
    root = cache_root()
    return root / "scratch" if root is not None else Path(tempfile.gettempdir())


def scratch_array(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zeroed C-ordered array of ``shape``: in memory when it takes at most ``HEADROOM_SHARE`` of
    :func:`headroom_bytes`, else file-backed (module docstring). The values are the same either way."""
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes == 0 or nbytes <= HEADROOM_SHARE * headroom_bytes():
        return np.zeros(shape, dt)
    return file_backed(shape, dt)


def file_backed(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zeroed array of ``shape`` in an unlinked, fully reserved scratch file (:func:`scratch_array`)."""
    folder = scratch_folder()
    nbytes = math.prod(shape) * dtype.itemsize
    # TemporaryFile is unlinked at once where the platform allows, so nothing is left behind; the mapping
    # keeps the file alive after it is closed.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix="rlsynth-", suffix=".scratch", dir=folder) as f:
            os.posix_fallocate(f.fileno(), 0, nbytes)
            return np.memmap(f, dtype=dtype, mode="r+", shape=shape)
    except OSError as e:
        raise _no_room(nbytes, folder, e) from None


def _no_room(nbytes: int, folder: Path, e: OSError) -> ScratchError:
    return ScratchError(
        f"a {nbytes / 2**30:.2f} GiB work array does not fit in memory and {folder} cannot hold it "
        f"({e.strerror or e}); set {SCRATCH_ENV} to a folder on a disk with room"
    )
