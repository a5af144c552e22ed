"""Training batches drawn from one or more datasets with exact rows per component.

A :class:`Mixture` holds each component's transitions as flat arrays and the number of rows every batch
takes from it, e.g. policy-guided diffusion's 240 synthetic + 16 real. ``sample`` draws exactly those
counts (uniformly, with replacement, within each component), so the mix is what was asked for in every
batch, not an expectation over a concatenated dataset. A union of datasets is a single component
(their transitions concatenated): uniform over all rows.

Batches are d3rlpy ``TransitionMiniBatch`` objects built directly from rlsynth's transitions, so the last
step of a truncated episode keeps its true next observation. ``next_actions`` is the episode's next action
(zero at an episode's end, as d3rlpy does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlsynth.datasets.d3rlpy_setup import import_d3rlpy
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset, Transitions

ARRAYS = ("observations", "actions", "rewards", "next_observations", "next_actions", "terminals")


@dataclass(frozen=True)
class Component:
    source: str
    rows: int
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    next_actions: np.ndarray
    terminals: np.ndarray

    @classmethod
    def from_transitions(cls, source: str, rows: int, t: Transitions) -> Component:
        n = len(t)
        if n == 0:
            raise RlsynthError(f"{source}: no transitions to train on")
        same_episode = t.episode_id[1:] == t.episode_id[:-1]
        nxt = np.zeros_like(t.actions)
        nxt[:-1] = np.where(same_episode[:, None], t.actions[1:], 0.0)
        return cls(
            source=source,
            rows=rows,
            observations=np.ascontiguousarray(t.observations, np.float32),
            actions=np.ascontiguousarray(t.actions, np.float32),
            rewards=np.asarray(t.rewards, np.float32).reshape(-1, 1),
            next_observations=np.ascontiguousarray(t.next_observations, np.float32),
            next_actions=nxt.astype(np.float32),
            terminals=np.asarray(t.terminals, np.float32).reshape(-1, 1),
        )

    @property
    def size(self) -> int:
        return len(self.observations)


@dataclass(frozen=True)
class Mixture:
    components: tuple[Component, ...]
    env_id: str | None

    @classmethod
    def of(cls, parts: Sequence[tuple[Dataset, int]]) -> Mixture:
        """Components (dataset, rows per batch); every dataset must share the first one's spaces."""
        if not parts:
            raise RlsynthError("a mixture needs at least one dataset")
        first = parts[0][0].info
        comps = []
        for ds, rows in parts:
            if rows < 1:
                raise RlsynthError(f"{ds.source}: rows per batch must be positive, got {rows}")
            if (
                ds.info.observation_space != first.observation_space
                or ds.info.action_space != first.action_space
            ):
                raise RlsynthError(f"{ds.source}: other observation/action spaces than {parts[0][0].source}")
            comps.append(Component.from_transitions(ds.source, rows, ds.transitions))
        return cls(tuple(comps), first.env_id)

    @classmethod
    def union(cls, datasets: Sequence[Dataset], batch_size: int) -> Mixture:
        """All rows of ``datasets`` as one component: batches uniform over the union."""
        if not datasets:
            raise RlsynthError("a union needs at least one dataset")
        mix = cls.of([(ds, batch_size) for ds in datasets])
        c = mix.components
        joined = Component(
            source=" + ".join(x.source for x in c),
            rows=batch_size,
            **{f: np.concatenate([getattr(x, f) for x in c]) for f in ARRAYS},
        )
        return cls((joined,), mix.env_id)

    @classmethod
    def filled(
        cls, datasets: Sequence[Dataset], mixes: Sequence[tuple[Dataset, int]], batch_size: int
    ) -> Mixture:
        """``mixes`` take exactly their rows of every batch; the union of ``datasets`` fills the rest."""
        rest = batch_size - sum(rows for _, rows in mixes)
        if rest < 1:
            raise RlsynthError(
                f"mix rows add up to {batch_size - rest}; the data needs one of the {batch_size} rows"
            )
        base = cls.union(datasets, rest)
        if not mixes:
            return base
        cls.of([(datasets[0], 1)] + [(d, 1) for d, _ in mixes])  # the same spaces everywhere
        return cls(base.components + cls.of(mixes).components, base.env_id)

    @property
    def batch_size(self) -> int:
        return sum(c.rows for c in self.components)

    @property
    def obs_dim(self) -> int:
        return int(self.components[0].observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.components[0].actions.shape[1])

    @property
    def transitions(self) -> int:
        return sum(c.size for c in self.components)

    @property
    def sources(self) -> list[str]:
        return [c.source for c in self.components]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"source": c.source, "rows_per_batch": c.rows, "transitions": c.size} for c in self.components
        ]

    def observation_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of observations as the agent sees them: each component weighted by its rows."""
        w = np.array([c.rows for c in self.components], np.float64) / self.batch_size
        means = [c.observations.mean(0, dtype=np.float64) for c in self.components]
        second = [(c.observations.astype(np.float64) ** 2).mean(0) for c in self.components]
        mean = sum(wi * m for wi, m in zip(w, means, strict=True))
        var = sum(wi * s for wi, s in zip(w, second, strict=True)) - mean**2
        return np.asarray(mean, np.float32), np.sqrt(np.maximum(var, 1e-12)).astype(np.float32)

    def sample(self, rng: np.random.Generator) -> tuple[Any, np.ndarray]:
        """A ``TransitionMiniBatch`` and, per row, the index of the component it came from."""
        picks = [(c, rng.integers(c.size, size=c.rows)) for c in self.components]
        cols = {f: np.concatenate([getattr(c, f)[i] for c, i in picks]) for f in ARRAYS}
        origin = np.concatenate([np.full(c.rows, k) for k, c in enumerate(self.components)])
        d3 = import_d3rlpy()
        batch = d3.dataset.TransitionMiniBatch(
            observations=cols["observations"],
            actions=cols["actions"],
            rewards=cols["rewards"],
            next_observations=cols["next_observations"],
            next_actions=cols["next_actions"],
            terminals=cols["terminals"],
            intervals=np.ones((len(origin), 1), np.float32),
            transitions=[],
        )
        return batch, origin
