"""Agents scored in their gymnasium environment: returns over seeded episodes and normalised scores.

The normalised score is 100 · (R − R_random) / (R_expert − R_random) (D4RL's definition). References:
the dataset's own ``ref_min_score`` / ``ref_max_score`` when it carries them (Minari), else D4RL's
random/expert returns for the MuJoCo locomotion tasks (matched by the environment's name without its
version, e.g. HalfCheetah-v5 -> HalfCheetah), else none (returns only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rlsynth.datasets.envs import make_env
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import DatasetInfo, check_env_id

# D4RL's reference returns (random policy, expert policy) per locomotion task.
D4RL_REFERENCES = {
    "HalfCheetah": (-280.178953, 12135.0),
    "Hopper": (-20.272305, 3234.3),
    "Walker2d": (1.629008, 4592.3),
    "Ant": (-325.6, 3879.7),
}


@dataclass(frozen=True)
class Reference:
    random: float
    expert: float
    source: str

    def normalise(self, value: float) -> float:
        return 100.0 * (value - self.random) / (self.expert - self.random)


def reference_for(env_id: str | None, info: DatasetInfo | None = None) -> Reference | None:
    if info is not None and info.ref_min_score is not None and info.ref_max_score is not None:
        return Reference(float(info.ref_min_score), float(info.ref_max_score), "dataset ref_min/ref_max")
    if env_id is None:
        return None
    base = env_id.split("/")[-1].split("-v")[0]
    if base in D4RL_REFERENCES:
        lo, hi = D4RL_REFERENCES[base]
        return Reference(lo, hi, f"D4RL {base} random/expert")
    return None


@dataclass(frozen=True)
class EvalResult:
    env_id: str
    episodes: int
    seed: int
    returns: tuple[float, ...]
    lengths: tuple[int, ...]
    return_mean: float
    return_std: float
    score_mean: float | None
    """D4RL-normalised score of the mean return (None without a reference)."""
    score_std: float | None
    reference: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        """Every field, plus ``normalised_score``: the key scripts read (the D4RL-normalised score of the
        mean return on the 0-100 scale, null when the environment has no reference returns)."""
        return {**asdict(self), "normalised_score": self.score_mean}


def summarise(
    env_id: str, seed: int, returns: list[float], lengths: list[int], ref: Reference | None
) -> EvalResult:
    r = np.asarray(returns, np.float64)
    mean, std = float(r.mean()), float(r.std())
    scale = None if ref is None else 100.0 / (ref.expert - ref.random)
    return EvalResult(
        env_id=env_id,
        episodes=len(returns),
        seed=seed,
        returns=tuple(float(x) for x in r),
        lengths=tuple(int(x) for x in lengths),
        return_mean=mean,
        return_std=std,
        score_mean=None if ref is None else ref.normalise(mean),
        score_std=None if scale is None else abs(scale) * std,
        reference=None if ref is None else asdict(ref),
    )


def rollout_returns(algo: Any, env_id: str, episodes: int, seed: int) -> tuple[list[float], list[int]]:
    """Greedy episodes; episode i resets with seed + i."""
    env = make_env(env_id)
    low, high = env.action_space.low, env.action_space.high
    returns, lengths = [], []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            total, steps, done = 0.0, 0, False
            while not done:
                act = algo.predict(np.asarray(obs, np.float32)[None])[0]
                obs, rew, term, trunc, _ = env.step(np.clip(act, low, high))
                total += float(rew)
                steps += 1
                done = bool(term or trunc)
            returns.append(total)
            lengths.append(steps)
    finally:
        env.close()
    return returns, lengths


def evaluate_agent(
    algo: Any, env_id: str, episodes: int = 10, seed: int = 0, reference: Reference | None = None
) -> EvalResult:
    if episodes < 1:
        raise RlsynthError(f"episodes must be positive, got {episodes}")
    check_env_id(env_id)
    ref = reference if reference is not None else reference_for(env_id)
    returns, lengths = rollout_returns(algo, env_id, episodes, seed)
    if not all(math.isfinite(x) for x in returns):
        raise RlsynthError(f"{env_id}: the agent's episodes have a non-finite return (NaN actions?)")
    return summarise(env_id, seed, returns, lengths, ref)
