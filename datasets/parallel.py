"""Threads for work that runs outside the GIL (hashing, Parquet encoding, numpy reductions, CRCs)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def thread_map(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``[fn(x) for x in items]``, on up to ``threads`` threads (inline when that is one).

    On an exception or an interrupt the calls not yet started are dropped and the running ones finish
    before it propagates, so a caller's clean-up never races a call still at work."""
    n = min(len(items), threads)
    if n <= 1:
        return [fn(x) for x in items]
    pool = ThreadPoolExecutor(n)
    try:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
