"""A guidance spec as users give it (:class:`guidance.options.GuidanceConfig`: CLI flags, run configs, the
PGD loop) -> a :class:`~guidance.terms.Guidance`.

Files are loaded and checked here, once: the target agent (safe ``.d3`` loader) and the world model whose
ensemble gives dynamics and return guidance. Lineage records each term's options, the agent file's
SHA-256 and the world model's checkpoint hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlsynth.datasets.agents import check_agent_spaces
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.sources import file_sha256
from rlsynth.datasets.types import DatasetInfo
from rlsynth.generators.api import load_generator
from rlsynth.generators.world_model import WorldModel, WorldModelNormalisers
from rlsynth.guidance.options import TERMS, GuidanceConfig
from rlsynth.guidance.policies import load_policy
from rlsynth.guidance.terms import Guidance, TermOptions, policy_guidance, world_model_guidance

__all__ = ["TERMS", "GuidanceConfig", "build_guidance"]


def _term_options(cfg: GuidanceConfig, scale: float) -> TermOptions:
    """One term's options: its scale, and the schedule, point and normalisation every term shares."""
    return TermOptions(scale=scale, schedule=cfg.schedule, at=cfg.at, normalise=cfg.normalise)


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
        parts.append(policy_guidance(pol, _term_options(cfg, cfg.scale), lineage))
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
            parts.append(world_model_guidance(term, wm.model, norms, _term_options(cfg, scale), wm_lineage))
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out
