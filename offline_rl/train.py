"""Train d3rlpy agents on rlsynth datasets (d3rlpy does the learning; nothing is re-implemented).

Defaults are the published hyperparameters (and those of policy-guided diffusion's agents):

* IQL — actor/critic lr 3e-4, expectile τ 0.7, inverse temperature β 3.0, max weight 100, batch 256;
* TD3+BC — lr 3e-4, α 2.5, policy delay 2, target smoothing 0.2 clipped at 0.5, batch 256;
* CQL — actor lr 1e-4, critic lr 3e-4, conservative weight 5.0, fixed α (no Lagrange tuning), batch 256;
* BC — deterministic, lr 1e-3, batch 256.

Every algorithm standardises observations (a ``StandardObservationScaler`` fitted on the training data and
saved with the agent); rewards are not rescaled, so real and synthetic data train under the same
objective. The agent file is written atomically beside a JSON sidecar (``AGENT.d3.json``) holding the
algorithm, config, data lineage, steps and seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rlsynth.datasets.agents import save_agent
from rlsynth.datasets.d3rlpy_setup import import_d3rlpy
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset
from rlsynth.offline_rl.mixture import Mixture

ALGOS = ("iql", "td3bc", "cql", "bc")


def algo_config(name: str, batch_size: int = 256) -> Any:
    """The d3rlpy config of ``name`` with the published hyperparameters."""
    d3 = import_d3rlpy()
    scaler = d3.preprocessing.StandardObservationScaler()
    common = {"batch_size": batch_size, "observation_scaler": scaler}
    if name == "iql":
        return d3.algos.IQLConfig(
            actor_learning_rate=3e-4,
            critic_learning_rate=3e-4,
            expectile=0.7,
            weight_temp=3.0,
            max_weight=100.0,
            **common,
        )
    if name == "td3bc":
        return d3.algos.TD3PlusBCConfig(
            actor_learning_rate=3e-4,
            critic_learning_rate=3e-4,
            alpha=2.5,
            update_actor_interval=2,
            target_smoothing_sigma=0.2,
            target_smoothing_clip=0.5,
            **common,
        )
    if name == "cql":
        return d3.algos.CQLConfig(
            actor_learning_rate=1e-4,
            critic_learning_rate=3e-4,
            temp_learning_rate=1e-4,
            alpha_learning_rate=0.0,
            conservative_weight=5.0,
            **common,
        )
    if name == "bc":
        return d3.algos.BCConfig(learning_rate=1e-3, policy_type="deterministic", **common)
    raise RlsynthError(f"unknown algorithm {name!r} (algorithms: {', '.join(ALGOS)})")


def check_out_path(out: Path, overwrite: bool = False) -> None:
    if out.suffix != ".d3":
        raise RlsynthError(f"{out}: agent files end in .d3")
    if out.exists() and not overwrite:
        raise RlsynthError(f"{out}: exists (agent files are never overwritten; choose another --out)")
    if out.parent.exists() and not out.parent.is_dir():
        raise RlsynthError(f"{out.parent}: not a folder")


@dataclass(frozen=True)
class TrainingLog:
    steps: list[int]
    """Steps at which ``callback`` ran."""
    metrics: list[dict[str, float]]
    """Mean d3rlpy losses over each logging interval."""


Callback = Callable[[int, Any], None]
"""``callback(step, algo)`` after ``step`` gradient steps (every ``every`` steps and at the end)."""


def build_algo(algo_name: str, mixture: Mixture, batch_size: int, seed: int) -> Any:
    """A d3rlpy algorithm with published hyperparameters, scaler fitted on the mixture, models created."""
    if mixture.batch_size != batch_size:
        raise RlsynthError(f"mixture rows add up to {mixture.batch_size}, not the batch size {batch_size}")
    d3 = import_d3rlpy()
    d3.seed(seed)
    config = algo_config(algo_name, batch_size)
    mean, std = mixture.observation_stats()
    config.observation_scaler = d3.preprocessing.StandardObservationScaler(mean=mean, std=std)
    algo = config.create(device="cpu:0")
    algo.create_impl((mixture.obs_dim,), mixture.act_dim)
    return algo


def fit(
    algo: Any,
    mixture: Mixture,
    steps: int,
    rng: np.random.Generator,
    *,
    start: int = 0,
    every: int = 0,
    callback: Callback | None = None,
    progress: bool = True,
    desc: str = "train agent",
) -> TrainingLog:
    """``steps`` d3rlpy updates on batches drawn from ``mixture`` (exact rows per component)."""
    log = TrainingLog([], [])
    acc: dict[str, list[float]] = {}
    bar = tqdm(range(start, start + steps), desc=desc, disable=not progress, leave=False)
    for i in bar:
        batch, _ = mixture.sample(rng)
        for k, v in algo.update(batch).items():
            acc.setdefault(k, []).append(float(v))
        step = i + 1
        if (every and step % every == 0) or step == start + steps:
            log.steps.append(step)
            log.metrics.append({k: float(np.mean(v)) for k, v in acc.items()})
            acc = {}
            if callback is not None:
                callback(step, algo)
    return log


def train_agent(
    algo_name: str,
    data: Dataset | Mixture,
    out: Path,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    lineage: dict[str, Any] | None = None,
    every: int = 0,
    callback: Callback | None = None,
) -> AgentRun:
    """Train ``algo_name`` for ``steps`` gradient steps and save it to ``out`` (.d3).

    ``data`` is one dataset (uniform batches) or a :class:`Mixture` (fixed rows per component per batch).
    """
    if steps < 1:
        raise RlsynthError(f"steps must be positive, got {steps}")
    out = Path(out)
    check_out_path(out)
    mixture = data if isinstance(data, Mixture) else Mixture.of([(data, batch_size)])
    algo = build_algo(algo_name, mixture, batch_size, seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    log = fit(algo, mixture, steps, rng, every=every, callback=callback, progress=progress)
    seconds = time.perf_counter() - t0
    meta = {
        "algo": algo_name,
        "d3rlpy_config": json.loads(algo.config.serialize()),
        "steps": steps,
        "seed": seed,
        "seconds": seconds,
        "data": lineage or {"sources": mixture.sources},
        "mixture": mixture.describe(),
        "transitions": mixture.transitions,
        "env_id": mixture.env_id,
        "final_metrics": log.metrics[-1] if log.metrics else {},
    }
    save_agent(algo, out, meta)
    return AgentRun(out, algo_name, steps, seed, seconds, log)


@dataclass(frozen=True)
class AgentRun:
    path: Path
    algo: str
    steps: int
    seed: int
    seconds: float
    log: TrainingLog
