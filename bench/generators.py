"""Every generator family on one dataset, judged by the simulator, beside two yardsticks, one run.

For each family (cpu-small preset unless --steps-scale): training time, sampling transitions/s, one-step
dynamics error against MuJoCo (normalised next-observation MSE over restorable rows, reward MAE) and the
open-loop error of its synthetic windows (the simulator replays each window's actions from its first state).
Diffusion families are judged at their default sampler settings and at 20 deterministic Heun steps.
Yardsticks measured in the same run: a linear next-state regression s' = [s, a, 1]·W fitted on the data
(its error on the data itself), and the learned world model. The autoregressive drafter is swept over
draft temperature × refinement settings (sigma_start × K) to pick its defaults by measurement.

    python bench/generators.py --data halfcheetah/medium-replay
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Not the script's folder on the path: bench/generators.py must not shadow the generators package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.fidelity import EvalConfig, evaluate, linear_yardstick
from rlsynth.datasets.types import Dataset
from rlsynth.generators.api import (
    LoadedGenerator,
    SampleOptions,
    load_generator,
    preset,
    train_generator,
)
from rlsynth.generators.diffusion import TrajectoryConfig, TransitionConfig
from rlsynth.offline_rl.synthesis import synthesize
from rlsynth.pipeline.bench_report import (
    Speed,
    chunk_transitions,
    marginal_speed,
    matmul_gflops,
    write_section,
)

# About one whole sampling chunk of every family (AR: 1024 windows ≈ 31.7k transitions; trajectory:
# 4 × 256 windows): smaller requests would time work that the trim then throws away.
N_SAMPLES = 31_000
# 10,000 judged rows: the mean one-step error has heavy tails, and with 3,000 rows two seeds of one
# model differed by 15% (BENCHMARKS.md), too much for the ×-trajectory-error ratios the sweep is read by.
EVAL = EvalConfig(sample=10_000, horizons=(1, 8, 31), windows=128, seed=0)
REPEATS = 3
SMALL = N_SAMPLES // 4
"""The smaller request of the marginal rate (at least one whole chunk of every diffusion family)."""
# A cold request is rounded up to whole chunks (a sample's batch must not depend on how a request is
# split), and one drafter chunk is 1,024 windows: its marginal rate is taken between one and two chunks.
DRAFT_SIZES = (chunk_transitions("autoregressive"), chunk_transitions("autoregressive", 2))
# (temperature, sigma_start, K, polish): K = 0 is the raw draft. Settings never competitive in earlier
# runs (K = 2 at any sigma_start, sigma_start 1.0 with K < 4, K = 4 at sigma_start 0.3 or 1.0: 1.3-1.4x
# the trajectory error; BENCHMARKS.md) were dropped to keep the run short.
SWEEP = [
    (1.0, 0.0, 0, 0),
    (1.0, 0.1, 1, 0),
    (1.0, 0.3, 1, 0),
    (0.7, 0.0, 0, 0),
    (0.7, 0.1, 1, 0),
    (0.7, 0.3, 1, 0),
    (0.5, 0.0, 0, 0),
    (0.5, 0.1, 1, 0),
    (0.5, 0.3, 1, 0),
    # Refinement followed by polish iterations (generators.edm.Polish), against the polished trajectory row.
    (0.5, 0.3, 1, 10),
    (0.5, 0.3, 1, 30),
]


# Diffusion families are judged at two sampler settings, 20 deterministic Heun steps and 40 with churn 40
# (read against the config classes' defaults, so a model reused from an older run samples as a new one).
# (Heun steps, churn, polish iterations): the default ODE, EDM churn, and the ODE + denoise-renoise polish.
SETTINGS = {"ode20": (20, 0.0, 0), "churn40": (40, 40.0, 0), "ode20-polish30": (20, 0.0, 30)}
FAMILY_CFG: dict[str, TransitionConfig | TrajectoryConfig] = {
    "transition": TransitionConfig(),
    "trajectory": TrajectoryConfig(),
}
FAMILY_NAME = {"transition": "transition diffusion (SynthER-style)", "trajectory": "trajectory diffusion"}


def default_key(kind: str) -> str:
    """Row key of ``kind`` sampled at its config's default settings (the AR sweep's yardstick)."""
    cfg = FAMILY_CFG[kind]
    for name, setting in SETTINGS.items():
        if setting == (cfg.sample_steps, cfg.s_churn, cfg.polish):
            return f"{kind}:{name}"
    return f"{kind}:default"


def sampling_rows() -> list[tuple[str, str, SampleOptions, str]]:
    """(row key, generator kind, options, label) of the one-row-per-setting table."""
    out = [("world-model", "world-model", SampleOptions(seed=0, horizon=32), "world model (yardstick), "
            "32-step rollouts")]  # fmt: skip
    for kind, cfg in FAMILY_CFG.items():
        settings, default = dict(SETTINGS), default_key(kind)
        if default.endswith(":default"):
            settings["default"] = (cfg.sample_steps, cfg.s_churn, cfg.polish)
        for name, (steps, churn, polish) in settings.items():
            key = f"{kind}:{name}"
            stochastic = f"churn {churn:g}" if churn else "no churn"
            label = f"{FAMILY_NAME[kind]}, {steps} Heun steps, {stochastic}"
            label += f", polish {polish}" if polish else ""
            label += " (default)" if key == default else ""
            out.append((key, kind, SampleOptions(seed=0, steps=steps, churn=churn, polish=polish), label))
    return out


def timed_sample(
    gen: LoadedGenerator, ds: Dataset, n: int, opts: SampleOptions, small: int = SMALL
) -> tuple[Dataset, Speed]:
    """The samples of ``n`` and the speed at which they come (marginal between ``small`` and ``n``)."""

    def run(m: int) -> Dataset:
        return synthesize(gen, ds, m, opts.settings(), seed=opts.seed, refiner=opts.refiner).dataset

    return marginal_speed(run, small, n, REPEATS)


def judge(synth: Dataset, ds: Dataset) -> dict[str, Any]:
    ref_std = ds.transitions.observations.std(0)
    r = evaluate(synth, reference=ds, config=EVAL)
    return {
        "one_step": r["one_step"]["obs_mse_normalised"],
        "one_step_median": r["one_step"]["obs_mse_normalised_median"],
        "reward_mae": r["one_step"]["reward_mae"],
        "terminal_agreement": r["one_step"]["terminal_agreement"],
        "h8": r["horizons"]["8"]["obs_mse_normalised"],
        "h31": r["horizons"]["31"]["obs_mse_normalised"],
        "novelty": r["novelty"]["mean"],
        "coverage": r["coverage"],
        # Geometric mean over observation dimensions of std(synthetic) / std(data): below 1, the samples
        # are narrower than the data (what a mode-seeking sampler such as polishing costs).
        "spread": float(np.exp(np.mean(np.log(synth.transitions.observations.std(0) / ref_std)))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--catalog", default=None)
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every preset's training steps")
    p.add_argument("--out", default=None, help="keep the trained generators here (default: a temp folder)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse generators trained in --out (their train.json gives the training time)",
    )
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    cat = Catalog(a.catalog)
    ds = cat.read(a.data)
    # The peak every sampler's achieved FLOP/s is a share of: matmul on the threads sampling uses.
    speed_1core, peak = matmul_gflops(), matmul_gflops(torch.get_num_threads())
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="rlsynth-bench-"))
    rows: dict[str, dict[str, Any]] = {}
    gens: dict[str, LoadedGenerator] = {}
    for kind in ("world-model", "transition", "trajectory", "autoregressive"):
        # Scale 1 trains the preset as a user gets it (its fixed step count).
        steps = None
        if a.steps_scale != 1.0:
            steps = max(1, round(preset(kind, "cpu-small")[1].steps * a.steps_scale))
        done = root / kind / "train.json"
        if a.reuse and done.exists():
            prior = json.loads(done.read_text())
            rows[kind] = {"train_s": prior["seconds"], "steps": prior["steps"], "val_loss": prior["val_loss"]}
        else:
            t0 = time.perf_counter()
            res = train_generator(kind, ds, root / kind, steps=steps, seed=0)
            rows[kind] = {"train_s": time.perf_counter() - t0, "steps": res.steps, "val_loss": res.val_loss}
        gens[kind] = load_generator(root / kind, device="cpu")
        # A time-budgeted preset planned its steps on this machine: the table says so.
        rows[kind]["budget_s"] = gens[kind].config["train"].get("budget_s")
    for key, kind, o, label in sampling_rows():
        synth, speed = timed_sample(gens[kind], ds, N_SAMPLES, o)
        rows[key] = {**rows[kind], **speed_of(speed, peak), "label": label, **judge(synth, ds)}
    sweep = []
    for temp, sigma, k, polish in SWEEP:
        o = SampleOptions(
            seed=0,
            sigma_start=sigma,
            steps=k or None,
            refiner=gens["trajectory"],
            temperature=temp,
            polish=polish,
        )
        synth, speed = timed_sample(gens["autoregressive"], ds, DRAFT_SIZES[1], o, small=DRAFT_SIZES[0])
        sweep.append(
            {"temperature": temp, "sigma_start": sigma, "K": k, "polish": polish, **speed_of(speed, peak)}
            | judge(synth, ds)
        )
    lin = linear_yardstick(ds.transitions)
    body = report(a.data, ds, rows, sweep, lin, (speed_1core, peak))
    if a.reuse:
        body += (
            "\n\nGenerators reused from an earlier run of this command (`--reuse`): training columns "
            "are that run's, from each generator's train.json; sampling and errors are this run's."
        )
    print(body)
    (root / "results.json").write_text(json.dumps({"rows": rows, "sweep": sweep, "linear": lin}, indent=2))
    if not a.no_write:
        # One section per dataset name: a run on another environment adds its table beside the others.
        name = a.data.split("@")[0]
        write_section(f"generators {name}", f"Generators on {name}: speed and dynamics error", body)


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def trained(r: dict[str, Any]) -> str:
    """'21000 steps (planned in a 14-min budget), 708 s' or '15000 steps, 320 s'."""
    budget = f" (planned in a {r['budget_s'] / 60:g}-min budget)" if r.get("budget_s") else ""
    return f"{r['steps']} steps{budget}, {r['train_s']:.0f} s"


def speed_of(speed: Speed, peak: float) -> dict[str, float]:
    return {"rate": speed.rate, "gflops": speed.gflops, "peak_share": speed.share(peak)}


def report(
    data: str,
    ds: Dataset,
    rows: dict[str, dict[str, Any]],
    sweep: list[dict[str, Any]],
    lin: float,
    speeds: tuple[float, float],
) -> str:
    traj = rows[default_key("trajectory")]
    lines = [
        f"One-core fp32 matmul {speeds[0]:.0f} GFLOP/s; on the {torch.get_num_threads()} threads sampling "
        f"uses {speeds[1]:.0f} GFLOP/s, the peak of the % columns (achieved network FLOP/s: matrix "
        "products, convolutions and attention as torch's FLOP counter counts them, over wall time).",
        "",
        f"Data `{data}` ({len(ds.transitions):,} transitions, {ds.info.env_id}); cpu-small presets; "
        f"{N_SAMPLES:,} transitions sampled per model (rates: marginal, between requests of {SMALL:,} "
        f"and {N_SAMPLES:,} transitions, medians of {REPEATS} runs each); the simulator "
        f"judges {EVAL.sample:,} of them "
        f"(one-step) and {EVAL.windows} windows per horizon (open-loop). Errors are normalised MSE per "
        "dimension (the data's std). H=31 is the longest horizon a 32-token window holds.",
        "",
        "| model | training | sampling transitions/s | % of peak | one-step MSE | × linear | median row | "
        "reward MAE | H=8 | H=31 | novelty | coverage | spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| linear next-state regression (yardstick, on the data) | least squares | — | — | {lin:.3g} | "
        "1.00× | — | — | — | — | — | — | — |",
    ]
    for r in (v for v in rows.values() if "label" in v):
        name = r["label"]
        lines.append(
            f"| {name} | {trained(r)} | {r['rate']:,.0f} | {r['peak_share']:.0%} | "
            f"{fmt(r['one_step'])} | {r['one_step'] / lin:.2f}× | {fmt(r['one_step_median'])} | "
            f"{fmt(r['reward_mae'])} | {fmt(r['h8'])} | {fmt(r['h31'])} | {fmt(r['novelty'], '.2f')} | "
            f"{fmt(r['coverage'], '.2f')} | {fmt(r['spread'], '.2f')} |"
        )
    ar = rows["autoregressive"]
    lines += [
        "",
        f"Autoregressive drafter ({trained(ar)}) + refinement by the trajectory "
        "model — the sweep that picks the defaults (rows with polish are compared with the polished "
        "trajectory sampler, the others with the unpolished one; marginal rates between requests of "
        f"{DRAFT_SIZES[0]:,} and {DRAFT_SIZES[1]:,} transitions, one and two drafting chunks):",
        "",
        "| temperature | sigma_start | K (Heun) | polish | transitions/s | % of peak | × trajectory "
        "diffusion speed | one-step MSE | × trajectory diffusion error | median row | H=8 | H=31 | coverage "
        "| spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    polished = rows.get("trajectory:ode20-polish30", traj)
    for s in sweep:
        label = "raw drafts" if s["sigma_start"] == 0 else f"{s['sigma_start']}"
        # Unpolished rows are compared with the default sampler, polished ones with the polished sampler.
        ref = polished if s["polish"] else rows.get("trajectory:ode20", traj)
        lines.append(
            f"| {s['temperature']} | {label} | {s['K'] or '—'} | {s['polish'] or '—'} | {s['rate']:,.0f} | "
            f"{s['peak_share']:.0%} | {s['rate'] / ref['rate']:.1f}× | {fmt(s['one_step'])} | "
            f"{s['one_step'] / ref['one_step']:.2f}× | {fmt(s['one_step_median'])} | {fmt(s['h8'])} | "
            f"{fmt(s['h31'])} | {fmt(s['coverage'], '.2f')} | {fmt(s['spread'], '.2f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
