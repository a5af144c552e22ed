"""Benchmarks write their tables into BENCHMARKS.md, one section each, with command, machine and date."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def int_list(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    """A benchmark option of comma-separated integers (seeds), or one clear line and exit 2."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        parser.error(f"{flag}: expected comma-separated integers, got {text!r}")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the section ``key`` of BENCHMARKS.md."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], BENCHMARKS.parent), *sys.argv[1:]])
    today = dt.date.today().isoformat()
    section = (
        f"<!-- bench:{key} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {today}\n\n"
        f"{body.strip()}\n<!-- /bench:{key} -->"
    )
    text = (
        BENCHMARKS.read_text()
        if BENCHMARKS.exists()
        else "# Benchmarks\n\nEvery table below was written by the command above it.\n"
    )
    pattern = re.compile(rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->", re.S)
    text = (
        pattern.sub(lambda _m: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    BENCHMARKS.write_text(text)


def matmul_gflops(threads: int = 1) -> float:
    """fp32 matmul throughput (1024² by 1024², best of 5) on ``threads`` threads: on one, the machine's
    speed, stated beside every benchmark table (machines of one kind differ about 3× from one session to
    the next); on the threads a benchmark runs with, the peak its achieved FLOP/s are a share of."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1024, 1024)
        x @ x
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * 1024**3 / best / 1e9


def network_flops(fn: Callable[[], object]) -> int:
    """The FLOPs of the network operations (matrix products, convolutions, attention) ``fn`` runs, as
    torch's FLOP counter counts them; elementwise work is not counted, so achieved FLOP/s over wall time
    is the share of the run spent at matmul speed."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Speed:
    """How fast a sampler delivers: its marginal rate and the network FLOPs behind each transition."""

    rate: float
    """Marginal transitions per second (between two request sizes: start-up and a first chunk cancel)."""
    flops_per_transition: float
    """Network FLOPs per marginal transition (:func:`network_flops`)."""

    @property
    def gflops(self) -> float:
        return self.rate * self.flops_per_transition / 1e9

    def share(self, peak_gflops: float) -> float:
        """Achieved network FLOP/s as a share of ``peak_gflops``."""
        return self.gflops / peak_gflops


def chunk_transitions(kind: str, chunks: int = 1) -> int:
    """Transitions in ``chunks`` whole cold sampling chunks of a window family ("trajectory" or
    "autoregressive") at the cpu-small horizon. A cold request is made in whole chunks, so a marginal rate
    between two requests inside one chunk is undefined: benchmarks take it between whole chunks."""
    # Imported here: bench/scale.py's parent process imports this module and must not load torch.
    from rlsynth.generators.autoregressive import AutoregressiveConfig
    from rlsynth.generators.diffusion import TrajectoryConfig
    from rlsynth.generators.sampling import CHUNKS

    cfg = TrajectoryConfig() if kind == "trajectory" else AutoregressiveConfig()
    return chunks * CHUNKS[kind] * (cfg.horizon - 1)


def marginal_speed(run: Callable[[int], T], small: int, n: int, repeats: int) -> tuple[T, Speed]:
    """``run(n)``'s result and the :class:`Speed` of ``run`` between requests of ``small`` and ``n``
    transitions: medians of ``repeats`` timed runs of each (single timings on these machines vary by
    ±25%), and the FLOP difference of one counted run of each."""
    import time

    import numpy as np

    if not 0 < small < n:
        raise ValueError(f"need 0 < small < n, got {small} and {n}")
    seconds: dict[int, list[float]] = {small: [], n: []}
    out: list[T] = []
    for _ in range(repeats):
        for m in (small, n):
            t0 = time.perf_counter()
            got = run(m)
            seconds[m].append(time.perf_counter() - t0)
            if m == n:
                out = [got]
    dt = float(np.median(seconds[n]) - np.median(seconds[small]))
    flops = network_flops(lambda: run(n)) - network_flops(lambda: run(small))
    rate = (n - small) / dt if dt > 0 else float("nan")
    return out[0], Speed(rate=rate, flops_per_transition=flops / (n - small))
