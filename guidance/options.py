"""The guidance options as users give them: one torch-free frozen dataclass, every field declared once.

``generator sample``'s guidance flags, ``synthesize.guidance`` in a run config and the PGD loop all hold a
:class:`GuidanceConfig`; :func:`guidance.spec.build_guidance` turns one into a
:class:`~guidance.terms.Guidance`. The vocabularies are literals here (the registries in
``guidance.terms`` import torch); tests check them against the registries.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators.options import check_options, option

TERMS = ("policy", "dynamics", "return")
SCHEDULES = ("constant", "linear", "pgd")
POINTS = ("noisy", "x0")
# Guidance scales beyond this diverge at once (drafts use the largest, a few units: README, Guidance).
MAX_SCALE = 1e3
MAX_STD = 1e2


@dataclass(frozen=True, kw_only=True)
class GuidanceConfig:
    """Which guidance terms to apply and how; every term shares the schedule, point and normalisation."""

    terms: tuple[str, ...] = option(
        (),
        "Guidance terms: policy (needs a target agent), dynamics and return (need a world model). Diffusion "
        "kinds: they wrap the denoiser; autoregressive: they tilt every drafted token.",
        flag="--guidance",
        choices=TERMS,
    )
    policy: str | None = option(None, "Target agent (.d3) for policy guidance.")
    # Autoregressive drafts move once per token, by c × predictive variance × ∇J, so they take larger
    # scales than diffusion (README, Guidance).
    scale: float = option(
        0.05, "Policy guidance scale c (autoregressive drafts take larger ones, ~1-3).", low=0, high=MAX_SCALE
    )
    world_model: str | None = option(
        None, "World-model generator folder for dynamics and return guidance.", folder=True
    )
    # Raw dynamics gradients are stiff: 0.02 and above diverged on some HalfCheetah windows, 0.01 lowered
    # the dynamics error (BENCHMARKS.md, guidance).
    dynamics_scale: float = option(0.01, "Dynamics guidance scale.", low=0, high=MAX_SCALE)
    return_scale: float = option(0.05, "Return guidance scale.", low=0, high=MAX_SCALE)
    schedule: str = option(
        "pgd",
        "Weight over sampler steps: constant, linear (1 − k/n) or pgd (linear + 0.3 sin, 0 at the end).",
        choices=SCHEDULES,
    )
    at: str = option(
        "x0",
        "Where gradients are taken: the denoiser's x0 estimate or the noisy sample.",
        flag="--guide-at",
        choices=POINTS,
    )
    normalise: bool = option(
        False,
        "Divide each sample's gradient by its L2 norm (the scale becomes a step length).",
        flag="--normalise-gradient/--raw-gradient",
    )
    # guidance.policies.DETERMINISTIC_STD (a test keeps the two equal).
    deterministic_std: float = option(
        0.1,
        "σ of N(μ(s), σ²) for deterministic target actors (TD3+BC, BC, TD3, DDPG), in the agent's action "
        "units: smaller pulls actions harder.",
        low=0,
        low_open=True,
        high=MAX_STD,
    )

    def __post_init__(self) -> None:
        check_options(self)

    def check_inputs(self) -> None:
        """The files the terms need are named (checked when guidance is built, not when configured: the
        PGD loop fills in its target agent each round, a run its target agent and world model)."""
        if "policy" in self.terms and self.policy is None:
            raise RlsynthError("policy guidance needs a target agent: --policy AGENT.d3")
        if {"dynamics", "return"} & set(self.terms) and self.world_model is None:
            raise RlsynthError("dynamics and return guidance need a world model: --world-model DIR")
