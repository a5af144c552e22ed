"""Recipes that build D4RL-style datasets locally, with no network.

* ``random``             uniform random actions for ``transitions`` steps;
* ``sac-medium-replay``  every environment step of an online d3rlpy SAC run (random warm-up included), up
                         to ``steps`` steps or until the mean return of the last 5 episodes reaches
                         ``target_return``;
* ``sac-medium``         the same SAC run, then ``transitions`` steps of rollouts of its final (stochastic)
                         policy; the agent is returned so it can be stored beside the dataset.

Every episode is recorded with its full T+1 observations; the step budget cuts the last episode, which is
then marked truncated, as D4RL's collectors do.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlsynth.datasets.envs import box_space, make_env
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset, DatasetInfo, Episode, check_env_id, episodes_to_transitions
from rlsynth.datasets.validation import validate_episodes

RECIPES = ("random", "sac-medium-replay", "sac-medium")
Policy = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RecipeConfig:
    """What to build. Fields that a recipe does not use are ignored by it."""

    recipe: str
    """One of ``random``, ``sac-medium-replay``, ``sac-medium``."""
    env_id: str
    """Gymnasium id of the environment (flat Box spaces), e.g. ``Hopper-v5``."""
    steps: int = 100_000
    """SAC recipes: online environment steps (training budget)."""
    transitions: int = 100_000
    """``random`` and ``sac-medium``: transitions to record."""
    seed: int = 0
    """Seeds the environment, the action sampler and d3rlpy."""
    target_return: float | None = None
    """SAC recipes: stop training early once the mean return of the last 5 episodes reaches this."""
    warmup_steps: int = 5000
    """SAC recipes: uniform random steps before learning starts (capped at a fifth of ``steps``)."""
    batch_size: int = 256
    """SAC recipes: mini-batch size of each update (one update per environment step)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        # Checked when the config is made (CLI option, run config), before any recipe step runs.
        check_env_id(self.env_id, "recipe environment")
        if self.recipe not in RECIPES:
            raise RlsynthError(f"unknown recipe '{self.recipe}' (recipes: {', '.join(RECIPES)})")
        for name in ("steps", "transitions", "batch_size"):
            if getattr(self, name) < 1:
                raise RlsynthError(f"recipe option {name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise RlsynthError(f"recipe option warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class RecipeResult:
    dataset: Dataset
    agent: Any = None
    """The trained d3rlpy SAC agent (SAC recipes), to ``save()`` beside the dataset."""
    details: dict[str, Any] = field(default_factory=dict)


class _Recorder:
    """Collects steps into episodes with T+1 observations."""

    def __init__(self) -> None:
        self.episodes: list[Episode] = []
        self._obs: list[np.ndarray] = []
        self._act: list[np.ndarray] = []
        self._rew: list[float] = []
        self.returns: list[float] = []

    def start(self, obs: np.ndarray) -> None:
        self._obs, self._act, self._rew = [obs], [], []

    def step(self, action: np.ndarray, reward: float, next_obs: np.ndarray) -> None:
        self._act.append(action)
        self._rew.append(reward)
        self._obs.append(next_obs)

    def end(self, terminated: bool) -> None:
        if not self._act:
            return
        self.episodes.append(
            Episode.ending(
                np.asarray(self._obs), np.asarray(self._act), np.asarray(self._rew), terminated=terminated
            )
        )
        self.returns.append(float(np.sum(self._rew)))
        self._act = []

    @property
    def open_steps(self) -> int:
        return len(self._act)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=1.0)


