"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Small pure pieces, named after the paper's Table 1 and Algorithm 2:

* :class:`EDMPrecond` wraps a raw network F into the denoiser D(x; σ) = c_skip x + c_out F(c_in x; c_noise);
* :func:`edm_loss` is the training loss with log-normal σ ~ exp(N(P_mean, P_std²)) and weight λ(σ);
* :func:`karras_sigmas` is the ρ-schedule (eq. 5);
* :func:`sample_heun` / :func:`sample_euler` integrate the probability-flow ODE over any
  ``denoiser(x, sigma) -> x0`` callable, with optional churn (Algorithm 2's stochastic step);
* :func:`polish` runs denoise–renoise iterations on finished samples (:class:`Polish`).

Guidance wraps the denoiser; the samplers never know it exists. Noise is injected through a
:class:`NoiseSource` so sample i draws the same numbers however the batch is split, and ``sigma_start``
lets sampling begin from a partly noised input (refinement, warm starts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(x (B, ...), sigma (B,)) -> x0 estimate (B, ...)``."""


class NoiseSource(Protocol):
    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal draws of shape (B, *shape[1:]), row i from sample i's own stream."""
        ...


class PerSampleNoise:
    """One ``torch.Generator`` per sample (EDM's StackedRandomGenerator): row i depends on seed i only."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} samples requested from {len(self.generators)} streams")
        rows = [torch.randn(tuple(shape[1:]), generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)


@dataclass(frozen=True)
class EDMConfig:
    """Noise-level distribution and schedule (the paper's defaults; σ range as policy-guided diffusion)."""

    sigma_data: float = 1.0
    """Std of the (z-scored) data."""
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    p_mean: float = -1.2
    """Mean of log σ during training."""
    p_std: float = 1.2
    """Std of log σ during training."""


class EDMPrecond(nn.Module):
    """D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)) (Table 1, "EDM" column).

    ``net(x_scaled (B, ...), c_noise (B,)) -> (B, ...)``.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.to(x.dtype).log() / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


def edm_loss(
    denoiser: Denoiser, x0: torch.Tensor, cfg: EDMConfig, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """E_σ,n λ(σ) ‖D(x0 + σn; σ) − x0‖², ln σ ~ N(P_mean, P_std²), λ = (σ² + σd²)/(σ σd)² (eq. 8, Table 1).

    ``mask`` (broadcastable to x0) excludes padded entries from the mean.
    """
    b = x0.shape[0]
    sigma = (torch.randn(b, device=x0.device) * cfg.p_std + cfg.p_mean).exp()
    weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
    noisy = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * torch.randn_like(x0)
    sq = (denoiser(noisy, sigma) - x0) ** 2
    if mask is not None:
        m = mask.expand_as(sq).to(sq.dtype)
        per = (sq * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    else:
        per = sq.flatten(1).mean(1)
    return (weight * per).mean()


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < n, then σ_n = 0 (eq. 5). (n+1,)"""
    if n < 1:
        raise ValueError(f"need at least one sampling step, got {n}")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def schedule(n: int, cfg: EDMConfig, sigma_start: float | None = None) -> torch.Tensor:
    """The ρ-schedule from σ_max (or from ``sigma_start`` for refinement / warm starts) down to 0."""
    top = cfg.sigma_max if sigma_start is None else min(sigma_start, cfg.sigma_max)
    if top <= cfg.sigma_min:
        raise ValueError(f"sigma_start {sigma_start} must exceed sigma_min {cfg.sigma_min}")
    return karras_sigmas(n, cfg.sigma_min, top, cfg.rho)


@dataclass(frozen=True)
class Churn:
    """Algorithm 2's stochasticity: S_churn, S_tmin, S_tmax, S_noise (0 churn = deterministic ODE)."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``callback(i, x_i, sigma_i, x0_estimate)`` after each step."""


def _as_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).expand(x.shape[0])


def _sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise: NoiseSource,
    churn: Churn,
    second_order: bool,
    callback: StepCallback | None,
) -> torch.Tensor:
    n = len(sigmas) - 1
    sig = sigmas.to(x.device)
    for i in range(n):
        t_cur, t_next = sig[i], sig[i + 1]
        # Algorithm 2, lines 4-6: raise the noise level temporarily to t_hat (churn).
        gamma = (
            min(churn.s_churn / n, math.sqrt(2) - 1) if churn.s_tmin <= float(t_cur) <= churn.s_tmax else 0.0
        )
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + (t_hat**2 - t_cur**2).sqrt().to(x.dtype) * churn.s_noise * noise(x.shape)
        # Line 7-8: Euler step.
        x0 = denoiser(x, _as_batch(t_hat, x))
        d = (x - x0) / t_hat.to(x.dtype)
        x_next = x + (t_next - t_hat).to(x.dtype) * d
        # Lines 9-11: second-order (Heun) correction, except on the last step to σ = 0.
        if second_order and t_next > 0:
            x0_next = denoiser(x_next, _as_batch(t_next, x))
            d_next = (x_next - x0_next) / t_next.to(x.dtype)
            x_next = x + (t_next - t_hat).to(x.dtype) * (0.5 * d + 0.5 * d_next)
        x = x_next
        if callback is not None:
            callback(i, x, t_next, x0)
    return x


def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource,
    churn: Churn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order sampler (Algorithm 2). ``x`` is the start at σ_0 (noise·σ_0, or a noised draft)."""
    return _sample(denoiser, x, sigmas, noise, churn or Churn(), True, callback)


def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource,
    churn: Churn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler (1st-order) sampler; one network evaluation per step."""
    return _sample(denoiser, x, sigmas, noise, churn or Churn(), False, callback)


@dataclass(frozen=True)
class Polish:
    """Denoise–renoise iterations after sampling: x ← D(x + σ_k n_k; σ_k), σ_k geometric from ``sigma_hi``
    down to ``sigma_lo`` over ``steps`` iterations (0: off).

    Why: the ODE sampler of an under-trained model leaves small errors off the data manifold, and the
    dynamics are sensitive to exactly those (a foot a centimetre into the floor gets a contact kick).
    Each iteration replaces x by the model's posterior mean given a slightly noised x, which removes
    what the model reads as noise. It is mode-seeking, not a sampler of p: for Gaussian data
    N(μ, s²) one iteration maps the variance v to a²(v + σ²) with a = s²/(s² + σ²), so a long run at a
    fixed σ contracts the spread; the annealed σ keeps that small in practice (BENCHMARKS.md).
    """

    steps: int = 0
    sigma_hi: float = 0.5
    sigma_lo: float = 0.05

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"polish steps must be >= 0, got {self.steps}")
        if not 0 < self.sigma_lo <= self.sigma_hi:
            raise ValueError(f"polish needs 0 < sigma_lo <= sigma_hi, got {self.sigma_lo}, {self.sigma_hi}")

    def sigmas(self) -> torch.Tensor:
        """The iterations' noise levels (steps,), float64, from sigma_hi down to sigma_lo."""
        hi, lo = math.log(self.sigma_hi), math.log(self.sigma_lo)
        return torch.linspace(hi, lo, self.steps, dtype=torch.float64).exp()


