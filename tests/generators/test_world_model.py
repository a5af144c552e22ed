"""The world-model baseline: trains on a tiny real dataset, rolls out from real states, deterministically."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.recipes import RecipeConfig, build
from rlsynth.datasets.types import Dataset
from rlsynth.datasets.validation import validate_transitions
from rlsynth.generators.api import LoadedGenerator, SampleOptions, load_generator, sample, train_generator
from rlsynth.generators.checkpoint import CheckpointError, checkpoint_hash
from rlsynth.generators.world_model import EnsembleLinear, WorldModel, WorldModelConfig


@functools.cache
def tiny_data() -> Dataset:
    return build(RecipeConfig("random", "HalfCheetah-v5", transitions=600, seed=0, progress=False)).dataset


@functools.cache
def trained(root: str) -> LoadedGenerator:
    out = Path(root) / "wm"
    train_generator("world-model", tiny_data(), out, steps=150, seed=0, progress=False)
    return load_generator(out, device="cpu")


def sample_world_model(
    gen: LoadedGenerator, src: Dataset, n: int, seed: int = 0, horizon: int = 32, policy: object = None
) -> Dataset:
    return sample(gen, src, n, SampleOptions(seed=seed, horizon=horizon, policy=policy))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> LoadedGenerator:
    return trained(str(tmp_path_factory.mktemp("wm")))


def test_ensemble_linear_is_independent_per_member() -> None:
    layer = EnsembleLinear(3, 4, 2)
    x = torch.randn(3, 5, 4)
    out = layer(x)
    for e in range(3):
        torch.testing.assert_close(out[e], x[e] @ layer.weight[e] + layer.bias[e])


def test_logvar_stays_within_learned_bounds() -> None:
    m = WorldModel(4, 2, WorldModelConfig(ensemble=2, elites=1, hidden=8, layers=1))
    _, logvar, _ = m(1e3 * torch.randn(2, 7, 6))
    # Soft bounds (PETS): exact up to softplus(max - min) ≈ e^-(max-min) above the maximum.
    assert (logvar <= m.max_logvar + 1e-4).all() and (logvar >= m.min_logvar - 1e-6).all()


def test_training_writes_a_complete_checkpoint(gen: LoadedGenerator) -> None:
    files = {p.name for p in gen.folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "normaliser.json",
        "state.safetensors",
        "state.json",
        "train.json",
        "loss.png",
    } <= files
    assert not any(name.endswith((".pt", ".pkl", ".pth")) for name in files)
    assert len(gen.model.elite_idx) == 4
    assert checkpoint_hash(gen.folder).startswith("sha256:")


def test_rollouts_are_valid_and_start_from_real_states(gen: LoadedGenerator) -> None:
    src = tiny_data()
    ds = sample_world_model(gen, src, 300, seed=1, horizon=10)
    t = ds.transitions
    assert len(t) == 300
    validate_transitions(t, ds.info, "test")
    starts = ds.transitions.observations[t.step == 0]
    real = {r.tobytes() for r in src.transitions.observations}
    assert all(s.tobytes() in real for s in starts)
    assert max(e.length for e in ds.episodes()) <= 10


def test_replayed_actions_are_the_datas(gen: LoadedGenerator) -> None:
    src = tiny_data().transitions
    ds = sample_world_model(gen, tiny_data(), 50, seed=2, horizon=5)
    first = ds.episodes()[0]
    row = next(i for i in range(len(src)) if np.array_equal(src.observations[i], first.observations[0]))
    np.testing.assert_array_equal(first.actions, src.actions[row : row + first.length])


def test_sampling_is_seeded(gen: LoadedGenerator) -> None:
    a = sample_world_model(gen, tiny_data(), 200, seed=3, horizon=8).transitions
    b = sample_world_model(gen, tiny_data(), 200, seed=3, horizon=8).transitions
    c = sample_world_model(gen, tiny_data(), 200, seed=4, horizon=8).transitions
    np.testing.assert_array_equal(a.observations, b.observations)
    assert not np.array_equal(a.observations, c.observations)


def test_a_policy_can_drive_the_rollouts(gen: LoadedGenerator) -> None:
    ds = sample_world_model(
        gen, tiny_data(), 100, seed=0, horizon=6, policy=lambda o: torch.full((len(o), 6), 0.25)
    )
    np.testing.assert_allclose(ds.transitions.actions, 0.25)


def test_bad_requests_are_clear_errors(gen: LoadedGenerator, tmp_path: Path) -> None:
    with pytest.raises(RlsynthError, match="no episode with 5000 steps"):
        sample_world_model(gen, tiny_data(), 10, horizon=5000)
    with pytest.raises(CheckpointError, match="no such generator folder"):
        load_generator(tmp_path / "none")
    (tmp_path / "broken").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_generator(tmp_path / "broken")
