"""The diffusion families: trajectory diffusion (H-step windows) and transition diffusion (SynthER).

Both are an :class:`~generators.edm.EDMPrecond` around a raw network, trained with
:func:`~generators.edm.edm_loss` on z-scored data, and sampled with the EDM samplers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rlsynth.datasets.scratch import scratch_array
from rlsynth.datasets.types import Transitions
from rlsynth.generators.checkpoint import BLOCK_ROWS
from rlsynth.generators.edm import EDMConfig, EDMPrecond, edm_loss
from rlsynth.generators.nets import ResidualMLP, TemporalUNet1D
from rlsynth.generators.tokens import TokenLayout


@dataclass(frozen=True)
class TrajectoryConfig:
    """Trajectory diffusion over H-step token windows."""

    horizon: int = 32
    """Window length H (divisible by 2^(levels−1))."""
    channels: tuple[int, ...] = (64, 128, 256)
    """U-Net widths per resolution."""
    emb: int = 128
    """Noise-embedding width."""
    stride: int = 1
    """Step between training window starts."""
    step_scale: float = 0.0
    """α in [0, 1]: an observation dimension whose one-step change is smaller than its spread is scaled
    by std^(1−α)·std_Δ^α instead of std (0: plain z-scoring); see :func:`generators.tokens.step_scales`."""
    sample_steps: int = 20
    """Heun steps when sampling from noise."""
    s_churn: float = 0.0
    """EDM churn (0: deterministic ODE sampling). 40 steps with churn 40 (γ = √2 − 1 every step) cut the
    one-step dynamics error by a third on HalfCheetah medium-replay (0.196 → 0.133), but policy-guided
    data sampled that way trained worse TD3+BC agents (9.8 vs 11.8; BENCHMARKS.md), so it is an option
    (``--steps 40 --churn 40``), not the default."""
    polish: int = 30
    """Denoise–renoise iterations after sampling (:class:`generators.edm.Polish`, σ 0.5 → 0.05). On by
    default: on every dataset measured it cut the one-step dynamics error 2-5× while coverage rose and the
    spread barely moved (BENCHMARKS.md, Generators and Polishing), at about half the sampling rate.
    ``--polish 0`` samples without it."""
    edm: EDMConfig = field(default_factory=EDMConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrajectoryConfig:
        return cls(**{**d, "channels": tuple(d["channels"]), "edm": EDMConfig(**d["edm"])})


@dataclass(frozen=True)
class TransitionConfig:
    """SynthER-style diffusion over single transitions."""

    width: int = 512
    depth: int = 4
    emb: int = 128
    sample_steps: int = 20
    """Heun steps when sampling from noise."""
    s_churn: float = 0.0
    """EDM churn (0: the deterministic ODE). 40 steps with churn 40 beat 20 plain steps when neither was
    polished, but 20 plain steps and polish were both more accurate and faster (BENCHMARKS.md, Generators)."""
    polish: int = 30
    """As :attr:`TrajectoryConfig.polish` (here 0.069 → 0.0145 one-step on HalfCheetah, BENCHMARKS.md)."""
    edm: EDMConfig = field(default_factory=EDMConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransitionConfig:
        return cls(**{**d, "edm": EDMConfig(**d["edm"])})


class TrajectoryDiffusion(nn.Module):
    """D(x; σ) over normalised windows x (B, H, D)."""

    def __init__(self, layout: TokenLayout, cfg: TrajectoryConfig) -> None:
        super().__init__()
        if cfg.horizon % 2 ** (len(cfg.channels) - 1):
            raise ValueError(f"horizon {cfg.horizon} must be divisible by {2 ** (len(cfg.channels) - 1)}")
        self.cfg = cfg
        self.layout = layout
        self.denoiser = EDMPrecond(TemporalUNet1D(layout.dim, cfg.channels, cfg.emb), cfg.edm.sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, sigma)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return edm_loss(self.denoiser, batch["x"], self.cfg.edm), {}


class TransitionDiffusion(nn.Module):
    """D(x; σ) over normalised flat transitions x (B, 2·obs + act + 2)."""

    def __init__(self, layout: TokenLayout, cfg: TransitionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = layout
        self.dim = 2 * layout.obs_dim + layout.act_dim + 2
        self.denoiser = EDMPrecond(ResidualMLP(self.dim, cfg.width, cfg.depth, cfg.emb), cfg.edm.sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, sigma)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return edm_loss(self.denoiser, batch["x"], self.cfg.edm), {}


def transition_features(layout: TokenLayout, t: Transitions) -> np.ndarray:
    """[obs, action code, reward, next_obs, terminal] per row (N, 2·obs + act + 2), float32.

    Written column by column into the float32 result (action codes in blocks of ``BLOCK_ROWS``), so no
    float64 copy of the whole table is made; every value is the float32 cast of the float64 one.
    """
    o, a = layout.obs_dim, layout.act_dim
    f = scratch_array((len(t), 2 * o + a + 2), np.float32)
    f[:, :o] = t.observations
    for lo in range(0, len(t), BLOCK_ROWS):
        f[lo : lo + BLOCK_ROWS, o : o + a] = layout.encode_actions(t.actions[lo : lo + BLOCK_ROWS])
    f[:, o + a] = t.rewards
    f[:, o + a + 1 : 2 * o + a + 1] = t.next_observations
    f[:, -1] = t.terminals
    return f


def decode_transitions(layout: TokenLayout, x: np.ndarray) -> tuple[Transitions, np.ndarray]:
    """Sampled transitions (N, F) -> one one-step episode per row, as a columnar block (episode i from row
    i, terminal if its flag > 0.5, else truncated), and the indices of the rows that gave them (every row).

    Built column by column: one Python ``Episode`` per row cost ~57 µs, a minute per million transitions.
    Every value is the float32 cast the per-row construction made (actions decoded elementwise as before).
    """
    o, a = layout.obs_dim, layout.act_dim
    n = len(x)
    done = x[:, -1] > 0.5
    block = Transitions(
        episode_id=np.arange(n, dtype=np.int64),
        step=np.zeros(n, np.int32),
        observations=np.ascontiguousarray(x[:, :o], np.float32),
        actions=np.ascontiguousarray(layout.decode_actions(x[:, o : o + a]), np.float32),
        rewards=np.ascontiguousarray(x[:, o + a], np.float32),
        next_observations=np.ascontiguousarray(x[:, o + a + 1 : 2 * o + a + 1], np.float32),
        terminals=done,
        timeouts=~done,
    )
    return block, np.arange(n, dtype=np.int64)
