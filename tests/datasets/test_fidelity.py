"""The simulator oracle: real data scores ~0, known perturbations score their size, clipped rows count."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_dataset, make_episode

from rlsynth.datasets import fidelity
from rlsynth.datasets.envs import env_info, make_env
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.fidelity import EvalConfig, MujocoOracle, NoOracleError, evaluate, plot, window_starts
from rlsynth.datasets.recipes import RecipeConfig, build
from rlsynth.datasets.types import Dataset, Episode, Transitions, episodes_to_transitions
from rlsynth.guidance.policies import GaussianPolicy

FAST = EvalConfig(horizons=(1, 4), windows=16)


@functools.cache
def real(env_id: str, n: int = 300, seed: int = 0) -> Dataset:
    return build(RecipeConfig("random", env_id, transitions=n, seed=seed, progress=False)).dataset


def hopper_with_clipped_rows() -> Dataset:
    """Real Hopper steps starting from states whose velocities exceed the ±10 observation clip."""
    env = make_env("Hopper-v5")
    u = env.unwrapped
    rng = np.random.default_rng(0)
    eps = []
    for k in range(3):
        env.reset(seed=k)
        qvel = u.data.qvel.copy()
        qvel[3 + k] = 11.0  # a joint spinning fast: observed as exactly 10
        u.set_state(u.data.qpos.copy(), qvel)
        obs = [np.float32(u._get_obs())]
        acts, rews, terms = [], [], []
        for _ in range(15):
            a = rng.uniform(-1, 1, 3).astype(np.float32)
            o, r, term, _, _ = u.step(a)
            obs.append(np.float32(o))
            acts.append(a)
            rews.append(r)
            terms.append(term)
            if term:
                break
        flags = np.zeros(len(acts), bool)
        flags[-1] = True
        eps.append(
            Episode(
                np.array(obs),
                np.array(acts),
                np.array(rews, np.float32),
                flags if terms[-1] else np.zeros(len(acts), bool),
                np.zeros(len(acts), bool) if terms[-1] else flags,
            )
        )
    return Dataset(
        env_info("Hopper-v5"), episodes_to_transitions([*real("Hopper-v5").episodes(), *eps]), "clipped"
    )


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Hopper-v5"])
def test_real_transitions_score_zero(env_id: str) -> None:
    r = evaluate(real(env_id), config=FAST)
    one = r["one_step"]
    assert one["rows"] + one["unrecoverable_rows"] == 300 and not r["sampled"]
    assert one["obs_mse_normalised"] <= 1e-8
    assert one["reward_mae"] <= 1e-4
    assert one["terminal_agreement"] == 1.0
    assert r["horizons"]["4"]["obs_mse_normalised"] <= 1e-6 and r["horizons"]["4"]["windows"] == 16


def test_rows_at_the_velocity_bound_are_counted_not_hidden() -> None:
    ds = hopper_with_clipped_rows()
    oracle = MujocoOracle("Hopper-v5")
    assert list(oracle.vel_bound) == [10.0] * 6  # found by probing, not hard-coded
    oracle.close()
    r = evaluate(ds, config=FAST)
    one = r["one_step"]
    assert one["unrecoverable_rows"] >= 3 and one["rows"] >= 300
    assert one["obs_mse_normalised"] <= 1e-8
    assert one["obs_mse_normalised_all_rows"] > 1e-6  # the clipped rows really cannot be restored
    assert one["terminal_agreement"] == 1.0


def test_a_perturbed_copy_scores_the_perturbation() -> None:
    ds = real("HalfCheetah-v5")
    t = ds.transitions
    std = t.observations.astype(np.float64).std(0)
    noise = np.random.default_rng(1).normal(size=t.next_observations.shape) * 0.1 * std
    cols = {c: getattr(t, c) for c in Transitions.columns()}
    cols["next_observations"] = (t.next_observations + noise).astype(np.float32)
    bad = Dataset(ds.info, Transitions(**cols), "perturbed")
    r = evaluate(bad, reference=ds, config=FAST)
    expected = float(
        (((cols["next_observations"].astype(np.float64) - t.next_observations) / std) ** 2).mean()
    )
    assert r["one_step"]["obs_mse_normalised"] == pytest.approx(expected, rel=1e-5)
    assert r["one_step"]["obs_mse_normalised"] == pytest.approx(0.01, rel=0.1)


def test_sampling_is_stated_and_seeded() -> None:
    cfg = EvalConfig(sample=50, horizons=(1,), windows=8, seed=3)
    a, b = evaluate(real("HalfCheetah-v5"), config=cfg), evaluate(real("HalfCheetah-v5"), config=cfg)
    assert a["sampled"] and a["evaluated_rows"] == 50 and a["total_rows"] == 300
    assert a["one_step"] == b["one_step"]


@pytest.mark.parametrize("env_id", ["Reacher-v5", "CartPole-v1"])
def test_env_without_oracle_is_a_clear_error(env_id: str) -> None:
    with pytest.raises(NoOracleError, match=f"no simulator oracle for '{env_id}'"):
        MujocoOracle(env_id)


def test_unknown_env_and_wrong_width_are_clear_errors() -> None:
    with pytest.raises(RlsynthError, match="cannot be made"):
        evaluate(real("HalfCheetah-v5"), env_id="Nope-v0")
    with pytest.raises(RlsynthError, match="do not fit 'Hopper-v5'"):
        evaluate(real("HalfCheetah-v5"), env_id="Hopper-v5")


def test_policy_log_likelihood_is_the_closed_form() -> None:
    ds = real("HalfCheetah-v5")
    t = ds.transitions
    w = torch.linspace(-0.5, 0.5, 17 * 6).reshape(17, 6)
    pol = GaussianPolicy(mean_fn=lambda o: torch.tanh(o @ w), std=torch.full((6,), 0.3))
    r = evaluate(ds, policy=pol, config=FAST)
    mu = np.tanh(t.observations.astype(np.float64) @ w.numpy().astype(np.float64))
    z = (t.actions - mu) / 0.3
    expected = float((-0.5 * z**2 - np.log(0.3) - 0.5 * np.log(2 * np.pi)).sum(1).mean())
    assert r["policy_log_likelihood"]["mean"] == pytest.approx(expected, rel=1e-5)
    assert r["policy_log_likelihood"]["per_action_dim"] == pytest.approx(expected / 6, rel=1e-5)


def test_novelty_and_coverage_against_a_reference() -> None:
    ref = real("HalfCheetah-v5", n=400, seed=0)
    same_dist = real("HalfCheetah-v5", n=400, seed=5)
    r = evaluate(same_dist, reference=ref, config=FAST)
    t = ref.transitions
    cols = {c: getattr(t, c) for c in Transitions.columns()}
    shift = 5 * np.concatenate([t.observations, t.actions], 1).std(0)
    cols["observations"] = (t.observations + shift[:17]).astype(np.float32)
    far = evaluate(Dataset(ref.info, Transitions(**cols), "shifted"), reference=ref, config=FAST)
    assert far["novelty"]["mean"] > 2 * r["novelty"]["mean"]
    assert far["coverage"] < r["coverage"]
    assert 0.0 <= far["coverage"] <= r["coverage"] <= 1.0


def old_nn_dist(query: np.ndarray, ref: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """The old search, kept as the oracle: each query chunk against the whole reference at once."""
    q, r = torch.as_tensor(query, dtype=torch.float32), torch.as_tensor(ref, dtype=torch.float32)
    out = [torch.cdist(q[lo : lo + chunk], r).min(1).values for lo in range(0, len(q), chunk)]
    return torch.cat(out).numpy().astype(np.float64)


def old_novelty_and_coverage(
    t: Transitions, ref: Transitions, n: int, rng: np.random.Generator
) -> dict[str, Any]:
    """The old implementation, kept as the oracle: whole float64 tables, dense blocks."""

    def feats(x: Transitions) -> np.ndarray:
        return np.concatenate([x.observations, x.actions], 1).astype(np.float64)

    ref_f = feats(ref)
    mu, sd = ref_f.mean(0), np.maximum(ref_f.std(0), 1e-6)
    ref_z, ds_z = (ref_f - mu) / sd, (feats(t) - mu) / sd
    q = ds_z[rng.choice(len(ds_z), size=min(n, len(ds_z)), replace=False)]
    perm = rng.permutation(len(ref_z))
    half = len(perm) // 2
    ref_a, ref_b = ref_z[perm[:half]], ref_z[perm[half:]]
    spacing = old_nn_dist(ref_a[:n], ref_b)
    novelty = old_nn_dist(q, ref_z)
    ref_q = ref_z[rng.choice(len(ref_z), size=min(n, len(ref_z)), replace=False)]
    cover = old_nn_dist(ref_q, ds_z) <= float(np.median(spacing))
    return {
        "novelty": {"mean": float(novelty.mean()), "median": float(np.median(novelty)), "rows": len(q)},
        "reference_spacing": {"mean": float(spacing.mean()), "median": float(np.median(spacing))},
        "coverage": float(cover.mean()),
    }


def random_rows(seed: int, lengths: tuple[int, ...], obs_dim: int = 11, act_dim: int = 3) -> Transitions:
    rng = np.random.default_rng(seed)
    eps = [make_episode(rng, n, i % 2 == 0, obs_dim, act_dim) for i, n in enumerate(lengths)]
    return episodes_to_transitions(eps)


@pytest.mark.parametrize("block", [40, 300, fidelity.NN_REF_BLOCK])
@pytest.mark.parametrize(
    ("ref_lengths", "ds_lengths", "n"),
    [
        ((500, 400, 600), (700, 650), 1100),  # several query blocks, the last one partial
        ((9, 11), (12, 18), 1100),  # references of at most 25 rows: cdist's direct path
        ((300, 200), (100,), 40),
        ((1000, 1033), (999, 1000, 1), 2000),  # the default query count; uneven block splits
    ],
)
def test_blocked_novelty_and_coverage_equal_the_dense_search(
    monkeypatch: pytest.MonkeyPatch,
    block: int,
    ref_lengths: tuple[int, ...],
    ds_lengths: tuple[int, ...],
    n: int,
) -> None:
    monkeypatch.setattr(fidelity, "NN_REF_BLOCK", block)
    ref, t = random_rows(0, ref_lengths), random_rows(1, ds_lengths)
    want = old_novelty_and_coverage(t, ref, n, np.random.default_rng(3))
    assert fidelity.novelty_and_coverage(t, ref, n, np.random.default_rng(3)) == want


@pytest.mark.parametrize("block", [1, 7, 64, fidelity.NN_REF_BLOCK])
@pytest.mark.parametrize("dims", [(1, 1), (11, 3), (17, 6)])
def test_feature_stats_equal_numpy_over_the_whole_table(
    monkeypatch: pytest.MonkeyPatch, block: int, dims: tuple[int, int]
) -> None:
    monkeypatch.setattr(fidelity, "NN_REF_BLOCK", block)
    t = random_rows(2, (90, 45, 120), *dims)
    table = np.concatenate([t.observations, t.actions], 1).astype(np.float64) * 37.0 + 1e3  # rounding-prone
    t = replace(t, observations=table[:, : dims[0]], actions=table[:, dims[0] :])
    mean, std = fidelity.feature_stats(t)
    np.testing.assert_array_equal(mean, table.mean(0))
    np.testing.assert_array_equal(std, np.maximum(table.std(0), 1e-6))


def test_nearest_distances_match_a_brute_force_search(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fidelity, "NN_REF_BLOCK", 50)
    rng = np.random.default_rng(4)
    q, r = rng.normal(size=(1300, 17)).astype(np.float32), rng.normal(size=(333, 17)).astype(np.float32)
    brute = np.sqrt(((q[:, None].astype(np.float64) - r[None]) ** 2).sum(-1)).min(1)
    blocks = (r[lo : lo + 50] for lo in range(0, len(r), 50))
    np.testing.assert_allclose(fidelity._nn_dist(q, blocks, len(r)), brute, rtol=1e-5, atol=1e-5)


def test_no_distance_block_spans_the_whole_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is bounded by the block: no cdist call sees more than NN_QUERY_BLOCK × 2·NN_REF_BLOCK pairs."""
    shapes: list[tuple[int, int]] = []
    cdist = torch.cdist

    def spy(x1: torch.Tensor, x2: torch.Tensor, **kw: Any) -> torch.Tensor:
        shapes.append((len(x1), len(x2)))
        return cdist(x1, x2, **kw)

    monkeypatch.setattr(fidelity, "NN_REF_BLOCK", 64)
    monkeypatch.setattr(torch, "cdist", spy)
    ref, t = random_rows(5, (900, 700)), random_rows(6, (800, 600))
    fidelity.novelty_and_coverage(t, ref, 1500, np.random.default_rng(0))
    assert max(a for a, _ in shapes) <= fidelity.NN_QUERY_BLOCK
    assert min(b for _, b in shapes) >= 64 and max(b for _, b in shapes) < 2 * 64


