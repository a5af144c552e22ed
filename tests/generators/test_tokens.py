"""Token scales for slow observation dimensions (``step_scale``), in closed form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import SharedGenerator, tiny_generator

from rlsynth.datasets.types import Transitions
from rlsynth.generators.tokens import TokenLayout, step_scales


def slow_and_fast(n: int = 4000) -> Transitions:
    """Dim 0 drifts by ±0.01 per step over a wide range; dim 1 jumps (its change exceeds its spread)."""
    rng = np.random.default_rng(0)
    obs = np.stack([rng.uniform(-1, 1, n), rng.normal(size=n)], 1).astype(np.float32)
    nxt = np.stack([obs[:, 0] + rng.choice([-0.01, 0.01], n), rng.normal(size=n)], 1).astype(np.float32)
    flags = np.zeros(n, bool)
    flags[-1] = True
    return Transitions(
        episode_id=np.zeros(n, np.int64),
        step=np.arange(n, dtype=np.int32),
        observations=obs,
        actions=np.zeros((n, 1), np.float32),
        rewards=np.zeros(n, np.float32),
        next_observations=nxt,
        terminals=np.zeros(n, bool),
        timeouts=flags,
    )


def test_slow_dims_take_the_geometric_blend_of_value_and_step_spread() -> None:
    t = slow_and_fast()
    layout = TokenLayout(2, 1, np.array([-1.0]), np.array([1.0]))
    std = np.array([0.6, 1.0, 0.5, 2.0, 0.1], np.float32)  # obs 0, obs 1, action, reward, done
    delta0 = float((t.next_observations[:, 0].astype(np.float64) - t.observations[:, 0]).std())
    assert delta0 == pytest.approx(0.01, rel=1e-2)
    for alpha in (0.0, 0.5, 1.0):
        got = step_scales(layout, std, t, alpha)
        assert got[0] == pytest.approx(0.6 ** (1 - alpha) * delta0**alpha, rel=1e-5)
        np.testing.assert_array_equal(got[1:], std[1:])  # fast obs dim, action, reward, done: unchanged


def test_step_scale_outside_unit_interval_is_refused() -> None:
    layout = TokenLayout(2, 1, np.array([-1.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="step_scale"):
        step_scales(layout, np.ones(5, np.float32), slow_and_fast(10), 1.5)


def test_a_step_scaled_model_saves_its_scales_and_samples_in_raw_units(
    tmp_path: Path, shared_generator: SharedGenerator
) -> None:
    plain = shared_generator("trajectory", 5)
    scaled = tiny_generator("trajectory", tmp_path / "scaled", 5, step_scale=1.0)
    a, b = plain.norms["tokens"].std, scaled.norms["tokens"].std
    assert (b <= a + 1e-6).all() and (b < a).any()  # some Hopper dims are slow; none is scaled up
    np.testing.assert_array_equal(plain.norms["tokens"].mean, scaled.norms["tokens"].mean)
