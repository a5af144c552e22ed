"""Validation run on every import and every write.

Structural checks (T+1 alignment, ranks, dtypes) run per episode; value checks (finiteness, bounds,
end flags, next_observations continuity) run vectorised over the flat :class:`Transitions`, so a
million-row dataset validates in well under a second. The first problem found raises a
:class:`ValidationError` naming the source, the field and the episode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlsynth.datasets.errors import ValidationError
from rlsynth.datasets.types import DatasetInfo, Episode, Transitions, episodes_to_transitions

# Recorded actions sit on the bound up to float rounding (tanh-squashed policies, clipping in float64).
ACTION_BOUND_TOLERANCE = 1e-4


def _first_bad(mask: np.ndarray | np.bool_) -> int:
    return int(np.flatnonzero(mask)[0])


def validate_info(info: DatasetInfo, where: str) -> None:
    for name, space in (("observation_space", info.observation_space), ("action_space", info.action_space)):
        if len(space.shape) != 1 or space.dim < 1:
            raise ValidationError(
                f"only flat Box spaces are supported, got shape {space.shape}", where=where, field=name
            )


def validate_episode_structure(ep: Episode, info: DatasetInfo, where: str, index: int) -> None:
    """Ranks, T+1 alignment, dtypes and widths of one episode."""
    obs_dim, act_dim = info.observation_space.dim, info.action_space.dim
    if ep.observations.ndim != 2:
        raise ValidationError(
            f"expected shape (T+1, {obs_dim}), got {ep.observations.shape}",
            where=where,
            field="observations",
            episode=index,
        )
    if ep.actions.ndim != 2:
        raise ValidationError(
            f"expected shape (T, {act_dim}), got {ep.actions.shape}",
            where=where,
            field="actions",
            episode=index,
        )
    t = ep.actions.shape[0]
    if t < 1:
        raise ValidationError("episode has no steps", where=where, field="actions", episode=index)
    if ep.observations.shape[0] != t + 1:
        raise ValidationError(
            f"{ep.observations.shape[0]} observations for {t} actions; an episode needs T+1 observations",
            where=where,
            field="observations",
            episode=index,
        )
    for name in ("rewards", "terminations", "truncations"):
        a = getattr(ep, name)
        if a.shape != (t,):
            raise ValidationError(
                f"expected shape ({t},), got {a.shape}", where=where, field=name, episode=index
            )
    checks = (
        ("observations", ep.observations, np.float32, obs_dim),
        ("actions", ep.actions, np.float32, act_dim),
    )
    for name, a, dtype, dim in checks:
        if a.dtype != dtype:
            raise ValidationError(
                f"dtype {a.dtype}, expected {np.dtype(dtype)}", where=where, field=name, episode=index
            )
        if a.shape[1] != dim:
            raise ValidationError(
                f"width {a.shape[1]} does not match the space's {dim}", where=where, field=name, episode=index
            )
    if ep.rewards.dtype != np.float32:
        raise ValidationError(
            f"dtype {ep.rewards.dtype}, expected float32", where=where, field="rewards", episode=index
        )
    for name in ("terminations", "truncations"):
        if getattr(ep, name).dtype != np.bool_:
            raise ValidationError(
                f"dtype {getattr(ep, name).dtype}, expected bool", where=where, field=name, episode=index
            )


def validate_episodes(episodes: Sequence[Episode], info: DatasetInfo, where: str) -> None:
    """Full validation of an episode list: structure per episode, then values over the flat view."""
    validate_info(info, where)
    if not episodes:
        raise ValidationError("dataset has no episodes", where=where)
    for i, ep in enumerate(episodes):
        validate_episode_structure(ep, info, where, i)
    validate_transitions(episodes_to_transitions(episodes), info, where)


def validate_transitions(t: Transitions, info: DatasetInfo, where: str) -> None:
    """Value checks over the flat view. Episode numbers in messages are the rows' ``episode_id``."""
    validate_info(info, where)
    n = len(t)
    if n == 0:
        raise ValidationError("dataset has no transitions", where=where)
    obs_dim, act_dim = info.observation_space.dim, info.action_space.dim
    _check_columns(t, n, obs_dim, act_dim, where)
    ep = t.episode_id
    _check_finite(t, where)
    _check_action_bounds(t, info, where)

    starts = np.ones(n, bool)
    starts[1:] = ep[1:] != ep[:-1]
    ids_at_starts = ep[starts]
    if np.unique(ids_at_starts).size != ids_at_starts.size:
        uniq, counts = np.unique(ids_at_starts, return_counts=True)
        dup = int(uniq[counts > 1][0])
        raise ValidationError("episode rows are not contiguous", where=where, field="episode_id", episode=dup)
    expected_step = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    if not np.array_equal(t.step, expected_step):
        i = _first_bad(t.step != expected_step)
        raise ValidationError(
            f"step {int(t.step[i])} where {int(expected_step[i])} was expected",
            where=where,
            field="step",
            episode=int(ep[i]),
        )
    ends = np.ones(n, bool)
    ends[:-1] = starts[1:]
    flagged = t.terminals | t.timeouts
    early = flagged & ~ends
    if early.any():
        i = _first_bad(early)
        name = "terminals" if t.terminals[i] else "timeouts"
        raise ValidationError(
            f"end flag at step {int(t.step[i])} before the episode's last step",
            where=where,
            field=name,
            episode=int(ep[i]),
        )
    unended = ends & ~flagged
    if unended.any():
        i = _first_bad(unended)
        raise ValidationError(
            "episode's last step has neither a terminal nor a timeout flag",
            where=where,
            field="terminals",
            episode=int(ep[i]),
        )
    inside = ~ends[:-1]
    gap = inside & np.any(t.next_observations[:-1] != t.observations[1:], axis=1)
    if gap.any():
        i = _first_bad(gap)
        raise ValidationError(
            f"next_observations at step {int(t.step[i])} differs from the observation at step "
            f"{int(t.step[i]) + 1}",
            where=where,
            field="next_observations",
            episode=int(ep[i]),
        )


