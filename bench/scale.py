"""Every stage at D4RL sizes: wall time and peak memory of each stage at each size, one run.

For each size N, a D4RL-layout HDF5 file of N HalfCheetah-v5 transitions is built locally (a random-recipe
dataset of ``--base`` transitions, tiled: each copy's episodes renumbered, a copy cut mid-episode ends it
truncated), then imported (``datasets import``), verified (``datasets verify``), read into a d3rlpy replay
buffer, used to train each generator family for ``--train-steps`` steps (cpu-small presets), and judged
as ``datasets evaluate --reference`` judges it (against itself: novelty and coverage are on; every row's
one-step error unless ``--eval-sample``). Then ``--sample-n`` transitions (1M) are sampled from the
trajectory model and from the drafter (refined by that trajectory model) and committed, the sampling and
the commit timed apart; a TD3+BC agent trains on the trajectory samples mixed with the real data
(``agent train --mix``); and one PGD round (``agent pgd``, guided by that agent) regenerates
``--sample-n`` transitions and trains on them. Each stage runs in a process of its own, so stages never share
a peak; its wall time and peak RSS (the child's ru_maxrss, from wait4) are reported. Linux carries a
process's peak across exec, so the parent imports nothing heavy: a child's figure starts from the
parent's few tens of MB, not from torch's.

Why HalfCheetah: it never terminates, so every sampled window yields its H transitions. On random Hopper
data (episodes of about 20 steps) the 300-step models' terminal flags cut windows after about 2
transitions, and sampling 1M would take over an hour: that measures the model, not the scale.

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

ENV = "HalfCheetah-v5"
KINDS = ("trajectory", "transition", "autoregressive", "world-model")
SAMPLED = ("trajectory", "autoregressive")
"""Families whose samples are drawn at ``--sample-n`` (the drafter is refined by the trajectory model)."""
AGENT_ROWS = 16
"""Real rows in every agent batch of the mixed and PGD stages (the rest synthetic, as the PGD loop)."""
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
        *[Stage(f"sample-{k}", f"sample {k} (then commit)") for k in SAMPLED if k in kinds],
        *(
            [Stage("agent-mix", "TD3+BC on trajectory samples + real (`agent train --mix`)")]
            if "trajectory" in kinds
            else []
        ),
        *(
            [Stage("pgd-round", "one PGD round (`agent pgd`: sample, commit, train)")]
            if "trajectory" in kinds
            else []
        ),
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
        write_hdf5(tiled(base, n), work / f"data-{n}.hdf5")
    elif stage == "read":
        from rlsynth.offline_rl.buffers import to_replay_buffer

        buffer = to_replay_buffer(Catalog(str(work / "catalog")).read(f"{name_of(n)}@1"))
        assert buffer.transition_count == n, buffer.transition_count
    elif stage.startswith("train-"):
        from rlsynth.generators.api import train_generator

        ds = Catalog(str(work / "catalog")).read(f"{name_of(n)}@1")
        kind = stage.removeprefix("train-")
        train_generator(kind, ds, work / f"gen-{kind}-{n}", steps=a.train_steps, seed=0, progress=False)
    elif stage.startswith("sample-"):
        sample_stage(stage.removeprefix("sample-"), n, work, a)
    else:
        raise SystemExit(f"unknown stage {stage!r}")


def sample_stage(kind: str, n: int, work: Path, a: argparse.Namespace) -> None:
    """Sample ``--sample-n`` transitions as ``generator sample`` does (each chunk handed to the open
    commit as it is made: parts are written while sampling goes on) and commit them, printing the
    sampling and commit seconds apart (the commit target is a share of the sampling time)."""
    from rlsynth.datasets.catalog import Catalog
    from rlsynth.generators.api import draw_chunks, load_generator
    from rlsynth.generators.options import SamplerSettings
    from rlsynth.offline_rl.synthesis import plan_synthesis

    cat = Catalog(str(work / "catalog"))
    source = cat.read(f"{name_of(n)}@1")
    gen = load_generator(work / f"gen-{kind}-{n}")
    refiner = load_generator(work / f"gen-trajectory-{n}") if kind == "autoregressive" else None
    t0 = time.perf_counter()
    plan = plan_synthesis(gen, source, a.sample_n, SamplerSettings(polish=a.sample_polish), refiner=refiner)
    # SynthesisPlan.write's steps, timed apart: the loop samples and writes full parts meanwhile, the
    # commit writes what is left, waits for the parts in flight and publishes.
    with cat.stream(synth_name(kind, n), gen.info) as out:
        for chunk in draw_chunks(gen, source, a.sample_n, plan.opts, warm=plan.warm):
            out.add(chunk.transitions)
        t1 = time.perf_counter()
        ref = out.commit(lineage=plan.lineage)
    t2 = time.perf_counter()
    rows = cat.manifest(ref)["counts"]["transitions"]
    print(json.dumps({"sample_s": t1 - t0, "commit_s": t2 - t1, "rows": rows}))


def synth_name(kind: str, n: int) -> str:
    return f"scale/synth-{kind}-n{n}"


def command(stage: str, n: int, work: Path, a: argparse.Namespace) -> list[str]:
    """The command line of one stage: the CLI itself where a command does the stage, else this script."""
    cat = ["--catalog", str(work / "catalog")]
    ref = f"{name_of(n)}@1"
    if stage == "import":
        return [*CLI, "datasets", "import", str(work / f"data-{n}.hdf5"), "--name", name_of(n), *cat]
    if stage == "verify":
        return [*CLI, "datasets", "verify", ref, *cat]
    if stage == "evaluate":
        sample = [] if a.eval_sample is None else ["--sample", str(a.eval_sample)]
        plot = ["--plot", str(work / f"fidelity-{n}.png")]
        return [*CLI, "datasets", "evaluate", ref, "--reference", ref, "--no-store", *plot, *sample, *cat]
    agent = ["--algo", "td3bc", "--seed", "0", "--quiet"]
    if stage == "agent-mix":
        mix = ["--data", f"{synth_name('trajectory', n)}@1", "--mix", f"{ref}:{AGENT_ROWS}"]
        steps = ["--steps", str(a.agent_steps)]
        return [*CLI, "agent", "train", *agent, *mix, *steps, "--out", str(work / f"agent-{n}.d3"), *cat]
    if stage == "pgd-round":
        gen = [
            "--generator",
            str(work / f"gen-trajectory-{n}"),
            "--initial-target",
            str(work / f"agent-{n}.d3"),
        ]
        one = ["--agent-steps", str(a.agent_steps), "--regenerate-every", str(a.agent_steps)]
        synth = ["--transitions", str(a.sample_n), "--polish", str(a.sample_polish)]
        out = ["--name", f"scale/pgd-n{n}", "--out", str(work / f"pgd-{n}")]
        return [*CLI, "agent", "pgd", *gen, "--data", ref, *agent, *one, *synth, *out, *cat]
    child = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--size", str(n)]
    knobs = ["--base", str(a.base), "--train-steps", str(a.train_steps), "--sample-n", str(a.sample_n)]
    return [*child, "--work", str(work), *knobs, "--sample-polish", str(a.sample_polish)]


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
    p.add_argument("--sample-n", type=int, default=1_000_000, help="Transitions sampled per sampling stage.")
    p.add_argument(
        "--sample-polish",
        type=int,
        default=0,
        help="Polish iterations of the sampling stages (0: off; memory and scaling do not depend on it).",
    )
    p.add_argument("--agent-steps", type=int, default=500, help="Agent steps of the mixed and PGD stages.")
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
    if a.sample_n < 1 or a.agent_steps < 1 or a.sample_polish < 0:
        p.error("--sample-n and --agent-steps must be positive, --sample-polish not negative")
    if a.eval_sample is not None and a.eval_sample < 1:
        p.error("--eval-sample must be positive")
    return a


def commit_table(split: dict[tuple[str, int], dict[str, float]], sizes: Sequence[int]) -> str:
    """Sampling and commit seconds of each sampling stage (the target: commit ≤ 10% of sampling). Parts
    are written while sampling goes on, so the sampling column holds their writing too."""
    if not split:
        return ""
    lines = [
        "| sampled | N | rows | sampling (parts written meanwhile) | commit after the last chunk "
        "| commit / sampling | both |",
        "|---|---|---|---|---|---|---|",
    ]
    for (key, n), d in sorted(split.items(), key=lambda kv: (kv[0][0], sizes.index(kv[0][1]))):
        share = d["commit_s"] / d["sample_s"]
        lines.append(
            f"| {key.removeprefix('sample-')} | {short(n)} | {int(d['rows']):,} | {d['sample_s']:.1f} s "
            f"| {d['commit_s']:.2f} s | {share:.1%} | {d['sample_s'] + d['commit_s']:.1f} s |"
        )
    return "\n".join(lines)


def last_json(log: Path) -> dict[str, float] | None:
    """The last JSON object a stage printed (the sampling stages' split), if any."""
    for line in reversed(log.read_text().strip().splitlines()):
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except ValueError:
                return None
    return None


def run_all(a: argparse.Namespace, work: Path) -> str:
    plan = stages(a.kind_list)
    results: dict[tuple[str, int], Measured] = {}
    split: dict[tuple[str, int], dict[str, float]] = {}
    for n in a.size_list:
        for s in plan:
            m = measure(command(s.key, n, work, a), work / f"{s.key}-{n}.log")
            results[s.key, n] = m
            print(json.dumps({"stage": s.key, "size": n, "seconds": m.seconds, "peak_bytes": m.peak_bytes,
                              "exit": m.exit_code}), flush=True)  # fmt: skip
            if m.exit_code != 0:
                tail = (work / f"{s.key}-{n}.log").read_text().strip().splitlines()[-3:]
                print(f"  {s.key} failed: {' / '.join(tail)}", file=sys.stderr, flush=True)
            elif s.key.startswith("sample-") and (d := last_json(work / f"{s.key}-{n}.log")):
                split[s.key, n] = d
    parts = [table(results, plan, a.size_list), commit_table(split, a.size_list)]
    return "\n\n".join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    if a.stage is not None:
        run_stage(a.stage, a.size, Path(a.work), a)
        return
    if a.work is not None:
        Path(a.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        # Measured in a child: torch in this process would raise every later child's peak (see above).
        out = subprocess.run(
            [*command("matmul", 0, Path(tmp), a)], capture_output=True, text=True, check=True
        )
        gflops = float(json.loads(out.stdout.strip().splitlines()[-1])["gflops"])
        text = run_all(a, Path(tmp))
    rows = "every row" if a.eval_sample is None else f"{a.eval_sample:,} rows"
    about = (
        f"One-core fp32 matmul: {gflops:.0f} GFLOP/s (torch, 1024², 1 thread). {ENV} random-recipe "
        f"data ({a.base:,} transitions) tiled to each size; generator training {a.train_steps} steps per "
        f"family (cpu-small presets); evaluate {rows} against the data itself as reference; "
        f"{a.sample_n:,} transitions per sampling stage and per PGD round (polish {a.sample_polish}); "
        f"{a.agent_steps} TD3+BC steps in the mixed and PGD stages ({AGENT_ROWS} real rows per batch in the "
        "mix). Each cell: wall time, peak RSS of the stage's own process (interpreter and imports included)."
    )
    body = f"{textwrap.fill(about, 110)}\n\n{text}"
    print(body)
    if not a.no_write:
        write_section("scale", "Scale: every stage at D4RL sizes", body)


if __name__ == "__main__":
    main()
