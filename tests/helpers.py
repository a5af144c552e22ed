"""Helpers shared by the tests: tiny datasets built in memory and exact comparisons."""

from __future__ import annotations

import functools

import numpy as np

from datasets.envs import env_info
from datasets.types import Dataset, DatasetInfo, Episode, Transitions, episodes_to_transitions


@functools.cache
def hopper_info() -> DatasetInfo:
    return env_info("Hopper-v5")


def make_episode(
    rng: np.random.Generator, length: int, terminated: bool, obs_dim: int = 11, act_dim: int = 3
) -> Episode:
    last = np.zeros(length, bool)
    last[-1] = True
    none = np.zeros(length, bool)
    return Episode(
        observations=rng.normal(size=(length + 1, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(length, act_dim)).astype(np.float32),
        rewards=rng.normal(size=length).astype(np.float32),
        terminations=last if terminated else none,
        truncations=none if terminated else last,
    )


def make_dataset(seed: int = 0, lengths: tuple[int, ...] = (5, 9, 3, 12), source: str = "test") -> Dataset:
    """Hopper-shaped random episodes, alternating terminated / truncated."""
    rng = np.random.default_rng(seed)
    eps = [make_episode(rng, n, terminated=i % 2 == 0) for i, n in enumerate(lengths)]
    return Dataset(info=hopper_info(), transitions=episodes_to_transitions(eps), source=source)


def assert_same_transitions(a: Dataset, b: Dataset) -> None:
    for col in Transitions.columns():
        x, y = getattr(a.transitions, col), getattr(b.transitions, col)
        assert x.dtype == y.dtype, col
        np.testing.assert_array_equal(x, y, err_msg=col)