def _run(
    env: Any,
    policy: Policy,
    n_steps: int,
    seed: int,
    rec: _Recorder,
    desc: str,
    progress: bool,
    on_step: Callable[[int, np.ndarray, np.ndarray, float, np.ndarray, bool, bool], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Step ``env`` under ``policy`` for up to ``n_steps`` steps, recording every step.

    Returns the number of steps taken."""
    obs, _ = env.reset(seed=seed)
    rec.start(np.asarray(obs, np.float32))
    bar = _progress(n_steps, desc, progress)
    taken = 0
    try:
        for i in range(n_steps):
            action = np.asarray(policy(np.asarray(obs, np.float32)), np.float32)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            rec.step(action, float(reward), np.asarray(next_obs, np.float32))
            if on_step is not None:
                on_step(
                    i,
                    np.asarray(obs, np.float32),
                    action,
                    float(reward),
                    np.asarray(next_obs, np.float32),
                    bool(terminated),
                    bool(truncated),
                )
            taken = i + 1
            bar.update(1)
            if terminated or truncated:
                rec.end(bool(terminated))
                if rec.returns:
                    bar.set_postfix(episodes=len(rec.returns), ret=f"{rec.returns[-1]:.1f}", refresh=False)
                if stop is not None and stop():
                    break
                obs, _ = env.reset()
                rec.start(np.asarray(obs, np.float32))
            else:
                obs = next_obs
    finally:
        bar.close()
    # The budget cut the last episode: it ends truncated (it did not terminate).
    rec.end(terminated=False)
    return taken


def _info(env: Any, env_id: str) -> DatasetInfo:
    return DatasetInfo(
        env_id=env_id,
        observation_space=box_space(env.observation_space, "the observation space", env_id),
        action_space=box_space(env.action_space, "the action space", env_id),
    )


def _dataset(rec: _Recorder, info: DatasetInfo, cfg: RecipeConfig) -> Dataset:
    where = f"recipe {cfg.recipe} on {cfg.env_id}"
    validate_episodes(rec.episodes, info, where)
    return Dataset(info=info, transitions=episodes_to_transitions(rec.episodes), source=where)


def build(cfg: RecipeConfig) -> RecipeResult:
    """Run a recipe. Raises :class:`RlsynthError` for a bad env or config."""
    env = make_env(cfg.env_id)
    try:
        info = _info(env, cfg.env_id)
        if cfg.recipe == "random":
            env.action_space.seed(cfg.seed)
            rec = _Recorder()
            _run(
                env,
                lambda _o: env.action_space.sample(),
                cfg.transitions,
                cfg.seed,
                rec,
                "random",
                cfg.progress,
            )
            return RecipeResult(_dataset(rec, info, cfg), details=_summary(rec))
        sac, replay = _train_sac(env, info, cfg)
        if cfg.recipe == "sac-medium-replay":
            return RecipeResult(_dataset(replay, info, cfg), agent=sac, details=_summary(replay))
        rec = _Recorder()
        policy = _policy(sac)
        _run(env, policy, cfg.transitions, cfg.seed + 1, rec, "sac rollouts", cfg.progress)
        details = {**_summary(rec), "training": _summary(replay)}
        return RecipeResult(_dataset(rec, info, cfg), agent=sac, details=details)
    finally:
        env.close()


def _summary(rec: _Recorder) -> dict[str, Any]:
    r = np.asarray(rec.returns or [0.0])
    complete = r[:-1] if len(r) > 1 else r
    return {
        "episodes": len(rec.episodes),
        "transitions": sum(e.length for e in rec.episodes),
        "return_mean": float(complete.mean()),
        "return_last5": float(np.mean(complete[-5:])),
    }


def _policy(sac: Any) -> Policy:
    return lambda o: sac.sample_action(o[None])[0]


def _train_sac(env: Any, info: DatasetInfo, cfg: RecipeConfig) -> tuple[Any, _Recorder]:
    """Online SAC (d3rlpy, default hyperparameters, one update per step) recording every step it takes."""
    from rlsynth.datasets.d3rlpy_setup import import_d3rlpy

    d3rlpy = import_d3rlpy()
    d3rlpy.seed(cfg.seed)
    env.action_space.seed(cfg.seed)
    scaler = d3rlpy.preprocessing.MinMaxActionScaler(
        minimum=info.action_space.low.astype(np.float32), maximum=info.action_space.high.astype(np.float32)
    )
    sac = d3rlpy.algos.SACConfig(batch_size=cfg.batch_size, action_scaler=scaler).create(device=_device())
    sac.build_with_env(env)
    buffer = d3rlpy.dataset.ReplayBuffer(d3rlpy.dataset.InfiniteBuffer(), env=env)
    warmup = min(cfg.warmup_steps, cfg.steps // 5)
    rec = _Recorder()
    recent: deque[float] = deque(maxlen=5)

    taken = [0]

    def policy(obs: np.ndarray) -> np.ndarray:
        if taken[0] < warmup:
            return np.asarray(env.action_space.sample(), np.float32)
        return np.asarray(sac.sample_action(obs[None])[0], np.float32)

    def on_step(
        i: int,
        obs: np.ndarray,
        action: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        term: bool,
        trunc: bool,
    ) -> None:
        taken[0] = i + 1
        buffer.append(obs, action, reward)
        if term:
            buffer.clip_episode(True)
        elif trunc:
            # Keep the last transition: its successor is the final observation (see offline_rl.buffers).
            buffer.append(next_obs, action, 0.0)
            buffer.clip_episode(False)
        if i >= warmup and buffer.transition_count >= cfg.batch_size:
            sac.update(buffer.sample_transition_batch(cfg.batch_size))

    def reached() -> bool:
        if rec.returns:
            recent.append(rec.returns[-1])
        target = cfg.target_return
        return target is not None and len(recent) == recent.maxlen and float(np.mean(recent)) >= target

    _run(env, policy, cfg.steps, cfg.seed, rec, "sac", cfg.progress, on_step=on_step, stop=reached)
    return sac, rec


def _device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu:0"
