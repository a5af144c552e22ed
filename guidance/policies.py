"""Target policies: a differentiable log π(a | s) in the environment's own units.

The protocol (:class:`TargetPolicy`) is small on purpose so any torch module can be a target:

* ``log_prob(obs, act) -> (B,)`` — log-density of actions, summed over action dimensions, differentiable in
  both arguments; ``obs`` (B, obs_dim) and ``act`` (B, act_dim) are unnormalised, as stored in datasets;
* ``mean_action(obs) -> (B, act_dim)`` — the policy's mean (or deterministic) action.

:class:`D3rlpyPolicy` adapts a d3rlpy agent, respecting its observation and action scalers (the action
scaler's Jacobian is added so densities are over environment actions):

* IQL, AWAC, CRR and stochastic BC: a Gaussian N(tanh(μ(s)), σ²) with d3rlpy's state-independent log σ;
* SAC, CQL, CalQL, BEAR: a tanh-squashed Gaussian, log π(a|s) = log N(atanh a; μ, σ²) − Σ log(1 − a²);
* deterministic actors (TD3+BC, TD3, DDPG, deterministic BC): N(μ(s), σ²) with a documented
  ``deterministic_std`` (default 0.1, in the agent's action units) — a likelihood under an arbitrary σ.

Both adapters also meet :class:`ScoredPolicy`: ``log_prob_and_action_score`` gives log π and ∂ log π/∂a in
closed form from one forward pass of the actor (no graph, no backward), which is all policy guidance needs
since it moves actions only. Autograd through ``log_prob`` stays the fallback for other targets and the
oracle the closed forms are tested against.
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
# The agents whose d3rlpy training builds the actor's distribution as a tanh-squashed Gaussian
# (build_squashed_gaussian_distribution); other Gaussian actors (IQL, AWAC, CRR, stochastic BC) are
# N(tanh μ, σ²).
SQUASHED = frozenset({"sac", "cql", "cal_ql", "bear"})
DETERMINISTIC_STD = 0.1
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@runtime_checkable
class TargetPolicy(Protocol):
    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor: ...

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ScoredPolicy(TargetPolicy, Protocol):
    """A target whose action gradient has a closed form."""

    def log_prob_and_action_score(
        self, obs: torch.Tensor, act: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(a | s) (B,) and ∂ log π(a | s)/∂a (B, act_dim), both without a graph; inputs as
        :meth:`TargetPolicy.log_prob`'s. The log-density equals ``log_prob``'s bit for bit."""
        ...


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Σ_d log N(x_d; mean_d, std_d²) over the last axis."""
    z = (x - mean) / std
    return (-0.5 * z * z - torch.log(std) - LOG_SQRT_2PI).sum(-1)


def normal_score(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """∂/∂x of :func:`normal_log_prob`: −(x − mean)/std², formed as −z/std like autograd forms it."""
    return -((x - mean) / std) / std


def tanh_normal_log_prob(a: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Σ_d log density of tanh(u), u ~ N(mu, std²), at a: log N(atanh a; mu, std²) − log(1 − a²), with a
    clamped inside ±ATANH_CLIP (the bound itself has no pre-image)."""
    a = a.clamp(-ATANH_CLIP, ATANH_CLIP)
    return normal_log_prob(torch.atanh(a), mu, std) - torch.log1p(-a * a).sum(-1)


def tanh_normal_score(a: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """∂/∂a of :func:`tanh_normal_log_prob`: (2a − (atanh a − mu)/std²)/(1 − a²) — the Gaussian's score
    through du/da = 1/(1 − a²) plus the change-of-variables term's 2a/(1 − a²). Outside the clip the clamp
    is flat, so the gradient is 0 there, as autograd has it."""
    c = a.clamp(-ATANH_CLIP, ATANH_CLIP)
    score = (2 * c + normal_score(torch.atanh(c), mu, std)) / (1 - c * c)
    inside = (a >= -ATANH_CLIP) & (a <= ATANH_CLIP)
    return torch.where(inside, score, torch.zeros_like(score))


@dataclass(frozen=True)
class GaussianPolicy:
    """A torch module μ(s) with a fixed σ: the simplest target meeting the protocol (and a test oracle)."""

    mean_fn: Any
    std: torch.Tensor

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return normal_log_prob(act, self.mean_fn(obs), self.std.expand_as(act))

    @torch.no_grad()
    def log_prob_and_action_score(
        self, obs: torch.Tensor, act: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.mean_fn(obs), self.std.expand_as(act)
        return normal_log_prob(act, mean, std), normal_score(act, mean, std)

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

    def _action_slope(self, like: torch.Tensor) -> torch.Tensor:
        """∂a_agent/∂a per dimension (1, act_dim): the scalers d3rlpy ships are affine per dimension."""
        ones = torch.ones_like(like[:1])
        return self.act_scaler.transform(ones) - self.act_scaler.transform(torch.zeros_like(ones))

    def _to_agent_actions(self, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions in the agent's units and log |det ∂a_agent/∂a| per row."""
        a = act.to(self.device, torch.float32)
        if self.act_scaler is None:
            return a, torch.zeros(a.shape[0], device=a.device)
        slope = self._action_slope(a)
        return self.act_scaler.transform(a), torch.log(slope.abs()).sum(-1).expand(a.shape[0])

    def _density(
        self, obs: torch.Tensor, act: torch.Tensor
    ) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(squashed, a, mean, std, log_jac): agent-unit actions a, the Gaussian's mean and std (over a, or
        over atanh a when squashed) and the action scaler's log-Jacobian per row."""
        out = self._output(obs)
        a, log_jac = self._to_agent_actions(act)
        if out.logstd is None:
            return False, a, out.squashed_mu, torch.full_like(a, self.deterministic_std), log_jac
        std = out.logstd.exp().expand_as(a)
        if self.kind in SQUASHED:
            return True, a, out.mu, std, log_jac
        return False, a, out.squashed_mu, std, log_jac

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        squashed, a, mean, std, log_jac = self._density(obs, act)
        lp = tanh_normal_log_prob(a, mean, std) if squashed else normal_log_prob(a, mean, std)
        return lp + log_jac

    @torch.no_grad()
    def log_prob_and_action_score(
        self, obs: torch.Tensor, act: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        squashed, a, mean, std, log_jac = self._density(obs, act)
        if squashed:
            lp, score = tanh_normal_log_prob(a, mean, std), tanh_normal_score(a, mean, std)
        else:
            lp, score = normal_log_prob(a, mean, std), normal_score(a, mean, std)
        if self.act_scaler is not None:
            score = score * self._action_slope(a)  # chain rule through the affine action scaler
        return lp + log_jac, score

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        mu = self._output(obs).squashed_mu
        if self.act_scaler is not None:
            mu = self.act_scaler.reverse_transform(mu)
        return mu


def load_policy(path: str | os.PathLike[str], deterministic_std: float = DETERMINISTIC_STD) -> D3rlpyPolicy:
    """A target policy from a d3rlpy ``.d3`` file (loaded safely, see :mod:`datasets.agents`)."""
    return D3rlpyPolicy(load_agent(path), deterministic_std=deterministic_std)
