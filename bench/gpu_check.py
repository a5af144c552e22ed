"""GPU path check: train generator presets on CUDA, sample, judge with MuJoCo, and round-trip to the CPU.

Made for the lent GPU machine (see BENCHMARKS.md, "GPU check"): it needs CUDA, MuJoCo and gymnasium, and
the D4RL-layout file it trains on. Jobs run one after another: processes sharing one GPU are time-sliced,
and nine of them at once crawled (an H200 did 20 steps/s of a small MLP). A deadline stops the rest.

    python bench/gpu_check.py --data halfcheetah-medium-replay.hdf5 --jobs trajectory:gpu-paper:3000 --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Not the script's folder on the path: bench/ files must not shadow the packages they measure.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

from datasets.fidelity import EvalConfig, evaluate
from datasets.sources import load_source
from datasets.types import Dataset
from generators.api import SampleOptions, load_generator, sample, train_generator


def job(spec: str, ds: Dataset, root: Path) -> dict[str, Any]:
    """``KIND:PRESET:STEPS`` → training time, sampling speed, simulator-judged errors, GPU→CPU agreement."""
    kind, preset_name, steps = spec.split(":")
    out = root / spec.replace(":", "-")
    t0 = time.perf_counter()
    res = train_generator(kind, ds, out, preset_name=preset_name, steps=int(steps), progress=False)
    rec: dict[str, Any] = {"job": spec, "train_s": time.perf_counter() - t0, "val_loss": res.val_loss}
    gen = load_generator(out)
    rec["device"] = torch.cuda.get_device_name(0) if gen.device.type == "cuda" else "cpu"
    opts = SampleOptions(seed=1, sigma_start=0.0 if kind == "autoregressive" else None)
    t0 = time.perf_counter()
    synth = sample(gen, ds, 6000, opts)
    rec["sample_transitions_per_s"] = 6000 / (time.perf_counter() - t0)
    judge = EvalConfig(sample=3000, horizons=(1, 8, 31), windows=128, seed=0)
    r = evaluate(synth, reference=ds, config=judge)
    one = r["one_step"]
    rec |= {k: one[k] for k in ("obs_mse_normalised", "obs_mse_normalised_median", "reward_mae")}
    rec |= {f"h{h}": v["obs_mse_normalised"] for h, v in r["horizons"].items()}
    if kind in ("trajectory", "transition"):
        # The same checkpoint on the CPU follows the same noise: differences are float error, amplified
        # by the ODE (chaotic dynamics), not a different model.
        cpu = load_generator(out, device="cpu")
        a = sample(gen, ds, 200, SampleOptions(seed=3)).transitions.next_observations
        b = sample(cpu, ds, 200, SampleOptions(seed=3)).transitions.next_observations
        n = min(len(a), len(b))
        rec["gpu_cpu_max_abs_diff"] = float(abs(a[:n] - b[:n]).max())
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="D4RL-layout HDF5 file (or catalog NAME@N)")
    p.add_argument("--jobs", required=True, help="comma-separated KIND:PRESET:STEPS")
    p.add_argument("--budget", type=float, default=400.0, help="seconds; later jobs are skipped")
    p.add_argument("--out", required=True)
    a = p.parse_args()
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
        rows.append(job(spec, ds, Path("/tmp/gpu-check")))
        print(json.dumps(rows[-1]), flush=True)
        (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
