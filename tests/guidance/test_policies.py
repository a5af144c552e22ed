"""Target policies: d3rlpy agents' log π(a|s) checked against the distributions they define."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dataset, tiny_agent

from rlsynth.datasets.d3rlpy_setup import import_d3rlpy
from rlsynth.guidance.policies import D3rlpyPolicy, GaussianPolicy, TargetPolicy, load_policy, normal_log_prob


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
