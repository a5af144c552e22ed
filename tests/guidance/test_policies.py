"""Target policies: d3rlpy agents' log π(a|s) checked against the distributions they define."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_dataset, tiny_agent

from rlsynth.datasets.d3rlpy_setup import import_d3rlpy
from rlsynth.guidance.policies import (
    ATANH_CLIP,
    D3rlpyPolicy,
    GaussianPolicy,
    ScoredPolicy,
    TargetPolicy,
    load_policy,
    normal_log_prob,
    normal_score,
    tanh_normal_log_prob,
    tanh_normal_score,
)


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    t = make_dataset().transitions
    return torch.tensor(t.observations[:n]), torch.tensor(t.actions[:n])


def test_normal_log_prob_closed_form() -> None:
    x, m, s = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 2.0]])
    expected = -0.5 * (0.25 + 0.25) - math.log(2.0) - math.log(2 * math.pi)
    assert float(normal_log_prob(x, m, s)) == pytest.approx(expected)


def test_iql_is_a_gaussian_around_tanh_mu() -> None:
    d3 = import_d3rlpy()
    pol = D3rlpyPolicy(tiny_agent(d3.algos.IQLConfig(batch_size=16)))
    obs, act = batch()
    out = pol.module(obs)
    expected = torch.distributions.Normal(torch.tanh(out.mu), out.logstd.exp()).log_prob(act).sum(-1)
    torch.testing.assert_close(pol.log_prob(obs, act), expected)
    assert isinstance(pol, TargetPolicy)


def test_cql_is_a_squashed_gaussian() -> None:
    d3 = import_d3rlpy()
    pol = D3rlpyPolicy(tiny_agent(d3.algos.CQLConfig(batch_size=16), steps=2))
    obs, act = batch()
    out = pol.module(obs)
    u = torch.atanh(act)
    expected = (
        torch.distributions.Normal(out.mu, out.logstd.exp()).log_prob(u) - torch.log1p(-(act**2))
    ).sum(-1)
    torch.testing.assert_close(pol.log_prob(obs, act), expected, rtol=1e-4, atol=1e-4)


def test_deterministic_actor_with_action_scaler_includes_the_jacobian() -> None:
    d3 = import_d3rlpy()
    lo, hi = np.full(3, -2.0, np.float32), np.full(3, 2.0, np.float32)
    scaler = d3.preprocessing.MinMaxActionScaler(minimum=lo, maximum=hi)
    pol = D3rlpyPolicy(
        tiny_agent(d3.algos.TD3PlusBCConfig(batch_size=16, action_scaler=scaler)), deterministic_std=0.2
    )
    obs, act = batch()
    mu_env = pol.mean_action(obs)
    # Agent units are env units / 2: the density over env actions is N(a/2; mu/2, 0.2²) * (1/2)^3.
    expected = normal_log_prob(act / 2, mu_env / 2, torch.full_like(act, 0.2)) + 3 * math.log(0.5)
    torch.testing.assert_close(pol.log_prob(obs, act), expected, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_actions_not_parameters(tmp_path: Path) -> None:
    d3 = import_d3rlpy()
    algo = tiny_agent(d3.algos.IQLConfig(batch_size=16))
    path = tmp_path / "iql.d3"
    algo.save(str(path))  # type: ignore[attr-defined]
    pol = load_policy(path)
    obs, act = batch()
    act = act.clone().requires_grad_(True)
    pol.log_prob(obs, act).sum().backward()
    assert act.grad is not None and torch.isfinite(act.grad).all()
    assert all(p.grad is None and not p.requires_grad for p in pol.module.parameters())


def test_gaussian_policy_protocol() -> None:
    pol = GaussianPolicy(mean_fn=lambda o: o[:, :3], std=torch.ones(3))
    obs, _ = batch()
    assert isinstance(pol, TargetPolicy)
    torch.testing.assert_close(pol.mean_action(obs), obs[:, :3])


# --- closed-form action scores, against finite differences and autograd (the fallback) -----------------


def central_difference(f: object, a: torch.Tensor, h: float) -> torch.Tensor:
    """∂/∂a of Σ f(a) per entry by central differences (float64)."""
    g = torch.zeros_like(a)
    for i in range(a.shape[0]):
        for d in range(a.shape[1]):
            e = torch.zeros_like(a)
            e[i, d] = h
            g[i, d] = (f(a + e) - f(a - e)).sum() / (2 * h)  # type: ignore[operator]
    return g


def autograd_score(log_prob: object, a: torch.Tensor) -> torch.Tensor:
    a = a.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_prob(a).sum(), a)  # type: ignore[operator]
    return g


@pytest.mark.parametrize("std", [1.0, 0.3, 1e-4])
def test_normal_score_is_the_gradient(std: float) -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    a = mu + std * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    sd = torch.full_like(a, std)
    score = normal_score(a, mu, sd)
    torch.testing.assert_close(score, autograd_score(lambda x: normal_log_prob(x, mu, sd), a), rtol=0, atol=0)
    fd = central_difference(lambda x: normal_log_prob(x, mu, sd), a, h=1e-3 * std)
    torch.testing.assert_close(score, fd, rtol=1e-6, atol=1e-6 / std)


# Near the bound: |a| → 1 inside the clip (1 − 1e-5 is 10× the clip's distance from it), on the clip
# itself, and past it, where the clamp is flat and the gradient 0.
EDGE = [0.0, 0.5, -0.9, 0.999, -(1 - 1e-5), ATANH_CLIP]


@pytest.mark.parametrize("std", [0.5, 1e-3])
def test_tanh_normal_score_is_the_gradient_up_to_the_bounds(std: float) -> None:
    a = torch.tensor([EDGE], dtype=torch.float64).T.repeat(1, 2)  # (6, 2)
    a[:, 1] = -a[:, 1]
    mu = torch.linspace(-1.0, 1.0, a.numel(), dtype=torch.float64).reshape(a.shape)
    sd = torch.full_like(a, std)
    score = tanh_normal_score(a, mu, sd)
    assert torch.isfinite(score).all()
    oracle = autograd_score(lambda x: tanh_normal_log_prob(x, mu, sd), a)
    torch.testing.assert_close(score, oracle, rtol=1e-12, atol=0)
    inner = a.abs() < ATANH_CLIP  # a difference step must not cross the clip
    h = 1e-4 * (1 - a.abs()).clamp_min(1e-7)
    fd = torch.zeros_like(a)
    for i, d in inner.nonzero().tolist():
        e = torch.zeros_like(a)
        e[i, d] = h[i, d]
        fd[i, d] = (tanh_normal_log_prob(a + e, mu, sd) - tanh_normal_log_prob(a - e, mu, sd)).sum() / (
            2 * e[i, d]
        )
    torch.testing.assert_close(score[inner], fd[inner], rtol=1e-5, atol=1e-6)


def test_tanh_normal_score_is_zero_past_the_clip_like_autograd() -> None:
    a = torch.tensor([[1.0, -1.0, 1 - 1e-7, 1.5]], dtype=torch.float64)
    mu, sd = torch.zeros_like(a), torch.full_like(a, 0.1)
    score = tanh_normal_score(a, mu, sd)
    assert score.tolist() == [[0.0] * 4]
    torch.testing.assert_close(score, autograd_score(lambda x: tanh_normal_log_prob(x, mu, sd), a))


def edge_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Real observations with actions pushed to the bounds in some entries (env units = agent units)."""
    obs, act = batch(8)
    act = act.clone()
    act[0, 0], act[1, 1], act[2, 2], act[3, 0] = 0.99999, -0.999999, 1.0, -1.0
    return obs, act


