"""Training data in bounded memory: windows read by index from flat tokens (the same windows, statistics
and trained weights as materialising every window, in memory that grows with the transitions only), and
transition features without float64 copies (the same values)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dataset
from torch import nn

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset, Episode, Transitions
from rlsynth.generators import diffusion, families, tokens
from rlsynth.generators.autoregressive import AutoregressiveConfig, Drafter
from rlsynth.generators.checkpoint import Normaliser
from rlsynth.generators.diffusion import (
    TrajectoryConfig,
    TrajectoryDiffusion,
    TransitionConfig,
    transition_features,
)
from rlsynth.generators.tokens import (
    TokenLayout,
    WindowStore,
    episode_tokens,
    flat_tokens,
    window_normaliser,
    windows,
)
from rlsynth.generators.training import TrainConfig, rows_of, train

# Terminated and truncated episodes alternate; some are shorter than the horizon (a truncated one of them
# yields no window, a terminated one yields windows into its absorbing padding).
LENGTHS = (40, 7, 33, 1, 16, 25, 3, 60, 12)


def materialised_windows(
    layout: TokenLayout, episodes: tuple[Episode, ...], horizon: int, stride: int = 1
) -> np.ndarray:
    """The old way, kept as the oracle: every window stacked (N, H, D) from per-episode tokens."""
    out = []
    for e in episodes:
        tok = episode_tokens(layout, e, pad=horizon - 1)
        last_start = e.length - 1 if e.terminated else e.length - horizon
        for s in range(0, last_start + 1, stride):
            out.append(tok[s : s + horizon])
    if not out:
        return np.zeros((0, horizon, layout.dim), np.float32)
    return np.stack(out).astype(np.float32)


def materialised_data(ds: Dataset, horizon: int, stride: int) -> tuple[Normaliser, dict[str, torch.Tensor]]:
    """The old training data: statistics over the stacked windows, then all of them normalised."""
    w = materialised_windows(families.layout_of(ds.info), ds.episodes(), horizon, stride)
    norm = Normaliser.fit(w.reshape(-1, w.shape[-1]))
    return norm, {"x": norm.normalise(torch.from_numpy(w))}


def layout_of(ds: Dataset) -> TokenLayout:
    return families.layout_of(ds.info)


@pytest.mark.parametrize(("horizon", "stride"), [(1, 1), (4, 1), (8, 1), (8, 3), (16, 5)])
def test_store_windows_equal_the_materialised_windows(horizon: int, stride: int) -> None:
    ds = make_dataset(1, LENGTHS)
    flat = flat_tokens(layout_of(ds), ds.transitions, horizon, stride)
    want = materialised_windows(layout_of(ds), ds.episodes(), horizon, stride)
    got = flat.tokens[flat.starts[:, None] + np.arange(horizon)]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(windows(layout_of(ds), ds.episodes(), horizon, stride), want)


def test_unbounded_action_dims_are_tokenised_as_before() -> None:
    ds = make_dataset(2, LENGTHS)
    layout = TokenLayout(11, 3, np.array([-1.0, -np.inf, -2.0]), np.array([1.0, np.inf, 0.5]))
    flat = flat_tokens(layout, ds.transitions, 8)
    want = materialised_windows(layout, ds.episodes(), 8)
    np.testing.assert_array_equal(flat.tokens[flat.starts[:, None] + np.arange(8)], want)


@pytest.mark.parametrize(("horizon", "stride"), [(1, 1), (8, 1), (8, 3), (32, 1)])
def test_window_weighted_statistics_equal_those_of_the_materialised_windows(
    horizon: int, stride: int
) -> None:
    ds = make_dataset(3, LENGTHS * 3)
    flat = flat_tokens(layout_of(ds), ds.transitions, horizon, stride)
    want, _ = materialised_data(ds, horizon, stride)
    got = window_normaliser(flat)
    np.testing.assert_array_equal(got.mean, want.mean)
    np.testing.assert_array_equal(got.std, want.std)
    counts = flat.window_counts()
    assert counts.sum() == len(flat.starts) * horizon and counts.max() <= horizon


def test_the_store_gathers_the_normalised_windows_by_index() -> None:
    ds = make_dataset(4, LENGTHS)
    norm, data = materialised_data(ds, 8, 1)
    store = WindowStore.normalised(flat_tokens(layout_of(ds), ds.transitions, 8), norm)
    assert len(store) == len(data["x"])
    idx = torch.tensor([0, 5, 5, len(store) - 1, 2])
    assert torch.equal(store.index(idx), data["x"][idx])


def test_too_few_windows_is_a_clear_error() -> None:
    ds = make_dataset(5, (3, 4))  # terminated length 3 (3 windows), truncated 4 < H (none)
    with pytest.raises(RlsynthError, match="fewer than 2 windows"):
        families.window_data(make_dataset(5, (1,)), 8, 1)
    assert len(families.window_data(ds, 8, 1)[1]["x"]) == 3


TRAIN = TrainConfig(
    steps=12,
    batch_size=16,
    warmup_steps=2,
    eval_every=5,
    checkpoint_every=5,
    ema_decay=0.9,
    progress=False,
    threads=1,
)


def trajectory_model(layout: TokenLayout) -> nn.Module:
    return TrajectoryDiffusion(layout, TrajectoryConfig(horizon=8, channels=(8, 16), emb=16))


def drafter_model(layout: TokenLayout) -> nn.Module:
    return Drafter(layout, AutoregressiveConfig(horizon=8, width=16, depth=1, heads=2))


@pytest.mark.parametrize("build", [trajectory_model, drafter_model])
@pytest.mark.parametrize("stride", [1, 3])
def test_training_on_the_store_is_bit_identical_to_the_materialised_windows(
    tmp_path: Path, build: Callable[[TokenLayout], nn.Module], stride: int
) -> None:
    ds = make_dataset(6, LENGTHS)
    old_norm, old_data = materialised_data(ds, 8, stride)
    norms, new_data = families.window_data(ds, 8, stride)
    np.testing.assert_array_equal(norms["tokens"].mean, old_norm.mean)
    np.testing.assert_array_equal(norms["tokens"].std, old_norm.std)
    results, weights = [], []
    for name, data in (("old", old_data), ("new", new_data)):
        torch.manual_seed(0)
        model = build(layout_of(ds))
        results.append(train(model, data, TRAIN, tmp_path / name))
        weights.append(model.state_dict())
    assert results[0].history == results[1].history and results[0].val_loss == results[1].val_loss
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


def old_transition_features(layout: TokenLayout, t: Transitions) -> np.ndarray:
    """The old way, kept as the oracle: a float64 table of all columns, then cast."""
    parts = [t.observations, layout.encode_actions(t.actions), t.rewards[:, None], t.next_observations]
    return np.concatenate([*parts, t.terminals[:, None].astype(np.float64)], 1).astype(np.float32)


def test_transition_features_and_their_normalisation_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diffusion, "BLOCK_ROWS", 7)  # several blocks, the last one partial
    ds = make_dataset(7, LENGTHS)
    mixed = TokenLayout(11, 3, np.array([-1.0, -np.inf, -2.0]), np.array([1.0, np.inf, 0.5]))
    for layout in (mixed, layout_of(ds)):
        got = transition_features(layout, ds.transitions)
        np.testing.assert_array_equal(got, old_transition_features(layout, ds.transitions))
    want = old_transition_features(layout_of(ds), ds.transitions)
    _, data = families.FAMILIES["transition"].prepare(ds, TransitionConfig())
    assert torch.equal(
        rows_of(data["x"], torch.arange(len(want))), Normaliser.fit(want).normalise(torch.from_numpy(want))
    )


def hopper_shaped(n: int, episode: int = 1000) -> Transitions:
    """n Hopper-shaped transitions in episodes of ``episode`` steps, every other one terminated."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 11)).astype(np.float32)
    ids = np.arange(n) // episode
    last = np.r_[ids[1:] != ids[:-1], True]
    return Transitions(
        episode_id=ids.astype(np.int64),
        step=(np.arange(n) % episode).astype(np.int32),
        observations=obs,
        actions=rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        next_observations=np.roll(obs, -1, 0),
        terminals=last & (ids % 2 == 0),
        timeouts=last & (ids % 2 == 1),
    )


