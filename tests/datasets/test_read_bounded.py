"""read_bounded: the one way rlsynth reads a whole file it did not write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlsynth.datasets.errors import SourceError, read_bounded


def test_reads_a_file_within_the_limit(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(b"x" * 10)
    assert read_bounded(f, 10, "thing", SourceError) == b"x" * 10


def test_a_larger_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    f = tmp_path / "big.json"
    f.write_bytes(b"x" * 11)
    with pytest.raises(SourceError, match=r"big.json: 11 bytes, more than a thing may hold \(10\)"):
        read_bounded(f, 10, "thing", SourceError)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    f = tmp_path / "pipe.json"
    os.mkfifo(f)
    with pytest.raises(SourceError, match=r"pipe\.json: not a regular file"):
        read_bounded(f, 10, "thing", SourceError)


def test_a_directory_and_a_missing_file_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"not a regular file|cannot open"):
        read_bounded(tmp_path, 10, "thing", SourceError)
    with pytest.raises(SourceError, match=r"nope\.json: no such thing"):
        read_bounded(tmp_path / "nope.json", 10, "thing", SourceError)