def d3rlpy_configs() -> dict[str, Any]:
    """One tiny config per actor family the adapter reads (the kinds the repo trains and a few more)."""
    d3 = import_d3rlpy()
    scaler = d3.preprocessing.MinMaxActionScaler(
        minimum=np.full(3, -2.0, np.float32), maximum=np.full(3, 2.0, np.float32)
    )
    a = d3.algos
    return {
        "iql (gaussian around tanh mu)": a.IQLConfig(batch_size=16),
        "awac (gaussian around tanh mu)": a.AWACConfig(batch_size=16),
        "stochastic bc (gaussian around tanh mu)": a.BCConfig(batch_size=16, policy_type="stochastic"),
        "cql (tanh-squashed)": a.CQLConfig(batch_size=16),
        "bear (tanh-squashed)": a.BEARConfig(batch_size=16),
        "sac (tanh-squashed, state-dependent std)": a.SACConfig(batch_size=16),
        "td3+bc (deterministic, action scaler)": a.TD3PlusBCConfig(batch_size=16, action_scaler=scaler),
        "td3 (deterministic)": a.TD3Config(batch_size=16),
        "deterministic bc": a.BCConfig(batch_size=16),
        "sac with action scaler": a.SACConfig(batch_size=16, action_scaler=scaler),
    }