def polish(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource) -> torch.Tensor:
    """x ← D(x + σ n; σ) for each σ in ``sigmas`` (see :class:`Polish`); noise from ``noise``."""
    for s in sigmas.tolist():
        sig = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
        x = denoiser(x + s * noise(x.shape), sig)
    return x


def generate(
    denoiser: Denoiser,
    shape: Sequence[int],
    steps: int,
    cfg: EDMConfig,
    noise: NoiseSource,
    *,
    x_init: torch.Tensor | None = None,
    sigma_start: float | None = None,
    churn: Churn | None = None,
    heun: bool = True,
    polishing: Polish | None = None,
) -> torch.Tensor:
    """Draw samples: from pure noise at σ_max, or (``x_init`` + ``sigma_start``) from a noised draft,
    then ``polishing`` iterations, if any.

    ``sigma_start = 0`` returns ``x_init`` unchanged (nothing to refine).
    """
    if x_init is not None and sigma_start is not None and sigma_start <= 0:
        return x_init.clone()
    sigmas = schedule(steps, cfg, sigma_start if x_init is not None else None)
    start = noise(shape) * float(sigmas[0])
    x = start if x_init is None else x_init + start
    sampler = sample_heun if heun else sample_euler
    x = sampler(denoiser, x, sigmas, noise=noise, churn=churn)
    if polishing is not None:  # zero steps: no sigmas, polish() returns x
        x = polish(denoiser, x, polishing.sigmas(), noise=noise)
    return x
