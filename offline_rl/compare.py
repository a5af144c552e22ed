"""The comparison runner: one algorithm, the same steps and seeds, across data conditions.

A condition is training data: catalog versions (a union), optionally with exact per-batch mix rows, or
the PGD loop (generator + real data). Every (condition, algorithm, seed) job trains with the same budget,
is evaluated in the environment every ``eval_every`` steps (the learning curve) and at the end with
``final_episodes`` episodes. Jobs run in worker processes when ``workers`` > 1 (one torch thread each).
Outputs in ``out``: ``results.json`` (every job and the aggregates), ``results.md`` (normalised score
mean ± std over seeds; returns where no reference exists) and ``curves.png``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators.options import Regeneration, SamplerSettings
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.offline_rl.pgd import PGDConfig, check_initial_target, check_initial_target_file


@dataclass(frozen=True)
class PGDSpec:
    generator: str
    """Trajectory / transition generator folder."""
    real: str
    """Real data (catalog ref)."""
    name: str
    """Catalog name prefix for the regenerated synthetic versions."""
    regenerate_every: int = 10_000
    synthetic_transitions: int = 50_000
    synthetic_rows: int = 240
    real_rows: int = 16
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(terms=("policy",)))
    initial_target: str | None = None
    """Agent file guiding round 0 (None: round 0 unguided); see :class:`offline_rl.pgd.PGDConfig`."""
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    """How each set is sampled; see :class:`offline_rl.pgd.PGDConfig`."""
    regeneration: Regeneration = field(default_factory=Regeneration)
    """Cold or warm-started rounds; see :class:`offline_rl.pgd.PGDConfig`."""

    def __post_init__(self) -> None:
        check_initial_target(self.initial_target, self.guidance)


@dataclass(frozen=True)
class Condition:
    name: str
    data: tuple[str, ...] = ()
    """Catalog refs whose union fills the batch (minus the mix rows)."""
    mix: tuple[tuple[str, int], ...] = ()
    """(catalog ref, rows per batch) drawn exactly in every batch."""
    pgd: PGDSpec | None = None

    def __post_init__(self) -> None:
        if (self.pgd is None) == (not self.data):
            raise RlsynthError(
                f"condition {self.name!r}: give data (and mixes) or a PGD spec, not both or none"
            )


@dataclass(frozen=True)
class CompareConfig:
    algos: tuple[str, ...] = ("td3bc", "iql")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 10_000
    batch_size: int = 256
    eval_every: int = 2_500
    eval_episodes: int = 3
    final_episodes: int = 10
    workers: int = 1
    catalog: str | None = None
    env_id: str | None = None
    """Environment to evaluate in (default: the first dataset's)."""
    generator_device: str = "auto"
    """Where the PGD loop's generator samples (``auto``: CUDA if present); agents train on the CPU."""


@dataclass(frozen=True)
class Job:
    condition: Condition
    algo: str
    seed: int
    config: CompareConfig
    out: str


def _run_job(job: Job) -> dict[str, Any]:
    import torch

    from rlsynth.datasets.catalog import Catalog
    from rlsynth.offline_rl.evaluate import evaluate_agent
    from rlsynth.offline_rl.mixture import Mixture
    from rlsynth.offline_rl.train import train_agent

    torch.set_num_threads(1)
    cfg, cond = job.config, job.condition
    cat = Catalog(cfg.catalog)
    curve: list[dict[str, Any]] = []
    env_box: dict[str, str] = {}

    def callback(step: int, algo: Any) -> None:
        r = evaluate_agent(algo, env_box["env"], episodes=cfg.eval_episodes, seed=10_000 + job.seed * 100)
        curve.append({"step": step, "return": r.return_mean, "score": r.score_mean})

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    if cond.pgd is not None:
        from rlsynth.datasets.sources import source_lineage
        from rlsynth.generators.api import load_generator
        from rlsynth.offline_rl.pgd import run_pgd

        p = cond.pgd
        real = cat.read(p.real)
        env_box["env"] = cfg.env_id or str(real.info.env_id)
        pcfg = PGDConfig(
            algo=job.algo,
            steps=cfg.steps,
            regenerate_every=p.regenerate_every,
            synthetic_transitions=p.synthetic_transitions,
            synthetic_rows=p.synthetic_rows,
            real_rows=p.real_rows,
            guidance=p.guidance,
            initial_target=p.initial_target,
            sampler=p.sampler,
            regeneration=p.regeneration,
            seed=job.seed,
        )
        gen = load_generator(p.generator, device=cfg.generator_device)
        res = run_pgd(
            pcfg, gen, real, cat, f"{p.name}/{job.algo}-s{job.seed}", out,
            real_lineage=source_lineage(p.real, real, cat), every=cfg.eval_every, callback=callback,
            progress=False,
        )  # fmt: skip
        agent_path = res.agent
        extra: dict[str, Any] = {
            "versions": [r.version for r in res.rounds],
            "rounds": [asdict(r) for r in res.rounds],
        }
    else:
        sets = [cat.read(r) for r in cond.data]
        env_box["env"] = cfg.env_id or str(sets[0].info.env_id)
        mixes = [(cat.read(r), rows) for r, rows in cond.mix]
        mixture = Mixture.filled(sets, mixes, cfg.batch_size)
        run = train_agent(
            job.algo, mixture, out / "agent.d3", steps=cfg.steps, seed=job.seed, batch_size=cfg.batch_size,
            progress=False, every=cfg.eval_every, callback=callback, lineage={"condition": asdict(cond)},
        )  # fmt: skip
        agent_path = run.path
        extra = {}
    from rlsynth.datasets.agents import load_agent

    final = evaluate_agent(load_agent(agent_path), env_box["env"], episodes=cfg.final_episodes, seed=job.seed)
    return {
        "condition": cond.name,
        "algo": job.algo,
        "seed": job.seed,
        "agent": str(agent_path),
        "curve": curve,
        "final": final.to_json(),
        **extra,
    }


def jobs_for(conditions: list[Condition], cfg: CompareConfig, out: Path) -> list[Job]:
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise RlsynthError("condition names must be unique")
    return [
        Job(c, a, s, cfg, str(out / "runs" / c.name / f"{a}-s{s}"))
        for c in conditions
        for a in cfg.algos
        for s in cfg.seeds
    ]


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of the final score (or return) per (condition, algorithm)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["condition"], r["algo"]), []).append(r)
    rows = []
    for (cond, algo), rs in groups.items():
        scores = [r["final"]["score_mean"] for r in rs]
        returns = np.array([r["final"]["return_mean"] for r in rs])
        has_score = all(s is not None for s in scores)
        arr = np.array(scores if has_score else returns, np.float64)
        rows.append(
            {
                "condition": cond,
                "algo": algo,
                "seeds": len(rs),
                "metric": "normalised score" if has_score else "return",
                "mean": float(arr.mean()),
                "std": float(arr.std()),
                "per_seed": [float(x) for x in arr],
                "return_mean": float(returns.mean()),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], conditions: list[str], algos: list[str]) -> str:
    by = {(r["condition"], r["algo"]): r for r in rows}
    metric = rows[0]["metric"] if rows else "score"
    lines = [
        f"| condition | {' | '.join(algos)} |",
        "|---|" + "---|" * len(algos),
    ]
    for c in conditions:
        cells = []
        for a in algos:
            r = by.get((c, a))
            cells.append("—" if r is None else f"{r['mean']:.1f} ± {r['std']:.1f}")
        lines.append(f"| {c} | {' | '.join(cells)} |")
    return f"Final {metric}, mean ± std over seeds:\n\n" + "\n".join(lines)


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = sorted({r["algo"] for r in results})
    fig, axes = plt.subplots(1, len(algos), figsize=(6 * len(algos), 4), squeeze=False)
    for ax, algo in zip(axes[0], algos, strict=True):
        conds: dict[str, list[list[dict[str, Any]]]] = {}
        for r in results:
            if r["algo"] == algo and r["curve"]:
                conds.setdefault(r["condition"], []).append(r["curve"])
        for cond, curves in conds.items():
            n = min(len(c) for c in curves)
            steps = [c["step"] for c in curves[0][:n]]
            key = "score" if curves[0][0]["score"] is not None else "return"
            vals = np.array([[p[key] for p in c[:n]] for c in curves], np.float64)
            m, s = vals.mean(0), vals.std(0)
            ax.plot(steps, m, label=cond)
            ax.fill_between(steps, m - s, m + s, alpha=0.2)
        ax.set_title(algo)
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(conditions: list[Condition], cfg: CompareConfig, out: Path) -> dict[str, Any]:
    """Run every job, write results.json / results.md / curves.png into ``out``, return the results."""
    # Before any job: the loop's own check would come after the other conditions had trained.
    for c in conditions:
        if c.pgd is not None:
            check_initial_target_file(c.pgd.initial_target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(conditions, cfg, out)
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_run_job, jobs))
    else:
        results = [_run_job(j) for j in jobs]
    rows = aggregate(results)
    report = {
        "config": asdict(cfg),
        "conditions": [asdict(c) for c in conditions],
        "aggregate": rows,
        "runs": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "results.md").write_text(markdown(rows, [c.name for c in conditions], list(cfg.algos)) + "\n")
    plot_curves(results, out / "curves.png")
    return report