def _check_columns(t: Transitions, n: int, obs_dim: int, act_dim: int, where: str) -> None:
    expected: dict[str, tuple[tuple[int, ...], type]] = {
        "episode_id": ((n,), np.int64),
        "step": ((n,), np.int32),
        "observations": ((n, obs_dim), np.float32),
        "actions": ((n, act_dim), np.float32),
        "rewards": ((n,), np.float32),
        "next_observations": ((n, obs_dim), np.float32),
        "terminals": ((n,), np.bool_),
        "timeouts": ((n,), np.bool_),
    }
    for name, (shape, dtype) in expected.items():
        a = getattr(t, name)
        if a.shape != shape:
            raise ValidationError(f"shape {a.shape}, expected {shape}", where=where, field=name)
        if a.dtype != dtype:
            raise ValidationError(f"dtype {a.dtype}, expected {np.dtype(dtype)}", where=where, field=name)


def _check_finite(t: Transitions, where: str) -> None:
    for name in ("observations", "actions", "rewards", "next_observations"):
        a = getattr(t, name)
        bad = ~np.isfinite(a)
        if bad.any():
            rows = bad.reshape(len(t), -1).any(axis=1)
            i = _first_bad(rows)
            raise ValidationError(
                f"non-finite value at step {int(t.step[i])}",
                where=where,
                field=name,
                episode=int(t.episode_id[i]),
            )


def _check_action_bounds(t: Transitions, info: DatasetInfo, where: str) -> None:
    low, high = info.action_space.low, info.action_space.high
    span = np.where(np.isfinite(high - low), high - low, 1.0)
    tol = ACTION_BOUND_TOLERANCE * np.maximum(span, 1.0)
    bad = (t.actions < low - tol) | (t.actions > high + tol)
    if bad.any():
        rows = bad.any(axis=1)
        i = _first_bad(rows)
        j = _first_bad(bad[i])
        raise ValidationError(
            f"action[{j}] = {float(t.actions[i, j]):.6g} at step {int(t.step[i])} is outside the "
            "action space "
            f"[{float(low[j]):.6g}, {float(high[j]):.6g}]",
            where=where,
            field="actions",
            episode=int(t.episode_id[i]),
        )
