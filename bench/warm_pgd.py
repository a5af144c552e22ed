"""Cold against warm-started PGD loops: sampling cost per round, final scores, and per-round fidelity.

Both loops train the same algorithm for the same agent steps with the same generator and seeds; round 0
is identical (unguided, from noise). From round 1 on the cold loop samples every set from noise, as
policy-guided diffusion does; the warm loop starts from the last round's samples noised to σ_start
(chosen in round 1 by the guided sampler's measured contraction, :mod:`generators.warm`). Per round:
sampling seconds, the one-step dynamics error against MuJoCo, the round's target agent's mean
log-likelihood of the synthetic actions (per action dimension), and the spread (geometric mean over
observation dimensions of synthetic std / real std). Final scores: D4RL-normalised returns, mean and 95%
interval (t, n − 1 degrees of freedom) over seeds.

    python bench/warm_pgd.py --data halfcheetah/medium-replay@1 --catalog CAT --generator GEN_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Not the script's folder on the path: bench/ files must not shadow the packages they measure.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rlsynth.datasets.agents import load_agent
from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.fidelity import EvalConfig, evaluate, policy_log_likelihood
from rlsynth.datasets.types import Dataset
from rlsynth.generators.api import load_generator
from rlsynth.generators.options import Regeneration
from rlsynth.generators.warm import spread
from rlsynth.guidance.policies import load_policy
from rlsynth.offline_rl.evaluate import evaluate_agent
from rlsynth.offline_rl.pgd import PGDConfig, PGDResult, run_pgd
from rlsynth.offline_rl.train import ALGOS
from rlsynth.pipeline.bench_report import int_list, matmul_gflops, write_section

PLOT = Path(__file__).resolve().parent / "plots" / "warm_pgd.png"
EVAL = EvalConfig(sample=2000, horizons=(), seed=0)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--catalog", default=None)
    p.add_argument("--generator", required=True, help="trajectory or transition diffusion generator folder")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--regen", type=int, default=500, help="agent steps per round")
    p.add_argument("--transitions", type=int, default=10_000, help="synthetic transitions per round")
    p.add_argument("--algos", default="td3bc,iql")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--final-episodes", type=int, default=5)
    p.add_argument("--warm-z", type=float, default=Regeneration().warm_z)
    p.add_argument("--warm-polish", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument(
        "--report-only", action="store_true", help="re-render the table and plot from OUT/results.json"
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="GEN_DIR=OUT_DIR",
        help="with --report-only: also the results of another generator's run (repeatable); intervals are "
        "then over every generator and agent seed",
    )
    a = p.parse_args(argv)
    a.seed_list = int_list(p, "--seeds", a.seeds)
    a.algo_list = tuple(a.algos.split(","))
    for algo in a.algo_list:
        if algo not in ALGOS:
            p.error(f"--algos: unknown algorithm {algo!r} (algorithms: {', '.join(ALGOS)})")
    for flag in ("rounds", "regen", "transitions", "final_episodes"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if a.rounds < 2:
        p.error("--rounds must be at least 2 (round 0 is the same in both loops)")
    return a


def target_ll(agent: str | None, synth: Dataset) -> float | None:
    if agent is None:
        return None
    rows = np.arange(synth.n_transitions)
    return policy_log_likelihood(load_policy(agent), synth.transitions, rows)["per_action_dim"]


def round_rows(res: PGDResult, cat: Catalog, real: Dataset) -> list[dict[str, Any]]:
    rows = []
    for r in res.rounds:
        synth = cat.read(r.version)
        dyn = evaluate(synth, reference=real, config=EVAL)["one_step"]["obs_mse_normalised"]
        warm = cat.manifest(r.version)["lineage"]["sampling"]["warm_start"]
        rows.append(
            {
                **asdict(r),
                "dyn": dyn,
                "target_ll": target_ll(r.agent, synth),
                "spread": spread(synth.transitions.observations, real.transitions.observations.std(0)),
                "chosen": None if warm is None else warm["chosen"],
                "warm_steps": None if warm is None else warm["steps"],
            }
        )
    return rows


def run_loop(
    a: argparse.Namespace, mode: str, algo: str, seed: int, gen: Any, real: Dataset
) -> dict[str, Any]:
    cat = Catalog(a.catalog)
    regen = (
        Regeneration(regenerate="warm", warm_z=a.warm_z, warm_polish=a.warm_polish)
        if mode == "warm"
        else Regeneration()
    )
    cfg = PGDConfig(
        algo=algo,
        steps=a.rounds * a.regen,
        regenerate_every=a.regen,
        synthetic_transitions=a.transitions,
        regeneration=regen,
        seed=seed,
    )
    out = a.out / f"{mode}-{algo}-s{seed}"
    name = f"bench/warm-pgd-{a.stamp}/{mode}-{algo}-s{seed}"
    tic = time.perf_counter()
    res = run_pgd(cfg, gen, real, cat, name, out, progress=False)
    wall = time.perf_counter() - tic
    final = evaluate_agent(load_agent(res.agent), str(real.info.env_id), episodes=a.final_episodes, seed=seed)
    return {
        "mode": mode,
        "algo": algo,
        "seed": seed,
        "wall_s": wall,
        "generator": a.generator,
        "score": final.score_mean if final.score_mean is not None else final.return_mean,
        "rounds": round_rows(res, cat, real),
    }


def generators(results: list[dict[str, Any]]) -> list[str]:
    """Each generator of the results, as its folder name and checkpoint hash."""
    names = []
    for g in sorted({r["generator"] for r in results}):
        names.append(f"`{Path(g).name}` ({load_generator(g, device='cpu').checkpoint_hash[:19]})")
    return names


def tagged(results: list[dict[str, Any]], generator: str) -> list[dict[str, Any]]:
    """Results of one run with the generator they were measured on (runs before the key was written)."""
    return [{"generator": generator, **r} for r in results]


def interval(xs: list[float]) -> tuple[float, float]:
    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, float("nan")
    return m, T_975.get(len(xs) - 1, 1.96) * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


def _after_choice(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds after the last one that ran pilots (a round whose pilots found nothing is cold, and the
    next one tries again), or of a cold loop the rounds from round 3 on: what a round costs once the
    loop has settled."""
    piloted = [i for i, x in enumerate(rounds) if x["chosen"] is not None]
    return rounds[(piloted[-1] if piloted else 2) + 1 :]