def window_data_peak(n: int, horizon: int = 32) -> int:
    """Bytes allocated at the peak of preparing the windows of ``n`` transitions (the data excluded)."""
    t = hopper_shaped(n)
    layout = TokenLayout(11, 3, -np.ones(3), np.ones(3))
    tracemalloc.start()
    try:
        flat = flat_tokens(layout, t, horizon)
        store = WindowStore.normalised(flat, window_normaliser(flat))
        store.index(torch.arange(256))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Truncated episodes (every other one of 1000 steps) have H−1 fewer window starts than steps.
    assert len(store) == n - (n // 2000) * (horizon - 1)
    return peak


def test_window_data_memory_grows_with_the_transitions_not_the_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Materialising H = 32 windows cost about 19 KB per transition (float64 and float32 copies of every
    window); the store holds each token once (64 B for Hopper) plus its start row and, while the
    statistics are taken, its window count. Small blocks at both sizes: their fixed cost cancels in the
    slope."""
    monkeypatch.setattr(tokens, "BLOCK_ROWS", 4096)
    small, large = 50_000, 150_000
    per_transition = (window_data_peak(large) - window_data_peak(small)) / (large - small)
    assert per_transition < 128, f"{per_transition:.0f} B per transition"


@pytest.mark.parametrize("rows", [1, 7, 1 << 16, (1 << 16) * 2 + 3])
def test_normaliser_fit_in_blocks_equals_the_whole_array_statistics(rows: int) -> None:
    from rlsynth.generators.checkpoint import BLOCK_ROWS

    x = np.random.default_rng(rows).normal(3.0, 2.0, (rows, 5)).astype(np.float32)
    got = Normaliser.fit(x)
    x64 = x.astype(np.float64)
    want_mean, want_std = x64.mean(0).astype(np.float32), np.maximum(x64.std(0), 1e-6).astype(np.float32)
    if rows <= BLOCK_ROWS:  # one block: numpy's own sums, bit for bit
        np.testing.assert_array_equal(got.mean, want_mean)
        np.testing.assert_array_equal(got.std, want_std)
    else:  # blocks change only the order of float64 additions
        np.testing.assert_allclose(got.mean, want_mean, rtol=1e-6)
        np.testing.assert_allclose(got.std, want_std, rtol=1e-6)
