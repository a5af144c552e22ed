"""Target policies: a differentiable log π(a | s) in the environment's own units.

The protocol (:class:`TargetPolicy`) is small on purpose so any torch module can be a target:

* ``log_prob(obs, act) -> (B,)`` — log-density of actions, summed over action dimensions, differentiable in
  both arguments; ``obs`` (B, obs_dim) and ``act`` (B, act_dim) are unnormalised, as stored in datasets;
* ``mean_action(obs) -> (B, act_dim)`` — the policy's mean (or deterministic) action.

:class:`D3rlpyPolicy` adapts a d3rlpy agent, respecting its observation and action scalers (the action
scaler's Jacobian is added so densities are over environment actions):

* IQL, AWAC and stochastic BC: a Gaussian N(tanh(μ(s)), σ²) with d3rlpy's state-independent log σ;
* SAC, CQL, CalQL: a tanh-squashed Gaussian, log π(a|s) = log N(atanh a; μ, σ²) − Σ log(1 − a²);
* deterministic actors (TD3+BC, TD3, DDPG, deterministic BC): N(μ(s), σ²) with a documented
  ``deterministic_std`` (default 0.1, in the agent's action units) — a likelihood under an arbitrary σ.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from rlsynth.datasets.agents import AgentError, agent_kind, load_agent

# Actions on the tanh bound have no pre-image; clamp just inside it.
ATANH_CLIP = 1.0 - 1e-6
SQUASHED = frozenset({"sac", "cql", "cal_ql"})
DETERMINISTIC_STD = 0.1
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@runtime_checkable
class TargetPolicy(Protocol):
    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor: ...

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor: ...


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Σ_d log N(x_d; mean_d, std_d²) over the last axis."""
    z = (x - mean) / std
    return (-0.5 * z * z - torch.log(std) - LOG_SQRT_2PI).sum(-1)


@dataclass(frozen=True)
class GaussianPolicy:
    """A torch module μ(s) with a fixed σ: the simplest target meeting the protocol (and a test oracle)."""

    mean_fn: Any
    std: torch.Tensor

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return normal_log_prob(act, self.mean_fn(obs), self.std.expand_as(act))

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mean_fn(obs)


class D3rlpyPolicy:
    """log π(a | s) of a d3rlpy agent; parameters are frozen (guidance differentiates inputs only)."""

    def __init__(self, algo: Any, deterministic_std: float = DETERMINISTIC_STD) -> None:
        if algo.impl is None:
            raise AgentError("the d3rlpy agent is not built (train or load it first)")
        self.algo = algo
        self.kind = agent_kind(algo)
        # Actor-critic agents call their actor "policy"; BC calls it "imitator".
        module = getattr(algo.impl.modules, "policy", None) or getattr(algo.impl.modules, "imitator", None)
        if module is None:
            raise AgentError(f"d3rlpy agent '{self.kind}' has no continuous policy to take log π from")
        self.module = module
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self.obs_scaler = algo.observation_scaler
        self.act_scaler = algo.action_scaler
        if not math.isfinite(deterministic_std) or deterministic_std <= 0:
            raise AgentError(f"deterministic_std must be finite and positive, got {deterministic_std}")
        self.deterministic_std = float(deterministic_std)
        self.device = torch.device(algo.impl.device)

    def _output(self, obs: torch.Tensor) -> Any:
        x = obs.to(self.device, torch.float32)
        if self.obs_scaler is not None:
            x = self.obs_scaler.transform(x)
        return self.module(x)

    def _to_agent_actions(self, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions in the agent's units and log |det ∂a_agent/∂a| per row."""
        a = act.to(self.device, torch.float32)
        if self.act_scaler is None:
            return a, torch.zeros(a.shape[0], device=a.device)
        scaled = self.act_scaler.transform(a)
        # The scalers d3rlpy ships are affine per dimension: the Jacobian is the per-dimension slope.
        ones = torch.ones_like(a[:1])
        slope = self.act_scaler.transform(ones) - self.act_scaler.transform(torch.zeros_like(ones))
        return scaled, torch.log(slope.abs()).sum(-1).expand(a.shape[0])

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        out = self._output(obs)
        a, log_jac = self._to_agent_actions(act)
        if out.logstd is None:
            std = torch.full_like(a, self.deterministic_std)
            return normal_log_prob(a, out.squashed_mu, std) + log_jac
        std = out.logstd.exp().expand_as(a)
        if self.kind in SQUASHED:
            a = a.clamp(-ATANH_CLIP, ATANH_CLIP)
            u = torch.atanh(a)
            return normal_log_prob(u, out.mu, std) - torch.log1p(-a * a).sum(-1) + log_jac
        return normal_log_prob(a, out.squashed_mu, std) + log_jac

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        mu = self._output(obs).squashed_mu
        if self.act_scaler is not None:
            mu = self.act_scaler.reverse_transform(mu)
        return mu


def load_policy(path: str | os.PathLike[str], deterministic_std: float = DETERMINISTIC_STD) -> D3rlpyPolicy:
    """A target policy from a d3rlpy ``.d3`` file (loaded safely, see :mod:`datasets.agents`)."""
    return D3rlpyPolicy(load_agent(path), deterministic_std=deterministic_std)