TARGETS = list(d3rlpy_configs())


@pytest.fixture(scope="module")
def targets() -> dict[str, D3rlpyPolicy]:
    return {k: D3rlpyPolicy(tiny_agent(c, steps=2)) for k, c in d3rlpy_configs().items()}


def agent_actions(pol: D3rlpyPolicy, act: torch.Tensor) -> torch.Tensor:
    """Actions in env units for ``pol``: the scaled agents' env actions are in [-2, 2]."""
    return 2 * act if pol.act_scaler is not None else act


@pytest.mark.parametrize("name", TARGETS)
def test_d3rlpy_closed_form_score_matches_autograd(targets: dict[str, D3rlpyPolicy], name: str) -> None:
    pol = targets[name]
    assert isinstance(pol, ScoredPolicy)
    obs, act = edge_batch()
    act = agent_actions(pol, act)
    lp, score = pol.log_prob_and_action_score(obs, act)
    assert not lp.requires_grad and not score.requires_grad
    torch.testing.assert_close(lp, pol.log_prob(obs, act), rtol=0, atol=0)  # the same forward pass
    oracle = autograd_score(lambda a: pol.log_prob(obs, a), act)
    # Gaussian kinds agree bit for bit; tanh-squashed ones to float32 rounding of 2a − (atanh a − μ)/σ²,
    # whose entries reach 1e5 at the bounds.
    torch.testing.assert_close(score, oracle, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TARGETS)
def test_d3rlpy_closed_form_score_matches_autograd_on_random_inputs(
    targets: dict[str, D3rlpyPolicy], name: str
) -> None:
    # Random states off the data and actions uniform over the whole box, some within 1e-6 of its faces.
    pol = targets[name]
    gen = torch.Generator().manual_seed(1)
    obs = 3 * torch.randn(64, 11, generator=gen)
    act = torch.rand(64, 3, generator=gen) * 2 - 1
    act[:8] = torch.sign(act[:8]) * (1 - 10 ** -torch.randint(3, 7, (8, 3), generator=gen).float())
    act = agent_actions(pol, act)
    lp, score = pol.log_prob_and_action_score(obs, act)
    torch.testing.assert_close(lp, pol.log_prob(obs, act), rtol=0, atol=0)
    torch.testing.assert_close(
        score, autograd_score(lambda a: pol.log_prob(obs, a), act), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("name", "squashed"),
    [
        ("iql (gaussian around tanh mu)", False),
        ("awac (gaussian around tanh mu)", False),
        ("stochastic bc (gaussian around tanh mu)", False),
        ("cql (tanh-squashed)", True),
        ("bear (tanh-squashed)", True),
        ("sac (tanh-squashed, state-dependent std)", True),
    ],
)
def test_stochastic_actors_have_the_density_d3rlpy_trains_them_under(
    targets: dict[str, D3rlpyPolicy], name: str, squashed: bool
) -> None:
    # d3rlpy's own distributions (what each algorithm's loss uses), inside its clip of 1 − 1e-6.
    from d3rlpy.models.torch.policies import (
        build_gaussian_distribution,
        build_squashed_gaussian_distribution,
    )

    pol = targets[name]
    obs, act = batch(8)
    out = pol.module(obs)
    build = build_squashed_gaussian_distribution if squashed else build_gaussian_distribution
    expected = build(out).log_prob(act)[:, 0]
    torch.testing.assert_close(pol.log_prob(obs, act), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("std", [0.3, 1e-3])
def test_gaussian_policy_closed_form_score_matches_autograd_and_finite_differences(std: float) -> None:
    w = torch.linspace(-0.5, 0.5, 33, dtype=torch.float64).reshape(11, 3)
    pol = GaussianPolicy(mean_fn=lambda o: torch.tanh(o @ w), std=torch.full((3,), std, dtype=torch.float64))
    assert isinstance(pol, ScoredPolicy)
    obs, act = (x.double() for x in batch())
    lp, score = pol.log_prob_and_action_score(obs, act)
    torch.testing.assert_close(lp, pol.log_prob(obs, act), rtol=0, atol=0)
    oracle = autograd_score(lambda a: pol.log_prob(obs, a), act)
    torch.testing.assert_close(score, oracle, rtol=0, atol=0)
    fd = central_difference(lambda a: pol.log_prob(obs, a), act, h=1e-3 * std)
    torch.testing.assert_close(score, fd, rtol=1e-6, atol=1e-6 / std)
