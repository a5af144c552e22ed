"""Policy guidance: target likelihood of synthetic actions vs their dynamics error, one run.

For each target agent (an IQL agent trained on the data — a learned Gaussian, the headline — and a
TD3+BC agent, deterministic, read as N(μ(s), 0.1²)) the trajectory-diffusion model samples the same
seeds unguided, with policy guidance at three scales, and with policy + dynamics guidance (the world
model's ensemble). Reported per condition: the target's log-likelihood of the synthetic actions per action
dimension, the mean squared distance of the actions to the target's mean action, and the one-step
dynamics error against MuJoCo (normalised next-observation MSE; mean and median, since the mean is
heavy-tailed), all relative to unguided sampling.

    python bench/guidance.py --data halfcheetah/medium-replay@1 --agent iql.d3 --td3bc td3bc.d3 \\
        --generator GEN_DIR --world-model WM_DIR

Missing agents / models are trained first (IQL 20k steps, TD3+BC 10k, cpu-small generators).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Not the script's folder on the path: bench/ files must not shadow the packages they measure.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.fidelity import EvalConfig, evaluate
from rlsynth.datasets.types import Dataset
from rlsynth.generators.api import (
    SampleOptions,
    load_generator,
    record_refiner,
    train_generator,
    used_settings,
)
from rlsynth.generators.options import SamplerSettings
from rlsynth.guidance.policies import D3rlpyPolicy, load_policy
from rlsynth.guidance.spec import GuidanceConfig
from rlsynth.offline_rl.synthesis import synthesize
from rlsynth.offline_rl.train import train_agent
from rlsynth.pipeline.bench_report import chunk_transitions, marginal_speed, matmul_gflops, write_section

SMALL = chunk_transitions("trajectory")
"""The smaller request of the marginal rate: one trajectory chunk."""
N = chunk_transitions("trajectory", 4)
"""The larger request, and the samples judged."""
DRAFT_SIZES = (chunk_transitions("autoregressive"), chunk_transitions("autoregressive", 2))
"""The drafter's two requests: one and two drafting chunks."""
REPEATS = 3
EVAL = EvalConfig(sample=4000, horizons=(8,), windows=128, seed=0)
PLOTS = Path(__file__).resolve().parent / "plots"


def plot_path(name: str) -> Path:
    """The plot of dataset ``name`` (without its version): one per name, so each table keeps its own."""
    return PLOTS / f"guidance-{name.replace('/', '-')}.png"


def action_scores(pol: D3rlpyPolicy, ds: Dataset) -> dict[str, float]:
    t = ds.transitions
    obs, act = torch.from_numpy(np.array(t.observations)), torch.from_numpy(np.array(t.actions))
    with torch.no_grad():
        ll = pol.log_prob(obs, act) / act.shape[1]
        dist = ((act - pol.mean_action(obs)) ** 2).sum(1)
    return {"ll": float(ll.mean()), "dist": float(dist.mean())}


def judge(synth: Dataset, ref: Dataset) -> dict[str, float]:
    r = evaluate(synth, reference=ref, config=EVAL)["one_step"]
    return {"dyn": r["obs_mse_normalised"], "dyn_median": r["obs_mse_normalised_median"]}


def conditions(
    scales: list[float], dyn_scale: float, combo_scale: float
) -> list[tuple[str, GuidanceConfig, float | None]]:
    out: list[tuple[str, GuidanceConfig, float | None]] = [("unguided", GuidanceConfig(), None)]
    out += [(f"policy c={s:g}", GuidanceConfig(terms=("policy",), scale=s), None) for s in scales]
    out.append(
        (
            f"policy c={combo_scale:g} + dynamics d={dyn_scale:g}",
            GuidanceConfig(terms=("policy", "dynamics"), scale=combo_scale, dynamics_scale=dyn_scale),
            None,
        )
    )
    return out


def draft_conditions(scales: list[float]) -> list[tuple[str, GuidanceConfig, float | None]]:
    """Drafter rows: (label, guidance, sigma_start; None = the model's refinement)."""
    out: list[tuple[str, GuidanceConfig, float | None]] = [("unguided", GuidanceConfig(), None)]
    out += [(f"policy c={s:g}", GuidanceConfig(terms=("policy",), scale=s), None) for s in scales]
    out.append(("raw drafts, unguided", GuidanceConfig(), 0.0))
    top = max(scales)
    out.append((f"raw drafts, policy c={top:g}", GuidanceConfig(terms=("policy",), scale=top), 0.0))
    return out


