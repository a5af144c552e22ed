"""Every stage at D4RL sizes: wall time and peak memory of each stage at each size, one run.

For each size N, a D4RL-layout HDF5 file of N Hopper-v5 transitions is built locally (a random-recipe
dataset of ``--base`` transitions, tiled: each copy's episodes renumbered, a copy cut mid-episode ends it
truncated), then imported (``datasets import``), verified (``datasets verify``), read into a d3rlpy replay
buffer, used to train each generator family for ``--train-steps`` steps (cpu-small presets), and judged
as ``datasets evaluate --reference`` judges it (against itself: novelty and coverage are on; every row's
one-step error unless ``--eval-sample``). Each stage runs in a process of its own, so stages never share
a peak; its wall time and peak RSS (the child's ru_maxrss, from wait4) are reported. Linux carries a
process's peak across exec, so the parent imports nothing heavy: a child's figure starts from the
parent's few tens of MB, not from torch's.

    python bench/scale.py --sizes 250000,1000000,2000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Not the script's folder on the path: bench/generators.py must not shadow the generators package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rlsynth.pipeline.bench_report import int_list, matmul_gflops, write_section

if TYPE_CHECKING:
    from rlsynth.datasets.types import Dataset

ENV = "Hopper-v5"
KINDS = ("trajectory", "transition", "autoregressive", "world-model")
CLI = (sys.executable, "-m", "rlsynth.pipeline.cli")


@dataclass(frozen=True)
class Stage:
    key: str
    label: str


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_bytes: int
    exit_code: int


def stages(kinds: Sequence[str]) -> list[Stage]:
    return [
        Stage("build", "build a D4RL-layout HDF5 file"),
        Stage("import", "`datasets import` (HDF5 → catalog)"),
        Stage("verify", "`datasets verify`"),
        Stage("read", "read into a d3rlpy replay buffer"),
        *[Stage(f"train-{k}", f"train {k}") for k in kinds],
        Stage("evaluate", "`datasets evaluate --reference` (novelty, coverage)"),
    ]


def tiled(base: Dataset, n: int) -> Dataset:
    """``base`` repeated up to ``n`` transitions, each copy's episodes renumbered; a copy cut mid-episode
    ends that episode truncated, as D4RL's collectors mark a cut episode."""
    import numpy as np

    from rlsynth.datasets.types import Dataset, Transitions

    t = base.transitions
    copies = -(-n // len(t))
    rows = np.tile(np.arange(len(t)), copies)[:n]
    copy = np.repeat(np.arange(copies, dtype=np.int64), len(t))[:n]
    cols = {c: getattr(t, c)[rows] for c in Transitions.columns()}
    cols["episode_id"] = t.episode_id[rows] + copy * (int(t.episode_id.max()) + 1)
    if not (cols["terminals"][-1] or cols["timeouts"][-1]):
        cols["timeouts"][-1] = True
    return Dataset(base.info, Transitions(**cols), f"{base.source} tiled to {n}")


def name_of(n: int) -> str:
    return f"scale/n{n}"


def run_stage(stage: str, n: int, work: Path, a: argparse.Namespace) -> None:
    """The work of one stage, in this (child) process."""
    from rlsynth.datasets.catalog import Catalog

    if stage == "matmul":
        print(json.dumps({"gflops": matmul_gflops()}))
    elif stage == "build":
        from rlsynth.datasets.hdf5 import write_hdf5
        from rlsynth.datasets.recipes import RecipeConfig, build

        base = build(RecipeConfig("random", ENV, transitions=a.base, seed=0, progress=False)).dataset
        write_hdf5(tiled(base, n), work / f"hopper-{n}.hdf5")
    elif stage == "read":
        from rlsynth.offline_rl.buffers import to_replay_buffer

        buffer = to_replay_buffer(Catalog(str(work / "catalog")).read(f"{name_of(n)}@1"))
        assert buffer.transition_count == n, buffer.transition_count
    elif stage.startswith("train-"):
        from rlsynth.generators.api import train_generator

        ds = Catalog(str(work / "catalog")).read(f"{name_of(n)}@1")
        kind = stage.removeprefix("train-")
        train_generator(kind, ds, work / f"gen-{kind}-{n}", steps=a.train_steps, seed=0, progress=False)
    else:
        raise SystemExit(f"unknown stage {stage!r}")


def command(stage: str, n: int, work: Path, a: argparse.Namespace) -> list[str]:
    """The command line of one stage: the CLI itself where a command does the stage, else this script."""
    cat = ["--catalog", str(work / "catalog")]
    ref = f"{name_of(n)}@1"
    if stage == "import":
        return [*CLI, "datasets", "import", str(work / f"hopper-{n}.hdf5"), "--name", name_of(n), *cat]
    if stage == "verify":
        return [*CLI, "datasets", "verify", ref, *cat]
    if stage == "evaluate":
        sample = [] if a.eval_sample is None else ["--sample", str(a.eval_sample)]
        plot = ["--plot", str(work / f"fidelity-{n}.png")]
        return [*CLI, "datasets", "evaluate", ref, "--reference", ref, "--no-store", *plot, *sample, *cat]
    child = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--size", str(n)]
    return [*child, "--work", str(work), "--base", str(a.base), "--train-steps", str(a.train_steps)]


def measure(argv: list[str], log: Path) -> Measured:
    """Run ``argv`` to its end; its wall time and peak RSS (Linux reports ru_maxrss in KiB)."""
    env = {**os.environ, "RLSYNTH_CACHE": str(log.parent / "cache")}
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(seconds, usage.ru_maxrss * 1024, proc.returncode)


def short(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def cell(m: Measured | None) -> str:
    if m is None:
        return "—"
    if m.exit_code != 0:
        return f"failed (exit {m.exit_code}) after {m.seconds:.1f} s, {m.peak_bytes / 2**30:.2f} GiB"
    return f"{m.seconds:.1f} s, {m.peak_bytes / 2**30:.2f} GiB"


def table(results: dict[tuple[str, int], Measured], plan: list[Stage], sizes: Sequence[int]) -> str:
    head = ["stage", *[f"N = {short(n)}" for n in sizes]]
    ratio = len(sizes) >= 2
    if ratio:
        head.append(f"time {short(sizes[-1])} / {short(sizes[-2])}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in plan:
        row = [s.label, *[cell(results.get((s.key, n))) for n in sizes]]
        if ratio:
            big, small = results.get((s.key, sizes[-1])), results.get((s.key, sizes[-2]))
            ok = big is not None and small is not None and big.exit_code == small.exit_code == 0
            row.append(f"{big.seconds / small.seconds:.2f}" if ok and big and small else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="250000,1000000,2000000", help="Comma-separated transition counts.")
    p.add_argument("--train-steps", type=int, default=300, help="Training steps of each family.")
    p.add_argument("--kinds", default=",".join(KINDS), help="Generator families to train.")
    p.add_argument("--base", type=int, default=20_000, help="Transitions of the random dataset tiled.")
    p.add_argument("--eval-sample", type=int, default=None, help="Rows of the one-step check (default all).")
    p.add_argument("--work", default=None, help="Folder for the files (default: a temporary one).")
    p.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.size_list = int_list(p, "--sizes", a.sizes)
    a.kind_list = tuple(k for k in a.kinds.split(",") if k)
    if bad := [k for k in a.kind_list if k not in KINDS]:
        p.error(f"--kinds: unknown {', '.join(bad)} (kinds: {', '.join(KINDS)})")
    if min(a.size_list) < 2 or a.base < 2 or a.train_steps < 1:
        p.error("--sizes and --base must be at least 2 transitions, --train-steps at least 1")
    if a.eval_sample is not None and a.eval_sample < 1:
        p.error("--eval-sample must be positive")
    return a


def run_all(a: argparse.Namespace, work: Path) -> str:
    plan = stages(a.kind_list)
    results: dict[tuple[str, int], Measured] = {}
    for n in a.size_list:
        for s in plan:
            m = measure(command(s.key, n, work, a), work / f"{s.key}-{n}.log")
            results[s.key, n] = m
            print(json.dumps({"stage": s.key, "size": n, "seconds": m.seconds, "peak_bytes": m.peak_bytes,
                              "exit": m.exit_code}), flush=True)  # fmt: skip
            if m.exit_code != 0:
                tail = (work / f"{s.key}-{n}.log").read_text().strip().splitlines()[-3:]
                print(f"  {s.key} failed: {' / '.join(tail)}", file=sys.stderr, flush=True)
    return table(results, plan, a.size_list)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    if a.stage is not None:
        run_stage(a.stage, a.size, Path(a.work), a)
        return
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        # Measured in a child: torch in this process would raise every later child's peak (see above).
        out = subprocess.run(
            [*command("matmul", 0, Path(tmp), a)], capture_output=True, text=True, check=True
        )
        gflops = float(json.loads(out.stdout.strip().splitlines()[-1])["gflops"])
        text = run_all(a, Path(tmp))
    rows = "every row" if a.eval_sample is None else f"{a.eval_sample:,} rows"
    about = (
        f"One-core fp32 matmul: {gflops:.0f} GFLOP/s (torch, 1024², 1 thread). Hopper-v5 random-recipe "
        f"data ({a.base:,} transitions) tiled to each size; generator training {a.train_steps} steps per "
        f"family (cpu-small presets); evaluate {rows} against the data itself as reference. Each cell: "
        "wall time, peak RSS of the stage's own process (interpreter and imports included)."
    )
    body = f"{textwrap.fill(about, 110)}\n\n{text}"
    print(body)
    if not a.no_write:
        write_section("scale", "Scale: every stage at D4RL sizes", body)


if __name__ == "__main__":
    main()
