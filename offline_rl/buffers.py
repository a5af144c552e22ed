"""d3rlpy replay buffers built from rlsynth datasets, with every transition kept and aligned.

d3rlpy stores one observation per step and derives ``next_observation[t]`` from ``observations[t+1]``;
for an episode that did not terminate it therefore drops the last step (it has no successor row).
rlsynth knows that successor (the episode's T+1-th observation), so a truncated episode is handed to
d3rlpy with one padding step appended: the final observation, a copy of the last action and a zero
reward. d3rlpy counts ``size - 1`` transitions for such an episode, so the padding step is never sampled
as a transition and every real transition, the last one included, has its true next observation.
(``d3rlpy.datasets.get_minari`` instead misaligns observations after the first episode; see ECOSYSTEM.md.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlsynth.datasets.d3rlpy_setup import import_d3rlpy
from rlsynth.datasets.types import Dataset, Episode


def to_d3rlpy_episode(e: Episode) -> Any:
    d3rlpy = import_d3rlpy()

    if e.terminated:
        # The successor of a terminal step is never used (d3rlpy zeroes it and masks the bootstrap).
        return d3rlpy.dataset.Episode(
            observations=np.asarray(e.observations[:-1]),
            actions=np.asarray(e.actions),
            rewards=np.asarray(e.rewards).reshape(-1, 1),
            terminated=True,
        )
    return d3rlpy.dataset.Episode(
        observations=np.asarray(e.observations),
        actions=np.concatenate([e.actions, e.actions[-1:]]),
        rewards=np.concatenate([e.rewards, np.zeros(1, np.float32)]).reshape(-1, 1),
        terminated=False,
    )


def to_replay_buffer(dataset: Dataset) -> Any:
    """A ``d3rlpy.dataset.ReplayBuffer`` holding exactly the dataset's transitions."""
    d3rlpy = import_d3rlpy()

    episodes = [to_d3rlpy_episode(e) for e in dataset.episodes()]
    return d3rlpy.dataset.ReplayBuffer(
        d3rlpy.dataset.InfiniteBuffer(),
        episodes=episodes,
        action_space=d3rlpy.constants.ActionSpace.CONTINUOUS,
        action_size=dataset.info.action_space.dim,
    )


def buffer_transitions(buffer: Any) -> dict[str, np.ndarray]:
    """Every transition of a d3rlpy buffer, in storage order, as flat arrays (used to check alignment)."""
    picker = buffer.transition_picker
    rows = [picker(ep, i) for ep, i in (buffer.buffer[k] for k in range(buffer.transition_count))]
    return {
        "observations": np.stack([np.asarray(r.observation) for r in rows]),
        "actions": np.stack([r.action for r in rows]),
        "rewards": np.array([float(np.asarray(r.reward).reshape(-1)[0]) for r in rows], np.float32),
        "next_observations": np.stack([np.asarray(r.next_observation) for r in rows]),
        "terminals": np.array([r.terminal for r in rows], bool),
    }