def run_target(
    name: str,
    agent: Path,
    gen_dir: Path,
    wm_dir: Path,
    ds: Dataset,
    conds: list[tuple[str, GuidanceConfig, float | None]],
    peak: float,
    refiner: Path | None = None,
) -> list[dict[str, Any]]:
    gen = load_generator(gen_dir, device="cpu")
    ref = load_generator(refiner, device="cpu") if refiner is not None else None
    pol = load_policy(agent)
    rows: list[dict[str, Any]] = [
        {"target": name, "condition": "real data", **action_scores(pol, ds), **judge(ds, ds), "rate": None}
    ]
    for label, cfg, sigma_start in conds:
        cfg = replace(cfg, policy=str(agent) if "policy" in cfg.terms else None, world_model=str(wm_dir))
        settings = SamplerSettings(sigma_start=sigma_start)
        guide = cfg if cfg.terms else None

        def run(
            m: int, settings: SamplerSettings = settings, guide: GuidanceConfig | None = guide
        ) -> Dataset:
            return synthesize(gen, ds, m, settings, guide, seed=0, refiner=ref).dataset

        small, n = (SMALL, N) if ref is None else DRAFT_SIZES
        synth, speed = marginal_speed(run, small, n, REPEATS)
        row = {
            "target": name,
            "condition": label,
            **action_scores(pol, synth),
            **judge(synth, ds),
            "rate": speed.rate,
            "peak_share": speed.share(peak),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def ensure_agent(path: Path, algo: str, steps: int, ds: Dataset, ref: str) -> Path:
    if not path.exists():
        train_agent(algo, ds, path, steps=steps, seed=0, lineage={"ref": ref})
    return path


def ensure_generator(folder: Path, kind: str, ds: Dataset) -> Path:
    if not (folder / "train.json").exists():
        train_generator(kind, ds, folder, seed=0)
    return folder


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    base = next(r for r in rows if r["condition"] == "unguided")
    met = [
        r
        for r in rows
        if r["condition"].startswith("policy")
        and r["ll"] - base["ll"] >= 1.0
        and r["dist"] <= 0.5 * base["dist"]
        and r["dyn"] <= 1.25 * base["dyn"]
    ]
    lines = [
        "met by: "
        + (", ".join(r["condition"] for r in met) if met else "no condition")
        + " (≥ +1 nat per action dimension, ≤ 0.5× distance to the target mean, ≤ 1.25× dynamics error)"
    ]
    combo = next((r for r in rows if "dynamics" in r["condition"]), None)
    if combo is None:
        return lines
    alone = [r for r in rows if r["condition"].startswith("policy") and "dynamics" not in r["condition"]]
    peer = [r for r in alone if r["ll"] <= combo["ll"] + 1e-9]
    if peer:
        best = max(peer, key=lambda r: r["ll"])
        better = combo["dyn"] < best["dyn"]
        lines.append(
            f"policy + dynamics: log-likelihood {combo['ll']:.2f} at dynamics error {combo['dyn']:.3g}; "
            f"policy alone at ≤ that likelihood ({best['condition']}, {best['ll']:.2f}) has "
            f"{best['dyn']:.3g} — {'lower' if better else 'not lower'} with dynamics guidance"
        )
    return lines


def table(rows: list[dict[str, Any]]) -> list[str]:
    base = next(r for r in rows if r["condition"] == "unguided")
    out = [
        "| condition | log π per action dim | Δ vs unguided | ‖a − μ(s)‖² | × unguided | one-step dyn MSE "
        "| × unguided | median dyn MSE | transitions/s | % of peak | cost × unguided |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = "— | — | —"
        if r["rate"] is not None:
            rate = f"{r['rate']:,.0f} | {r['peak_share']:.0%} | {base['rate'] / r['rate']:.2f}×"
        out.append(
            f"| {r['condition']} | {r['ll']:.2f} | {r['ll'] - base['ll']:+.2f} | {r['dist']:.3f} | "
            f"{r['dist'] / base['dist']:.2f} | {r['dyn']:.3g} | {r['dyn'] / base['dyn']:.2f} | "
            f"{r['dyn_median']:.3g} | {rate} |"
        )
    return out


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items(), strict=True):
        for r in rows:
            ax.scatter(r["dyn"], r["ll"], label=r["condition"])
        ax.set_xlabel("one-step dynamics MSE vs MuJoCo (normalised)")
        ax.set_ylabel("target log π per action dimension")
        ax.set_title(f"target: {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--catalog", default=None)
    p.add_argument("--agent", required=True, help="IQL target (.d3); trained on --data if missing")
    p.add_argument("--td3bc", default=None, help="TD3+BC target (.d3); trained on --data if missing")
    p.add_argument("--generator", required=True, help="trajectory generator folder (trained if empty)")
    p.add_argument("--world-model", required=True, help="world-model folder (trained if empty)")
    p.add_argument("--scales", default="0.02,0.05,0.1")
    p.add_argument("--dynamics-scale", type=float, default=0.05)
    p.add_argument(
        "--combo-scale", type=float, default=None, help="policy scale with dynamics (default: max)"
    )
    p.add_argument(
        "--drafter",
        default=None,
        help="autoregressive generator folder (trained if empty); its drafts are refined by --generator",
    )
    p.add_argument("--draft-scales", default="1,3", help="policy scales of the guided drafts")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    ds = Catalog(a.catalog).read(a.data)
    scales = [float(s) for s in a.scales.split(",")]
    conds = conditions(scales, a.dynamics_scale, a.combo_scale or max(scales))
    gen = ensure_generator(Path(a.generator), "trajectory", ds)
    wm = ensure_generator(Path(a.world_model), "world-model", ds)
    drafter = None
    if a.drafter:
        drafter = ensure_generator(Path(a.drafter), "autoregressive", ds)
        record_refiner(drafter, gen)  # so later stages (bench/downstream.py) refine with the same model
    targets = {"IQL": ensure_agent(Path(a.agent), "iql", 20_000, ds, a.data)}
    if a.td3bc:
        targets["TD3+BC (σ 0.1)"] = ensure_agent(Path(a.td3bc), "td3bc", 10_000, ds, a.data)
    speed_1core, peak = matmul_gflops(), matmul_gflops(torch.get_num_threads())
    results = {name: run_target(name, path, gen, wm, ds, conds, peak) for name, path in targets.items()}
    drafts: dict[str, list[dict[str, Any]]] = {}
    if drafter is not None:
        dconds = draft_conditions([float(s) for s in a.draft_scales.split(",")])
        drafts = {
            n: run_target(n, path, drafter, wm, ds, dconds, peak, refiner=gen) for n, path in targets.items()
        }
    data_name = a.data.split("@")[0]
    png = plot_path(data_name)
    plot({n: rows + [{**r, "condition": f"AR {r['condition']}"} for r in drafts.get(n, [])[1:]]
          for n, rows in results.items()}, png)  # fmt: skip
    used = used_settings(load_generator(gen, device="cpu"), SampleOptions())
    sampler = f"{used['steps']} Heun steps, churn {used['churn']:g}, polish {used['polish']}"
    body = [
        f"One-core fp32 matmul {speed_1core:.0f} GFLOP/s; on the {torch.get_num_threads()} threads sampling "
        f"uses {peak:.0f} GFLOP/s, the peak of the % column (achieved network FLOP/s: products, "
        "convolutions and attention as torch's FLOP counter counts them, over wall time). Rates are "
        f"marginal, between requests of {SMALL:,} and {N:,} transitions (drafts: {DRAFT_SIZES[0]:,} and "
        f"{DRAFT_SIZES[1]:,}, one and two drafting chunks; medians of {REPEATS} runs each); "
        "cost × unguided is the unguided rate over the row's.",
        "",
        f"Data `{a.data}` ({len(ds.transitions):,} transitions, {ds.info.env_id}); trajectory diffusion "
        f"(`{a.generator}`, {sampler}), {N:,} transitions per condition from the same seeds; "
        f"the simulator judges {EVAL.sample:,} rows. Guidance: pgd schedule, gradients at the x0 estimate, "
        f"raw (un-normalised) gradients. Plot: `bench/plots/{png.name}`.",
    ]
    for name, rows in results.items():
        body += ["", f"Target **{name}**:", "", *table(rows), "", *[f"- {v}" for v in verdict(rows)]]
        if name in drafts:
            d = load_generator(drafter, device="cpu") if drafter else None
            settings = used_settings(d, SampleOptions()) if d else {}
            body += [
                "",
                f"Target **{name}**, autoregressive drafts (`{a.drafter}`, temperature "
                f"{settings.get('temperature')}, refined from σ {settings.get('sigma_start')} by "
                f"{settings.get('steps')} step(s) of the trajectory model above; guidance tilts each drafted "
                "token, so its scales are not the diffusion rows'):",
                "",
                *table(drafts[name]),
                "",
                *[f"- {v}" for v in verdict(drafts[name])],
            ]
    body += ["", f"![guidance: target likelihood against dynamics error](bench/plots/{png.name})"]
    text = "\n".join(body)
    print(text)
    if not a.no_write:
        write_section(
            f"guidance {data_name}",
            f"Guidance on {data_name}: target likelihood against dynamics error",
            text,
        )


if __name__ == "__main__":
    main()
