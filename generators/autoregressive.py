"""Autoregressive drafts refined by diffusion.

The drafter is a causal transformer over normalised tokens: from the first (real) token of a window it
predicts a per-dimension Gaussian over the next token, samples it, and repeats (with a key/value cache, so
drafting H tokens costs H single-token passes). Training is teacher-forced next-token Gaussian NLL; the
causal mask means the prediction at step t never sees tokens after t.

Guided drafting: an optional ``tilt(prev, new, var)`` moves each sampled token before the next one is
predicted from it (policy guidance acts on every drafted action, and what follows is drafted from the
moved token); see :func:`guidance.terms.draft_tilt`.

Refinement noises the draft to ``sigma_start`` and runs K steps of a trained trajectory-diffusion model
from there (``sigma_start = 0`` returns the draft unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlsynth.generators.edm import NoiseSource
from rlsynth.generators.nets import CausalTransformer
from rlsynth.generators.tokens import TokenLayout

DraftTilt = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(previous token, sampled token, its predictive variance), each (B, D) normalised -> the moved token."""


@dataclass(frozen=True)
class AutoregressiveConfig:
    """The drafter and its default refinement."""

    horizon: int = 32
    width: int = 128
    depth: int = 3
    heads: int = 4
    kv_heads: int | None = None
    """Key/value heads shared by the query heads (None: one per head). Drafting on a CPU is bound by
    reading the key/value cache, so fewer of them draft faster (bench/generators.py)."""
    mlp_ratio: int = 4
    """Hidden width of each block's MLP as a multiple of ``width``: the MLP is most of a drafting step's
    arithmetic (three quarters at ratio 4)."""
    stride: int = 1
    temperature: float = 0.5
    """Scale of the drafter's predictive std when sampling. Picked with ``sigma_start`` and ``refine_steps``
    by bench/generators.py: the lowest one-step error among the settings at ≥ 10× the speed of trajectory
    diffusion, without a drop in coverage; at 1.0 a well-trained drafter's sharper predictive
    distribution diverges (figures in BENCHMARKS.md, "Generators")."""
    sigma_start: float = 0.3
    """Refinement: noise level the draft is raised to (0 disables refinement); see ``temperature``."""
    refine_steps: int = 1
    """Refinement: Heun steps from ``sigma_start`` down to 0 (picked with ``sigma_start``)."""
    polish: int = 10
    """Denoise–renoise iterations after the refinement (none for raw drafts). 10 brought the refined
    drafts' one-step error to that of polished trajectory diffusion at several times its speed
    (BENCHMARKS.md, Generators)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoregressiveConfig:
        return cls(**d)


class Drafter(nn.Module):
    def __init__(self, layout: TokenLayout, cfg: AutoregressiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = layout
        self.net = CausalTransformer(
            layout.dim,
            cfg.width,
            cfg.depth,
            cfg.heads,
            max_len=cfg.horizon,
            kv_heads=cfg.kv_heads,
            mlp_ratio=cfg.mlp_ratio,
        )

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Gaussian NLL of token t+1 given tokens ≤ t (teacher forcing)."""
        x = batch["x"]
        mean, logvar = self.net(x[:, :-1])
        target = x[:, 1:]
        nll = (((mean - target) ** 2) * torch.exp(-logvar) + logvar).mean()
        return nll, {"mse": float(((mean - target) ** 2).mean().detach())}

    @torch.no_grad()
    def draft(
        self,
        first: torch.Tensor,
        noise: NoiseSource,
        temperature: float | None = None,
        tilt: DraftTilt | None = None,
    ) -> torch.Tensor:
        """first (B, D) normalised start tokens -> drafts (B, H, D), sampled token by token with the
        predictive std scaled by ``temperature`` (default: the config's; 0 gives the mean path, which a
        tilt cannot move: its step is scaled by the predictive variance)."""
        temp = self.cfg.temperature if temperature is None else temperature
        b, d = first.shape
        h = self.cfg.horizon
        eps = noise((b, h - 1, d))
        caches = self.net.new_cache()
        tokens = [first[:, None]]
        for k in range(h - 1):
            mean, logvar = self.net.step(tokens[-1], k, caches)
            std = torch.exp(0.5 * logvar) * temp
            token = mean + std * eps[:, k : k + 1]
            if tilt is not None:
                token = tilt(tokens[-1][:, 0], token[:, 0], (std * std)[:, 0])[:, None]
            tokens.append(token)
        return torch.cat(tokens, 1)
