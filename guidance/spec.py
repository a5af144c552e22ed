"""A guidance spec as users give it (CLI flags, pipeline configs) -> a :class:`~guidance.terms.Guidance`.

Files are loaded and checked here, once: the target agent (safe ``.d3`` loader) and the world model whose
ensemble gives dynamics and return guidance. Lineage records each term's options, the agent file's
SHA-256 and the world model's checkpoint hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlsynth.datasets.agents import check_agent_spaces
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.sources import file_sha256
from rlsynth.datasets.types import DatasetInfo
from rlsynth.generators.api import load_generator
from rlsynth.generators.world_model import WorldModel, WorldModelNormalisers
from rlsynth.guidance.policies import DETERMINISTIC_STD, load_policy
from rlsynth.guidance.terms import Guidance, TermOptions, policy_guidance, world_model_guidance

TERMS = ("policy", "dynamics", "return")


@dataclass(frozen=True)
class GuidanceConfig:
    """Which guidance terms to apply and how; every term shares the schedule, point and normalisation."""

    terms: tuple[str, ...] = ()
    """Any of policy, dynamics, return."""
    policy: str | None = None
    """Target agent (.d3) for policy guidance."""
    scale: float = 0.05
    """Policy guidance scale c."""
    world_model: str | None = None
    """World-model generator folder for dynamics and return guidance."""
    dynamics_scale: float = 0.01
    """Raw dynamics gradients are stiff: 0.02 and above diverged on some HalfCheetah windows, 0.01 lowered
    the dynamics error (BENCHMARKS.md, guidance)."""
    return_scale: float = 0.05
    schedule: str = "pgd"
    at: str = "x0"
    """Evaluation point of the gradients: noisy or x0."""
    normalise: bool = False
    """Divide each sample's gradient by its L2 norm (then a scale is a step length)."""
    deterministic_std: float = DETERMINISTIC_STD
    """σ of N(μ(s), σ²) for deterministic actors (TD3+BC, BC, TD3, DDPG), in the agent's action units."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.terms if t not in TERMS]
        if unknown:
            raise RlsynthError(f"unknown guidance term {unknown[0]!r} (terms: {', '.join(TERMS)})")
        if len(set(self.terms)) != len(self.terms):
            raise RlsynthError("a guidance term is given twice")
        if self.deterministic_std <= 0:
            raise RlsynthError(f"deterministic_std must be positive, got {self.deterministic_std}")
        self.options(self.scale)

    def check_inputs(self) -> None:
        """The files the terms need are named (checked when guidance is built, not when configured: the
        PGD loop fills in its target agent each round)."""
        if "policy" in self.terms and self.policy is None:
            raise RlsynthError("policy guidance needs a target agent: --policy AGENT.d3")
        if {"dynamics", "return"} & set(self.terms) and self.world_model is None:
            raise RlsynthError("dynamics and return guidance need a world model: --world-model DIR")

    def options(self, scale: float) -> TermOptions:
        try:
            return TermOptions(scale=scale, schedule=self.schedule, at=self.at, normalise=self.normalise)
        except ValueError as e:
            raise RlsynthError(f"guidance: {e}") from None


def build_guidance(cfg: GuidanceConfig, info: DatasetInfo) -> Guidance | None:
    """The guidance for a generator trained on data with ``info``'s spaces (``None`` when no terms)."""
    if not cfg.terms:
        return None
    cfg.check_inputs()
    parts: list[Guidance] = []
    if "policy" in cfg.terms:
        assert cfg.policy is not None
        path = Path(cfg.policy)
        pol = load_policy(path, deterministic_std=cfg.deterministic_std)
        check_agent_spaces(
            pol.algo, info.observation_space.dim, info.action_space.dim, "the generator's data"
        )
        lineage: dict[str, Any] = {
            "kind": pol.kind,
            "path": str(path.resolve()),
            "sha256": file_sha256(path),
            "deterministic_std": cfg.deterministic_std,
        }
        parts.append(policy_guidance(pol, cfg.options(cfg.scale), lineage))
    wm_terms = [t for t in cfg.terms if t in ("dynamics", "return")]
    if wm_terms:
        assert cfg.world_model is not None
        wm = load_generator(cfg.world_model, device="cpu")
        if wm.kind != "world-model":
            raise RlsynthError(f"{cfg.world_model}: a {wm.kind} generator, not a world model")
        if wm.info.observation_space != info.observation_space or wm.info.action_space != info.action_space:
            raise RlsynthError(f"{cfg.world_model}: world model of other spaces than the generator's data")
        assert isinstance(wm.model, WorldModel)
        norms = WorldModelNormalisers.from_map(wm.norms)
        wm_lineage = {"folder": str(wm.folder.resolve()), "checkpoint_hash": wm.checkpoint_hash}
        for term in wm_terms:
            scale = cfg.dynamics_scale if term == "dynamics" else cfg.return_scale
            parts.append(world_model_guidance(term, wm.model, norms, cfg.options(scale), wm_lineage))
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out
