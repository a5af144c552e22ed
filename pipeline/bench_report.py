"""Benchmarks write their tables into BENCHMARKS.md, one section each, with command, machine and date."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
from pathlib import Path

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


def matmul_gflops() -> float:
    """fp32 matmul throughput of one core (1024² by 1024², best of 5): the machine's speed, stated beside
    every benchmark table (machines of one kind differ about 3× from one session to the next)."""
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(1024, 1024)
        x @ x
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * 1024**3 / best / 1e9
