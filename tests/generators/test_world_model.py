"""The world-model baseline: trains on a tiny real dataset, rolls out from real states, deterministically."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_transitions

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.recipes import RecipeConfig, build
from rlsynth.datasets.types import Dataset
from rlsynth.datasets.validation import validate_transitions
from rlsynth.generators import checkpoint, world_model
from rlsynth.generators.api import LoadedGenerator, SampleOptions, load_generator, sample, train_generator
from rlsynth.generators.checkpoint import CheckpointError, checkpoint_hash
from rlsynth.generators.world_model import (
    BUCKET_ROWS,
    EnsembleLinear,
    StepOutput,
    WorldModel,
    WorldModelConfig,
    WorldModelNormalisers,
    member_buckets,
    model_step,
)


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


# --- evaluating only the member each row uses, against the whole ensemble's evaluation -----------------


@torch.no_grad()
def whole_ensemble_step(
    model: WorldModel,
    norms: WorldModelNormalisers,
    obs: torch.Tensor,
    act: torch.Tensor,
    member: torch.Tensor,
    noise: torch.Tensor | None,
) -> StepOutput:
    """:func:`model_step` as it was: every member evaluates every row, then each row keeps its own."""
    x = torch.cat([norms.obs.normalise(obs), norms.act.normalise(act)], 1)
    mean, logvar, logit = model(x.unsqueeze(0).expand(model.cfg.ensemble, -1, -1))
    rows = torch.arange(x.shape[0], device=x.device)
    mu, lv, lg = mean[member, rows], logvar[member, rows], logit[member, rows]
    z = mu if noise is None else mu + torch.exp(0.5 * lv) * noise
    o = model.obs_dim
    next_obs = obs + norms.delta.denormalise(z[:, :o])
    reward = norms.reward.denormalise(z[:, o:]).squeeze(1)
    bound = model.cfg.divergence_bound
    diverged = ~torch.isfinite(next_obs).all(1) | (norms.obs.normalise(next_obs).abs() > bound).any(1)
    return StepOutput(next_obs, reward, torch.sigmoid(lg) > 0.5, diverged)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n torch threads: bit-identity needs each thread's share of an elementwise op to fill whole
    vectors in the whole ensemble's tensors too, true at 1, 2, 4 or 8 threads, not at 3 (see BUCKET_ROWS)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_member_buckets_place_every_row_once() -> None:
    member = torch.tensor([3, 0, 3, 3, 1, 0, 3])
    used, rows, bucket, slot = member_buckets(member)
    assert used.tolist() == [0, 1, 3]
    assert rows.shape == (3, BUCKET_ROWS)
    # Each row sits in its member's bucket, in order; the padding repeats row 0.
    assert rows[bucket, slot].tolist() == list(range(7))
    assert rows[2, :4].tolist() == [0, 2, 3, 6] and rows[0, :2].tolist() == [1, 5]
    assert (used[bucket] == member).all()
    assert member_buckets(torch.zeros(BUCKET_ROWS + 1, dtype=torch.long))[1].shape == (1, 2 * BUCKET_ROWS)


@pytest.mark.parametrize(
    "cfg",
    [
        WorldModelConfig(ensemble=3, elites=2, hidden=16, layers=1),
        WorldModelConfig(),  # cpu-small's ensemble: 5 members, 4 elites, 3 layers of 200
    ],
)
@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_model_step_evaluating_only_the_used_members_is_bit_identical(
    cfg: WorldModelConfig, noise: bool, threads: int
) -> None:
    torch.manual_seed(0)
    data = tiny_data()
    model = WorldModel(data.info.observation_space.dim, data.info.action_space.dim, cfg)
    model.elite_idx.copy_(torch.arange(cfg.ensemble)[-cfg.elites :])  # members from 1 on
    norms = WorldModelNormalisers.fit(data.transitions)
    t = data.transitions
    rows = np.random.default_rng(0).choice(len(t), 256)  # one rollout chunk
    obs, act = torch.as_tensor(t.observations[rows]), torch.as_tensor(t.actions[rows])
    for k in range(4):
        g = torch.Generator().manual_seed(k)
        member = model.elite_idx[torch.randint(cfg.elites, (256,), generator=g)]
        z = torch.randn((256, model.out_dim), generator=g) if noise else None
        with torch_threads(threads):
            new = model_step(model, norms, obs, act, member, z)
            old = whole_ensemble_step(model, norms, obs, act, member, z)
        for field in ("next_obs", "reward", "terminal", "diverged"):
            assert torch.equal(getattr(new, field), getattr(old, field)), field
        obs = new.next_obs


def test_rollouts_are_those_of_the_whole_ensemble_evaluation(
    gen: LoadedGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same seeds, same content: the trained cpu-small-shaped ensemble, replayed and policy-driven actions.
    runs = []
    for step in (model_step, whole_ensemble_step):
        monkeypatch.setattr(world_model, "model_step", step)
        with torch_threads(2):
            replay = sample_world_model(gen, tiny_data(), 600, seed=5, horizon=12)
            driven = sample_world_model(
                gen, tiny_data(), 300, seed=6, horizon=8, policy=lambda o: 0.3 * torch.tanh(o[:, :6])
            )
        runs.append((replay, driven))
    for a, b in zip(*runs, strict=True):
        assert_same_transitions(a, b)


def test_training_tensors_equal_normalising_whole_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built in blocks (and file-backed when memory is short), the tables hold exactly what normalising
    the whole columns at once gives."""
    t = tiny_data().transitions
    for module in (world_model, checkpoint):
        monkeypatch.setattr(module, "BLOCK_ROWS", 128)  # several blocks, a ragged last one
    norms = WorldModelNormalisers.fit(t)
    delta64 = t.next_observations.astype(np.float64) - t.observations
    whole = np.concatenate([delta64.mean(0)[None], delta64.std(0)[None]])
    assert np.array_equal(norms.delta.mean, whole[0].astype(np.float32))
    assert np.array_equal(norms.delta.std, np.maximum(whole[1], 1e-6).astype(np.float32))
    got = world_model.training_tensors(t, norms)
    obs, act = torch.from_numpy(t.observations.copy()), torch.from_numpy(t.actions.copy())
    delta = torch.as_tensor(delta64, dtype=torch.float32)
    rew = torch.from_numpy(t.rewards.copy())[:, None]
    x = torch.cat([norms.obs.normalise(obs), norms.act.normalise(act)], 1)
    y = torch.cat([norms.delta.normalise(delta), norms.reward.normalise(rew)], 1)
    assert torch.equal(got["x"], x) and torch.equal(got["y"], y)
    assert torch.equal(got["terminal"], torch.from_numpy(t.terminals.astype(np.float32)))


def test_member_mse_in_blocks_matches_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = WorldModel(5, 2, WorldModelConfig(hidden=16, layers=2, ensemble=4, elites=2))
    x, y = torch.randn(1000, 7), torch.randn(1000, 6)
    with torch.no_grad():
        mean, _, _ = model(x.unsqueeze(0).expand(4, -1, -1))
        whole = ((mean - y) ** 2).double().mean(dim=(1, 2))
    monkeypatch.setattr(world_model, "MSE_ROWS", 300)  # three full blocks and a ragged one
    got = model.member_mse(x, y)
    assert got.dtype == torch.float64 and not got.requires_grad
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=0.0)
    assert model.select_elites(x, y) == sorted(torch.argsort(whole)[:2].tolist())
