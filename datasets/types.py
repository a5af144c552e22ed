"""Canonical in-memory types: episodes, a flat transition view, and spaces.

An :class:`Episode` follows Minari's layout: ``observations`` has T+1 rows (the state after the last
action included), the other fields T rows. :class:`Transitions` is the flat, columnar view that Parquet
parts, HDF5 files and d3rlpy buffers use: one row per step, ``next_observations[t]`` explicit.
Both are frozen; arrays are made read-only so a shared dataset cannot be altered by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from rlsynth.datasets.errors import ValidationError

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _bound_to_json(v: float) -> float | str:
    return "inf" if v == np.inf else "-inf" if v == -np.inf else float(v)


@dataclass(frozen=True)
class BoxSpace:
    """A continuous box space (the only kind rlsynth's generators model).

    ``low``/``high`` have the space's shape and may hold ±inf.
    """

    low: FloatArray
    high: FloatArray

    def __post_init__(self) -> None:
        if self.low.shape != self.high.shape:
            raise ValueError(f"space bounds disagree in shape: {self.low.shape} vs {self.high.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.low.shape)

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @classmethod
    def unbounded(cls, dim: int) -> BoxSpace:
        return cls(np.full(dim, -np.inf, np.float32), np.full(dim, np.inf, np.float32))

    @classmethod
    def from_gymnasium(cls, space: Any) -> BoxSpace:
        """Convert a ``gymnasium.spaces.Box``; anything else is refused by the caller."""
        return cls(np.asarray(space.low, np.float32).copy(), np.asarray(space.high, np.float32).copy())

    def to_gymnasium(self) -> Any:
        import gymnasium

        return gymnasium.spaces.Box(low=self.low, high=self.high, shape=self.shape, dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "box",
            "shape": list(self.shape),
            "dtype": "float32",
            "low": [_bound_to_json(float(v)) for v in self.low.reshape(-1)],
            "high": [_bound_to_json(float(v)) for v in self.high.reshape(-1)],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BoxSpace:
        shape = tuple(d["shape"])
        low = np.array([float(v) for v in d["low"]], np.float32).reshape(shape)
        high = np.array([float(v) for v in d["high"]], np.float32).reshape(shape)
        return cls(low, high)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoxSpace)
            and self.shape == other.shape
            and bool(np.array_equal(self.low, other.low))
            and bool(np.array_equal(self.high, other.high))
        )

    def __hash__(self) -> int:
        return hash((self.shape, self.low.tobytes(), self.high.tobytes()))


# A registered id: optional namespace, name, optional version ("ns/Name-v3"). No ':' — gymnasium reads
# "module:Name" as "import module, then make Name", so an id from a file would run that file's code.
ENV_ID = re.compile(r"(?:[A-Za-z0-9_.-]{1,100}/)?[A-Za-z0-9_.-]{1,100}")


def check_env_id(env_id: object, where: str = "") -> str:
    """``env_id`` if it has registered-id syntax, else a one-line :class:`ValidationError` at ``where``."""
    if isinstance(env_id, str) and ENV_ID.fullmatch(env_id):
        return env_id
    at = f"{where}: " if where else ""
    shown = repr(env_id)[:80]
    raise ValidationError(f"{at}environment id {shown} is not a registered id (letters, digits, _.- , one /)")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is about: its environment, spaces and optional reference scores."""

    env_id: str | None
    observation_space: BoxSpace
    action_space: BoxSpace
    ref_min_score: float | None = None
    ref_max_score: float | None = None

    def __post_init__(self) -> None:
        # Every env id that reaches rlsynth from a file (HDF5 attribute, manifest, Minari metadata) becomes
        # a DatasetInfo: checking here refuses a code-running id before anything can pass it to gymnasium.
        if self.env_id is not None:
            check_env_id(self.env_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "env_id": self.env_id,
            "observation_space": self.observation_space.to_json(),
            "action_space": self.action_space.to_json(),
            "ref_min_score": self.ref_min_score,
            "ref_max_score": self.ref_max_score,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetInfo:
        return cls(
            env_id=d.get("env_id"),
            observation_space=BoxSpace.from_json(d["observation_space"]),
            action_space=BoxSpace.from_json(d["action_space"]),
            ref_min_score=d.get("ref_min_score"),
            ref_max_score=d.get("ref_max_score"),
        )


@dataclass(frozen=True)
class Episode:
    """One episode, Minari layout. Shapes: observations (T+1, *obs), actions (T, *act), rest (T,)."""

    observations: FloatArray
    actions: FloatArray
    rewards: FloatArray
    terminations: BoolArray
    truncations: BoolArray

    def __post_init__(self) -> None:
        for name in ("observations", "actions", "rewards", "terminations", "truncations"):
            _frozen(getattr(self, name))

    @classmethod
    def ending(
        cls, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray, *, terminated: bool
    ) -> Episode:
        """An episode whose only end flag is on its last step: a termination, or else a truncation."""
        n = int(actions.shape[0])
        last = np.zeros(n, bool)
        last[-1] = True
        none = np.zeros(n, bool)
        return cls(
            observations=np.ascontiguousarray(observations, np.float32),
            actions=np.ascontiguousarray(actions, np.float32),
            rewards=np.ascontiguousarray(rewards, np.float32),
            terminations=last if terminated else none,
            truncations=none if terminated else last,
        )

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    @property
    def terminated(self) -> bool:
        return bool(self.length and self.terminations[-1])

    @property
    def truncated(self) -> bool:
        return bool(self.length and self.truncations[-1] and not self.terminations[-1])


@dataclass(frozen=True)
class Transitions:
    """Flat view: one row per step. Shapes: observations/next_observations (N, obs_dim), actions (N, act_dim),
    episode_id/step/rewards/terminals/timeouts (N,). Rows of one episode are contiguous and in step order."""

    episode_id: IntArray
    step: npt.NDArray[np.int32]
    observations: FloatArray
    actions: FloatArray
    rewards: FloatArray
    next_observations: FloatArray
    terminals: BoolArray
    timeouts: BoolArray

    def __post_init__(self) -> None:
        for name in self.columns():
            _frozen(getattr(self, name))

    @staticmethod
    def columns() -> tuple[str, ...]:
        return (
            "episode_id",
            "step",
            "observations",
            "actions",
            "rewards",
            "next_observations",
            "terminals",
            "timeouts",
        )

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def one_step_change(self, lo: int, hi: int) -> np.ndarray:
        """``next_observations − observations`` of rows lo..hi-1, in float64 (a block at a time: the
        whole column of changes is never built)."""
        return self.next_observations[lo:hi].astype(np.float64) - self.observations[lo:hi]

    def episode_bounds(self) -> IntArray:
        """Start offsets of each episode plus the total count: rows of episode k are [b[k], b[k+1])."""
        n = len(self)
        if n == 0:
            return np.zeros(1, np.int64)
        change = np.flatnonzero(np.diff(self.episode_id) != 0) + 1
        return np.concatenate([[0], change, [n]]).astype(np.int64)


def concat_transitions(parts: Sequence[Transitions]) -> Transitions:
    """Parts end to end, ids as they are (one part is returned as is: no copy)."""
    if len(parts) == 1:
        return parts[0]
    return Transitions(**{c: np.concatenate([getattr(t, c) for t in parts]) for c in Transitions.columns()})


@dataclass(frozen=True)
class Dataset:
    """A dataset held columnar (fast for millions of rows), with an episode view on demand.

    ``source`` says where it came from (for messages); ``notes`` are warnings met while reading it.
    """

    info: DatasetInfo
    transitions: Transitions
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def n_transitions(self) -> int:
        return len(self.transitions)

    @property
    def n_episodes(self) -> int:
        return len(self.transitions.episode_bounds()) - 1

    def episodes(self) -> tuple[Episode, ...]:
        return transitions_to_episodes(self.transitions)


def episodes_to_transitions(episodes: Sequence[Episode], first_id: int = 0) -> Transitions:
    """Flatten episodes to transitions; episode ids are ``first_id + index``."""
    if not episodes:
        raise ValueError("no episodes to flatten")
    lengths = np.array([e.length for e in episodes], np.int64)
    ids = np.repeat(np.arange(first_id, first_id + len(episodes), dtype=np.int64), lengths)
    steps = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    obs_dim = episodes[0].observations.shape[1:]
    act_dim = episodes[0].actions.shape[1:]
    return Transitions(
        episode_id=ids,
        step=steps,
        observations=np.concatenate([e.observations[:-1] for e in episodes]).reshape(-1, *obs_dim),
        actions=np.concatenate([e.actions for e in episodes]).reshape(-1, *act_dim),
        rewards=np.concatenate([e.rewards for e in episodes]).astype(np.float32, copy=False),
        next_observations=np.concatenate([e.observations[1:] for e in episodes]).reshape(-1, *obs_dim),
        terminals=np.concatenate([e.terminations for e in episodes]),
        timeouts=np.concatenate([e.truncations for e in episodes]),
    )


def transitions_to_episodes(t: Transitions) -> tuple[Episode, ...]:
    """Split transitions back into episodes (observations T+1 from obs + the last next_obs).

    Assumes ``t`` passed :func:`datasets.validation.validate_transitions` (contiguous episodes,
    next_observations[t] == observations[t+1] inside an episode).
    """
    return tuple(iter_episodes(t))


def iter_episodes(t: Transitions) -> Iterator[Episode]:
    """:func:`transitions_to_episodes` one episode at a time: only the episode being built is copied out
    of ``t`` (whose columns may be memory-mapped), so a consumer that streams holds one episode."""
    b = t.episode_bounds()
    for k in range(len(b) - 1):
        lo, hi = int(b[k]), int(b[k + 1])
        obs = np.concatenate([t.observations[lo:hi], t.next_observations[hi - 1 : hi]])
        yield Episode(
            observations=obs,
            actions=t.actions[lo:hi].copy(),
            rewards=t.rewards[lo:hi].copy(),
            terminations=t.terminals[lo:hi].copy(),
            truncations=t.timeouts[lo:hi].copy(),
        )