def summary(results: list[dict[str, Any]], a: argparse.Namespace) -> list[str]:
    lines = [
        "| loop | algorithm | final score (mean ± 95% CI) | per-seed scores | sampling s/round once "
        "settled | × cold | pilot round s | warm settings (σ_start, steps, polish) | one-step MSE, round 1 "
        "→ last | target log-lik, round 1 → last | spread, round 1 → last |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cold_cost: dict[str, float] = {}
    for mode in ("cold", "warm"):
        for algo in a.algo_list:
            runs = [r for r in results if r["mode"] == mode and r["algo"] == algo]
            if not runs:
                continue
            m, h = interval([r["score"] for r in runs])
            cost = float(np.mean([x["sample_seconds"] for r in runs for x in _after_choice(r["rounds"])]))
            pilots = [x["sample_seconds"] for r in runs for x in r["rounds"] if x["chosen"] is not None]
            settings = sorted({
                (x["sigma_start"], x["warm_steps"], _picked_polish(x["chosen"]))
                for r in runs for x in r["rounds"] if x["chosen"] is not None and x["sigma_start"] is not None
            })  # fmt: skip
            if mode == "cold":
                cold_cost[algo] = cost
            ratio = f"{cold_cost[algo] / cost:.2f}×" if mode == "warm" and algo in cold_cost else "1×"

            def first_last(key: str, rs: list[dict[str, Any]] = runs) -> str:
                f = np.mean([r["rounds"][1][key] for r in rs])
                last = np.mean([r["rounds"][-1][key] for r in rs])
                return f"{f:.3g} → {last:.3g}"

            scores = ", ".join(f"{r['score']:.1f}" for r in runs)
            if len({r["generator"] for r in runs}) > 1:
                by_gen = [
                    np.mean([r["score"] for r in runs if r["generator"] == g])
                    for g in sorted({r["generator"] for r in runs})
                ]
                scores += " (generator means " + ", ".join(f"{x:.1f}" for x in by_gen) + ")"
            pilot = f"{np.mean(pilots):.1f}" if pilots else "—"
            how = "; ".join(f"{sg:g}, {k}, {p}" for sg, k, p in settings) if settings else "—"
            lines.append(
                f"| {mode} | {algo} | {m:.1f} ± {h:.1f} | {scores} | {cost:.2f} | {ratio} | {pilot} | "
                f"{how} | {first_last('dyn')} | {first_last('target_ll')} | {first_last('spread')} |"
            )
    return lines


def _picked_polish(chosen: dict[str, Any]) -> int:
    return int(min((g for g in chosen["rungs"] if g["passed"]), key=lambda g: g["cost"])["polish"])


def plot(results: list[dict[str, Any]], a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for mode, colour in (("cold", "tab:blue"), ("warm", "tab:orange")):
        runs = [r for r in results if r["mode"] == mode]
        if not runs:
            continue
        rounds = np.arange(len(runs[0]["rounds"]))
        for ax, key, label in zip(
            axes[:3],
            ("dyn", "target_ll", "spread"),
            ("one-step dynamics MSE (normalised)", "target log-likelihood / action dim", "spread"),
            strict=True,
        ):
            vals = np.array([[x[key] if x[key] is not None else np.nan for x in r["rounds"]] for r in runs])
            ax.plot(rounds, np.nanmean(vals, 0), "-o", color=colour, label=mode, ms=3)
            ax.fill_between(rounds, np.nanmin(vals, 0), np.nanmax(vals, 0), color=colour, alpha=0.15)
            ax.set_xlabel("round")
            ax.set_title(label, fontsize=9)
    chosen = [x["chosen"] for r in results if r["mode"] == "warm" for x in r["rounds"] if x["chosen"]]
    styles = {0: ":", 10: "--"}
    for c in chosen:
        rungs = [g for g in c["rungs"] if g["contraction"] is not None]
        for polish in sorted({g["polish"] for g in rungs}):
            line = sorted((g for g in rungs if g["polish"] == polish), key=lambda g: g["sigma_start"])
            xs, ys = [g["sigma_start"] for g in line], [g["contraction"] for g in line]
            axes[3].plot(xs, ys, styles.get(polish, "-"), marker="o", color="tab:orange", alpha=0.4, ms=3)
        passed = [g for g in rungs if g["passed"]]
        if passed:
            pick = min(passed, key=lambda g: g["cost"])
            axes[3].plot([pick["sigma_start"]], [pick["contraction"]], "k*", ms=9)
    if chosen:
        axes[3].set_xscale("log")
        axes[3].set_xlabel("σ_start (polish 0 dotted, 10 dashed, 30 solid; ★ chosen)")
        axes[3].set_title("contraction c(σ_start) of the pilots tried", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    a = parse_args()
    a.stamp = time.strftime("%Y%m%d-%H%M%S")
    torch.set_num_threads(1)
    cat = Catalog(a.catalog)
    real = cat.read(a.data)
    gen = load_generator(a.generator, device="cpu")
    a.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    if a.report_only:
        results = tagged(json.loads((a.out / "results.json").read_text()), a.generator)
        for spec in a.also:
            gen_dir, _, out_dir = spec.partition("=")
            results += tagged(json.loads((Path(out_dir) / "results.json").read_text()), gen_dir)
    for seed in a.seed_list if not a.report_only else ():
        for algo in a.algo_list:
            for mode in ("cold", "warm"):  # interleaved, so a slower stretch of the machine hits both
                res = run_loop(a, mode, algo, seed, gen, real)
                results.append(res)
                print(f"{mode} {algo} s{seed}: score {res['score']:.1f}, {res['wall_s']:.0f} s", flush=True)
                (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = summary(results, a)
    print("\n".join(lines))
    plot(results, a)
    if a.no_write:
        return
    sigmas = sorted({x["sigma_start"] for r in results for x in r["rounds"] if x["sigma_start"] is not None})
    steps = sorted({x["warm_steps"] for r in results for x in r["rounds"] if x["warm_steps"] is not None})
    body = "\n".join(
        [
            f"Data `{a.data}`; generators {', '.join(generators(results))} ({gen.kind}); "
            f"{a.rounds} rounds of {a.regen} agent steps, "
            f"{a.transitions:,} synthetic transitions per round, 240 synthetic + 16 real rows per batch, "
            f"agent seeds {', '.join(map(str, a.seed_list))} per generator; final score over "
            f"{a.final_episodes} episodes. "
            f"Warm loop: z {a.warm_z}, pilot {Regeneration().warm_pilot}, "
            f"reseed {Regeneration().warm_reseed}, "
            f"polish {a.warm_polish if a.warm_polish is not None else 'chosen (0, 10 or the cold 30)'}; "
            "σ_start chosen: "
            f"{', '.join(f'{s:g}' for s in sigmas)}; warm steps {', '.join(map(str, steps))}. One torch "
            f"thread; both loops interleaved in one process. One-core fp32 matmul: {matmul_gflops():.0f} "
            "GFLOP/s (measured at the end of this run). 'Once settled': the rounds after the first warm "
            "round, whose pilots chose the warm settings (its own cost is the pilot column; for the cold "
            "loop, the same rounds).",
            "",
            *lines,
            "",
            f"![warm vs cold PGD](bench/plots/{PLOT.name})",
        ]
    )
    write_section("warm-pgd", "Warm-started PGD regeneration: cold vs warm loops", body)


if __name__ == "__main__":
    main()
