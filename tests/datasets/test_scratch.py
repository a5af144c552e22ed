"""Work arrays: in memory when they fit, else in an unlinked, reserved scratch file; same values both ways."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rlsynth.datasets import scratch
from rlsynth.datasets.errors import ScratchError


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "scratch"
    monkeypatch.setenv(scratch.SCRATCH_ENV, str(d))
    return d


def test_an_array_that_fits_is_an_ordinary_zeroed_array(folder: Path) -> None:
    a = scratch.scratch_array((100, 3), np.float32)
    assert type(a) is np.ndarray and a.dtype == np.float32 and a.shape == (100, 3)
    assert not a.any()
    assert not folder.exists()


def test_an_array_that_does_not_fit_is_file_backed_and_leaves_no_file(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scratch, "headroom_bytes", lambda: 1000.0)
    a = scratch.scratch_array((1000, 7), np.float32)  # 28 kB > half of 1 kB
    assert isinstance(a, np.memmap) and a.shape == (1000, 7) and a.flags.c_contiguous
    assert not a.any()  # a fresh file reads as zeros, like np.zeros
    a[::3] = np.arange(7, dtype=np.float32)
    assert float(a.sum()) == 334 * 21
    # Unlinked at once: the folder holds nothing while the array lives, nor after.
    assert folder.is_dir() and list(folder.iterdir()) == []
    del a
    assert list(folder.iterdir()) == []


def test_the_file_backed_array_has_its_size_reserved(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scratch, "headroom_bytes", lambda: 0.0)
    calls: list[tuple[int, int]] = []
    real = os.posix_fallocate

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(scratch.os, "posix_fallocate", spy)
    a = scratch.scratch_array((64, 1024), np.float64)
    assert calls == [(0, a.nbytes)] and a.nbytes == 64 * 1024 * 8
    if sys.platform == "linux":  # the mapping is of a deleted file: nothing to clean up
        maps = Path("/proc/self/maps").read_text().splitlines()
        assert any(str(folder) in line and "(deleted)" in line for line in maps)


def test_a_full_scratch_disk_is_one_clear_error_and_leaves_nothing(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scratch, "headroom_bytes", lambda: 0.0)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(scratch.os, "posix_fallocate", full)
    with pytest.raises(
        ScratchError, match=rf"0\.00 GiB work array does not fit in memory and {folder} cannot"
    ):
        scratch.scratch_array((10, 10), np.float32)
    assert list(folder.iterdir()) == []


def test_an_unusable_scratch_folder_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(scratch.SCRATCH_ENV, str(blocker / "scratch"))
    monkeypatch.setattr(scratch, "headroom_bytes", lambda: 0.0)
    with pytest.raises(ScratchError, match="set RLSYNTH_SCRATCH to a folder on a disk with room"):
        scratch.scratch_array((10,), np.int64)
    assert blocker.read_text() == "not a folder"


def test_the_folder_defaults_to_the_cache_then_the_temporary_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(scratch.SCRATCH_ENV, raising=False)
    monkeypatch.setenv("RLSYNTH_CACHE", "/some/cache")
    assert scratch.scratch_folder() == Path("/some/cache/scratch")
    monkeypatch.setenv("RLSYNTH_CACHE", "off")
    assert scratch.scratch_folder().is_dir()


@pytest.mark.skipif(sys.platform != "linux", reason="reads the limits' use from /proc")
def test_headroom_follows_the_data_segment_limit() -> None:
    child = textwrap.dedent(
        """
        import json, resource
        from rlsynth.datasets import scratch
        def vm_data():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmData:"))
        limit = vm_data() + 64 * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
        room = scratch.headroom_bytes()
        big = scratch.scratch_array((10 * 2**20,), "float32")  # 40 MiB: more than half the room
        small = scratch.scratch_array((2**20,), "float32")
        print(json.dumps({"room": room, "big": type(big).__name__, "small": type(small).__name__}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert 32 * 2**20 < out["room"] <= 64 * 2**20
    assert out == {"room": out["room"], "big": "memmap", "small": "ndarray"}
