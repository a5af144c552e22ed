"""thread_map: results in order, inline on one thread, and a failure stops what has not started."""

from __future__ import annotations

import threading
import time

import pytest

from rlsynth.datasets.parallel import cores, thread_map


def test_results_come_back_in_the_items_order_whatever_finishes_first() -> None:
    def slow_for_small(x: int) -> int:
        time.sleep(0.01 * (5 - x))
        return x * x

    assert thread_map(slow_for_small, [0, 1, 2, 3, 4], threads=3) == [0, 1, 4, 9, 16]


def test_one_thread_runs_inline() -> None:
    seen: list[str] = []
    assert thread_map(lambda x: seen.append(threading.current_thread().name) or x, [1, 2], threads=1) == [
        1,
        2,
    ]
    assert set(seen) == {threading.current_thread().name}


def test_a_failure_propagates_after_the_running_calls_finish_and_the_queued_are_dropped() -> None:
    started: list[int] = []
    finished: list[int] = []

    def work(x: int) -> int:
        started.append(x)
        if x == 0:
            raise OSError("injected")
        time.sleep(0.2)
        finished.append(x)
        return x

    with pytest.raises(OSError, match="injected"):
        thread_map(work, list(range(20)), threads=2)
    # Nothing is still running when the error arrives, and most of the queue never started.
    assert sorted(finished) == sorted(x for x in started if x != 0)
    assert len(started) < 20


def test_cores_is_at_least_one() -> None:
    assert cores() >= 1
