"""Dynamics error vs horizon: the learned world model against the real data's own transitions, one run.

Splits the dataset's episodes 90/10, trains the world model (cpu-small preset unless --steps) on the 90%,
then from start states of the held-out 10% replays the recorded actions open-loop for H = 1, 8, 32 steps
and compares the states reached with the recorded ones (normalised per dimension by the data's std):

* simulator replay: MuJoCo restored from the stored (float32) start state — the floor of this measure;
* linear next-state regression s' = [s, a, 1]·W fitted on the 90% (the yardstick of issue 4);
* world model, mean: each step the mean of the elite members' predictions;
* world model, sampled: rollouts exactly as ``rlsynth generator sample`` draws them.

It also samples a world-model dataset and scores its one-step error against the simulator.

    python bench/fidelity.py --data halfcheetah/medium-replay
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Not the script's folder on the path: bench/generators.py must not shadow the generators package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.fidelity import (
    EvalConfig,
    MujocoOracle,
    evaluate,
    linear_step,
    open_loop_curve,
    oracle_step,
    reference_std,
    window_starts,
)
from rlsynth.datasets.types import Dataset, Transitions
from rlsynth.generators.api import SampleOptions, load_generator, sample, train_generator
from rlsynth.generators.world_model import WorldModel, WorldModelNormalisers, model_step
from rlsynth.pipeline.bench_report import write_section

HORIZONS = (1, 8, 32)
PLOT = Path(__file__).resolve().parent / "plots" / "fidelity.png"


def split_episodes(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    t = ds.transitions
    ids = np.unique(t.episode_id)
    rng = np.random.default_rng(seed)
    test_ids = rng.choice(ids, size=max(1, round(len(ids) * test_fraction)), replace=False)
    test = np.isin(t.episode_id, test_ids)

    def subset(mask: np.ndarray, tag: str) -> Dataset:
        return Dataset(
            ds.info,
            Transitions(**{c: getattr(t, c)[mask] for c in Transitions.columns()}),
            f"{ds.source} ({tag})",
        )

    return subset(~test, "train"), subset(test, "test")


def world_model_step(folder: Path, mean: bool, seed: int):  # type: ignore[no-untyped-def]
    gen = load_generator(folder, device="cpu")
    tg = torch.Generator().manual_seed(seed)
    elites = gen.model.elite_idx
    norms = WorldModelNormalisers.from_map(gen.norms)
    model: WorldModel = gen.model  # type: ignore[assignment]

    def step(s: np.ndarray, a: np.ndarray) -> np.ndarray:
        obs, act = torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(a, dtype=torch.float32)
        if mean:
            outs = [
                model_step(model, norms, obs, act, torch.full((len(s),), int(e)), None).next_obs
                for e in elites
            ]
            return torch.stack(outs).mean(0).numpy()
        member = elites[torch.randint(len(elites), (len(s),), generator=tg)]
        noise = torch.randn((len(s), gen.model.obs_dim + 1), generator=tg)
        return model_step(model, norms, obs, act, member, noise).next_obs.numpy()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="catalog version NAME@N (import ../shared/data files first)")
    p.add_argument("--catalog", default=None)
    p.add_argument(
        "--steps", type=int, default=None, help="world-model gradient steps (default: the preset's)"
    )
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    cat = Catalog(a.catalog)
    ds = cat.read(a.data)
    train_ds, test_ds = split_episodes(ds, 0.1, a.seed)
    std = reference_std(ds.transitions)
    rng = np.random.default_rng(a.seed)
    tt = test_ds.transitions
    oracle = MujocoOracle(ds.info.env_id or "")
    starts = window_starts(tt, max(HORIZONS), oracle.restorable(tt.observations))
    starts = np.sort(rng.choice(starts, size=min(a.windows, len(starts)), replace=False))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train_generator("world-model", train_ds, Path(tmp) / "wm", steps=a.steps, seed=a.seed)
        train_s = time.perf_counter() - t0
        curves = {
            "simulator replay from the stored state (floor)": open_loop_curve(
                oracle_step(oracle), tt, starts, 32, std
            ),
            "linear next-state regression": open_loop_curve(
                linear_step(train_ds.transitions), tt, starts, 32, std
            ),
            "world model, elite mean": open_loop_curve(
                world_model_step(Path(tmp) / "wm", True, a.seed), tt, starts, 32, std
            ),
            "world model, sampled": open_loop_curve(
                world_model_step(Path(tmp) / "wm", False, a.seed), tt, starts, 32, std
            ),
        }
        gen = load_generator(Path(tmp) / "wm", device="cpu")
        t0 = time.perf_counter()
        synth = sample(gen, train_ds, 20_000, SampleOptions(seed=a.seed, horizon=32))
        sample_s = time.perf_counter() - t0
    oracle.close()
    judged = evaluate(
        synth, reference=ds, config=EvalConfig(sample=5000, horizons=(1,), windows=8, seed=a.seed)
    )
    rows = "\n".join(
        f"| {name} | " + " | ".join(f"{c[h - 1]:.4g}" for h in HORIZONS) + " |" for name, c in curves.items()
    )
    one = judged["one_step"]
    body = (
        f"Data `{a.data}` ({len(ds.transitions):,} transitions, {ds.info.env_id}); world model trained on "
        f"90% of the episodes ({res.steps} steps, {train_s:.0f} s, validation loss {res.val_loss:.3f}); "
        f"{len(starts)} open-loop windows from the held-out 10%, recorded actions replayed.\n\n"
        "Normalised next-observation MSE after H open-loop steps (per-dimension std of the data):\n\n"
        "| model | H=1 | H=8 | H=32 |\n|---|---|---|---|\n" + rows + "\n\n"
        "World-model samples (20,000 transitions, 32-step rollouts from real states with the data's actions, "
        f"{20_000 / sample_s:,.0f} transitions/s) judged by the simulator on 5,000 rows: one-step "
        f"normalised MSE {one['obs_mse_normalised']:.3g}, reward MAE {one['reward_mae']:.3g}, "
        f"novelty {judged['novelty']['mean']:.2f} (data spacing {judged['reference_spacing']['mean']:.2f}), "
        f"coverage {judged['coverage']:.2f}.\n\n"
        "The simulator row is not 0 at H=32: the stored start state is float32, and the dynamics amplify "
        "that rounding; it is the floor any model is measured against here.\n\n"
        "![fidelity](bench/plots/fidelity.png)"
    )
    print(body)
    plot_curves(curves, a.data)
    if not a.no_write:
        write_section("fidelity", "Fidelity: dynamics error vs horizon", body)


def plot_curves(curves: dict[str, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("open-loop steps H")
    ax.set_ylabel("normalised obs MSE vs recorded data")
    ax.set_title(f"error growth with horizon — {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
