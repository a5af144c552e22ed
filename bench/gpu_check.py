"""GPU path check: train generator presets on CUDA, sample, judge with MuJoCo, and round-trip to the CPU.

Made for the lent GPU machine (see BENCHMARKS.md, "GPU check"): it needs CUDA, MuJoCo and gymnasium, and
the D4RL-layout file it trains on. Jobs run one after another: processes sharing one GPU are time-sliced,
and nine of them at once crawled (an H200 did 20 steps/s of a small MLP). A deadline stops the rest.

    python bench/gpu_check.py --data halfcheetah-medium-replay.hdf5 --jobs trajectory:gpu-paper:11000 \
        --sample 12000 --samplers 20:0,40:40 --seeds 1,2 --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Not the script's folder on the path: bench/ files must not shadow the packages they measure.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

from rlsynth.datasets.fidelity import EvalConfig, evaluate
from rlsynth.datasets.sources import load_source
from rlsynth.datasets.types import Dataset
from rlsynth.generators.api import (
    PRESETS,
    SampleOptions,
    load_generator,
    sample,
    train_generator,
    used_settings,
)
from rlsynth.pipeline.bench_report import int_list


@dataclass(frozen=True)
class Judge:
    """How each trained model is sampled and judged."""

    sample: int
    """Transitions sampled per (sampler, seed)."""
    rows: int
    """Rows the simulator judges one step ahead."""
    samplers: tuple[tuple[int, float], ...]
    """Diffusion samplers (steps, churn); (0, 0) is the model's own."""
    seeds: tuple[int, ...]


def judged(gen: Any, ds: Dataset, judge: Judge, opts: SampleOptions) -> list[dict[str, Any]]:
    """Sampling speed and simulator-judged errors per (sampler, seed)."""
    n, rows = judge.sample, judge.rows
    out = []
    for steps, churn in judge.samplers:
        for seed in judge.seeds:
            o = replace(opts, seed=seed, steps=steps or None, churn=churn if steps else None)
            t0 = time.perf_counter()
            synth = sample(gen, ds, n, o)
            if gen.device.type == "cuda":
                torch.cuda.synchronize()
            rec: dict[str, Any] = {"sampler": used_settings(gen, o), "seed": seed}
            rec["sample_transitions_per_s"] = n / (time.perf_counter() - t0)
            r = evaluate(
                synth, reference=ds, config=EvalConfig(sample=rows, horizons=(1, 8, 31), windows=128)
            )
            one = r["one_step"]
            keys = ("obs_mse_normalised", "obs_mse_normalised_median", "reward_mae", "penetration_over_1cm",
                    "penetration_over_5cm")  # fmt: skip
            rec |= {k: one[k] for k in keys}
            rec |= {f"h{h}": v["obs_mse_normalised"] for h, v in r["horizons"].items()}
            out.append(rec)
    return out


def job(spec: str, ds: Dataset, root: Path, judge: Judge) -> dict[str, Any]:
    """``KIND:PRESET:STEPS`` → training time, sampling speed, simulator-judged errors, GPU→CPU agreement."""
    kind, preset_name, steps = spec.split(":")
    out = root / spec.replace(":", "-")
    t0 = time.perf_counter()
    res = train_generator(kind, ds, out, preset_name=preset_name, steps=int(steps), progress=False)
    rec: dict[str, Any] = {"job": spec, "train_s": time.perf_counter() - t0, "val_loss": res.val_loss}
    gen = load_generator(out)
    rec["device"] = torch.cuda.get_device_name(0) if gen.device.type == "cuda" else "cpu"
    diffusion = kind in ("trajectory", "transition")
    # Samplers (steps, churn) apply to the diffusion families; the others sample their own way.
    j = judge if diffusion else replace(judge, samplers=((0, 0.0),))
    opts = SampleOptions(seed=1, sigma_start=0.0 if kind == "autoregressive" else None)
    rec["judged"] = judged(gen, ds, j, opts)
    if diffusion:
        # The same checkpoint on the CPU follows the same noise: differences are float error, amplified
        # by the ODE (chaotic dynamics), not a different model.
        cpu = load_generator(out, device="cpu")
        a = sample(gen, ds, 200, SampleOptions(seed=3)).transitions.next_observations
        b = sample(cpu, ds, 200, SampleOptions(seed=3)).transitions.next_observations
        n = min(len(a), len(b))
        rec["gpu_cpu_max_abs_diff"] = float(abs(a[:n] - b[:n]).max())
    return rec


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Judge]:
    """Parsed and checked options (a bad one exits 2 with one line before anything trains)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="D4RL-layout HDF5 file (or catalog NAME@N)")
    p.add_argument("--jobs", required=True, help="comma-separated KIND:PRESET:STEPS")
    p.add_argument("--budget", type=float, default=400.0, help="seconds; later jobs are skipped")
    p.add_argument("--sample", type=int, default=6000, help="transitions sampled per (sampler, seed)")
    p.add_argument("--rows", type=int, default=3000, help="rows the simulator judges one step ahead")
    p.add_argument(
        "--samplers",
        default="0:0",
        help="diffusion samplers STEPS:CHURN, comma-separated (0:0: the model's own)",
    )
    p.add_argument("--seeds", default="1", help="sampling seeds, comma-separated")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    for spec in a.jobs.split(","):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
            p.error(f"--jobs: expected KIND:PRESET:STEPS with positive STEPS, got {spec!r}")
        if parts[0] not in PRESETS or parts[1] not in PRESETS[parts[0]]:
            p.error(f"--jobs: {spec!r}: unknown kind or preset (kinds: {', '.join(PRESETS)})")
    samplers = []
    for pair in a.samplers.split(","):
        steps, _, churn = pair.partition(":")
        try:
            sampler = (int(steps), float(churn))
        except ValueError:
            p.error(f"--samplers: expected STEPS:CHURN pairs, got {pair!r}")
        if sampler[0] < 0 or not 0 <= sampler[1] < float("inf"):
            p.error(f"--samplers: {pair!r} needs steps ≥ 0 and a finite churn ≥ 0")
        samplers.append(sampler)
    if a.sample < 1 or a.rows < 1:
        p.error(f"--sample and --rows must be positive, got {a.sample} and {a.rows}")
    return a, Judge(a.sample, a.rows, tuple(samplers), int_list(p, "--seeds", a.seeds))


def main(argv: list[str] | None = None) -> None:
    a, judge = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available on this machine")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_source(a.data)
    deadline = time.time() + a.budget
    rows = []
    for spec in a.jobs.split(","):
        if time.time() > deadline:
            print("skipped (deadline):", spec, flush=True)
            continue
        rows.append(job(spec, ds, Path("/tmp/gpu-check"), judge))
        print(json.dumps(rows[-1]), flush=True)
        (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
