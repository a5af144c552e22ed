"""Recipes build valid D4RL-style datasets from the real simulator, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_transitions

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.recipes import RecipeConfig, build
from rlsynth.datasets.validation import validate_transitions


def test_random_recipe_is_valid_and_seeded() -> None:
    cfg = RecipeConfig("random", "Hopper-v5", transitions=400, seed=3, progress=False)
    a, b = build(cfg), build(cfg)
    assert a.dataset.n_transitions == 400 and a.agent is None
    validate_transitions(a.dataset.transitions, a.dataset.info, "test")
    assert_same_transitions(a.dataset, b.dataset)
    eps = a.dataset.episodes()
    assert all(e.terminated for e in eps[:-1]) and eps[-1].truncated  # Hopper falls; the budget cuts the last
    c = build(RecipeConfig("random", "Hopper-v5", transitions=400, seed=4, progress=False))
    assert not np.array_equal(c.dataset.transitions.actions, a.dataset.transitions.actions)


def test_recorded_transitions_obey_the_simulator() -> None:
    """Replaying a recorded episode's actions from its start state reproduces its observations."""
    from rlsynth.datasets.envs import make_env

    ds = build(RecipeConfig("random", "HalfCheetah-v5", transitions=50, seed=0, progress=False)).dataset
    ep = ds.episodes()[0]
    env = make_env("HalfCheetah-v5")
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(np.float32(obs), ep.observations[0])
    for t in range(ep.length):
        obs, r, *_ = env.step(ep.actions[t])
        np.testing.assert_allclose(np.float32(obs), ep.observations[t + 1], rtol=0, atol=1e-6)
        assert np.float32(r) == pytest.approx(ep.rewards[t], abs=1e-5)


def test_sac_recipes_record_every_step_and_return_the_agent() -> None:
    replay = build(
        RecipeConfig(
            "sac-medium-replay", "Hopper-v5", steps=300, warmup_steps=100, batch_size=32, progress=False
        )
    )
    assert replay.dataset.n_transitions == 300 and replay.agent is not None
    medium = build(
        RecipeConfig(
            "sac-medium",
            "Hopper-v5",
            steps=200,
            transitions=120,
            warmup_steps=50,
            batch_size=32,
            progress=False,
        )
    )
    assert medium.dataset.n_transitions == 120
    assert medium.details["training"]["transitions"] == 200
    acts = medium.dataset.transitions.actions
    assert np.all(np.abs(acts) <= 1.0 + 1e-6)


def test_target_return_stops_training_early() -> None:
    res = build(
        RecipeConfig(
            "sac-medium-replay",
            "Hopper-v5",
            steps=2000,
            warmup_steps=400,
            batch_size=16,
            target_return=-1e9,
            progress=False,
        )
    )
    # Five episodes must finish before the rolling mean exists; random Hopper episodes last ~20 steps.
    # It stops right after the fifth, so no episode is cut by the budget.
    assert res.details["episodes"] == 5 and res.dataset.n_transitions < 400
    assert all(e.terminated for e in res.dataset.episodes())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recipe": "expert"}, "unknown recipe 'expert'"),
        ({"transitions": 0}, "transitions must be positive"),
        ({"env_id": "NoSuchEnv-v1"}, "cannot be made"),
    ],
)
def test_bad_recipe_configs_are_clear_errors(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "recipe": "random",
        "env_id": "Hopper-v5",
        "transitions": 10,
        "progress": False,
    }
    with pytest.raises(RlsynthError, match=message):
        build(RecipeConfig(**{**base, **kwargs}))  # type: ignore[arg-type]