def test_window_starts_never_cross_episodes() -> None:
    t = hopper_with_clipped_rows().transitions
    for h in (1, 3, 10):
        for i in window_starts(t, h):
            assert t.episode_id[i] == t.episode_id[i + h - 1]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = plot(evaluate(real("HalfCheetah-v5"), config=FAST), tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("env_id", ["Walker2d-v5", "Ant-v5"])
def test_other_locomotion_envs_have_an_exact_oracle(env_id: str) -> None:
    r = evaluate(real(env_id, n=150), config=EvalConfig(horizons=(1,), windows=4))
    assert r["one_step"]["obs_mse_normalised"] <= 1e-8
    assert r["one_step"]["terminal_agreement"] == 1.0


def test_penetration_is_the_contact_depth_and_is_reported() -> None:
    oracle = MujocoOracle("Hopper-v5")
    oracle.env.reset(seed=0)
    obs = np.asarray(oracle.u._get_obs(), np.float64)
    depth = []
    for drop in (0.0, 0.08, 0.10, 0.13):  # obs[0] is the torso height: lowering it sinks the foot
        lowered = obs.copy()
        lowered[0] -= drop
        oracle.restore(lowered)
        depth.append(oracle.penetration())
    oracle.close()
    assert depth[0] == 0.0
    # Once the foot is in the floor, the depth grows one for one with the drop (a rigid body moved down).
    np.testing.assert_allclose(np.diff(depth[1:]), [0.02, 0.03], atol=1e-6)
    ds = real("Hopper-v5")
    one = evaluate(ds, config=FAST)["one_step"]
    assert one["penetration_over_5cm"] == 0.0
    t = ds.transitions
    cols = {c: getattr(t, c) for c in Transitions.columns()}
    cols["observations"] = t.observations.copy()
    cols["observations"][:, 0] -= 0.3  # every state sunk 30 cm: every row penetrates
    sunk = evaluate(Dataset(ds.info, Transitions(**cols), "sunk"), reference=ds, config=FAST)["one_step"]
    assert sunk["penetration_over_1cm"] == 1.0 and sunk["penetration_over_5cm"] == 1.0
    assert sunk["obs_mse_normalised_penetrating"] == pytest.approx(sunk["obs_mse_normalised"])


def test_linear_yardstick_is_zero_on_linear_dynamics_and_the_residual_variance_otherwise() -> None:
    """s' = A s + B a + c exactly gives 0; added noise of std σ per dimension gives σ² / std(s)²."""
    from rlsynth.datasets.fidelity import linear_step, linear_yardstick, reference_std

    rng = np.random.default_rng(0)
    n, o, k = 4000, 3, 2
    s = rng.normal(size=(n, o)).astype(np.float32)
    a = rng.normal(size=(n, k)).astype(np.float32)
    A, B = rng.normal(size=(o, o)) * 0.3, rng.normal(size=(k, o))
    clean = (s @ A + a @ B + 0.5).astype(np.float32)
    t = make_dataset(lengths=(n,)).transitions
    exact = replace(t, observations=s, actions=a, next_observations=clean)
    assert linear_yardstick(exact) < 1e-10
    np.testing.assert_allclose(linear_step(exact)(s[:5], a[:5]), clean[:5], atol=1e-4)
    noisy = replace(exact, next_observations=(clean + 0.1 * rng.normal(size=clean.shape)).astype(np.float32))
    expected = float((0.01 / reference_std(noisy) ** 2).mean())
    assert abs(linear_yardstick(noisy) - expected) < 0.1 * expected
