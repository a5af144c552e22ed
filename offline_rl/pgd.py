"""The policy-guided diffusion training loop.

An agent trains on batches of ``synthetic_rows`` synthetic + ``real_rows`` real transitions (240 + 16 in
the paper). The synthetic set is sampled from a diffusion generator and regenerated every
``regenerate_every`` agent steps with the current agent as the policy-guidance target; the first set is
unguided (there is no trained agent yet) unless ``initial_target`` names an agent from an earlier stage.
Each synthetic set is committed as the next catalog version of ``name`` (sampled through
:func:`offline_rl.synthesis.synthesize`); its lineage's ``agent`` pins the target agent's file by SHA-256 and
its ``producer`` holds the round, the agent step and the previous round's version, so the chain can be
followed back.

With ``regeneration.regenerate = "warm"`` every round whose last set was guided (from round 2, or round
1 with ``initial_target``) starts from the last round's samples (kept with each version as its
``samples.safetensors`` artifact), noised to σ_start and denoised with the new target's guidance
(:mod:`generators.warm`); a ``warm_reseed`` share is drawn from noise. σ_start, steps and polish, unless
given, are chosen by the first warm round's pilots (:func:`pilot_measure`: dynamics error, target
likelihood, spread against a cold pilot) and kept for the rounds after; ``sampling.warm_start`` in each
version's lineage records where it started and how it was chosen.
The agent saved for each round lives in ``out/agents/``.

The agent's observation scaler is fitted on the first round's mixture and then kept: regenerating data
must not silently change the agent's input normalisation.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlsynth.datasets.agents import save_agent
from rlsynth.datasets.catalog import Catalog, VersionRef
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.fidelity import MujocoOracle, NoOracleError, one_step_row_errors, reference_std
from rlsynth.datasets.types import Dataset, episodes_to_transitions
from rlsynth.generators.api import (
    SAMPLES_FILE,
    LoadedGenerator,
    Measure,
    Rule,
    SampleOptions,
    WarmFrom,
    diffused,
    refiner_for,
    save_samples,
)
from rlsynth.generators.options import Regeneration, SamplerSettings
from rlsynth.guidance.policies import load_policy
from rlsynth.guidance.spec import GuidanceConfig
from rlsynth.offline_rl.mixture import Mixture
from rlsynth.offline_rl.synthesis import Synthesis, synthesize
from rlsynth.offline_rl.train import ALGOS, Callback, TrainingLog, build_algo, fit


def check_initial_target(initial_target: str | None, guidance: GuidanceConfig) -> None:
    """A warm-start agent only makes sense with policy guidance (shared by PGDConfig and PGDSpec)."""
    if initial_target is not None and "policy" not in guidance.terms:
        raise RlsynthError("pgd initial_target needs policy guidance (guidance terms lack 'policy')")


def check_initial_target_file(initial_target: str | None) -> None:
    """The warm-start agent file exists (checked before anything is written)."""
    if initial_target is not None and not Path(initial_target).is_file():
        raise RlsynthError(f"pgd initial_target {initial_target}: no such agent file")


@dataclass(frozen=True)
class PGDConfig:
    """The loop's settings (defaults follow policy-guided diffusion, scaled for a CPU)."""

    algo: str = "td3bc"
    steps: int = 100_000
    """Agent gradient steps in total."""
    regenerate_every: int = 10_000
    """Agent steps between synthetic regenerations."""
    synthetic_transitions: int = 50_000
    """Transitions per synthetic set."""
    synthetic_rows: int = 240
    real_rows: int = 16
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(terms=("policy",)))
    """Guidance from round 1 on, and in round 0 with ``initial_target`` (the target agent is filled in
    each round)."""
    initial_target: str | None = None
    """An agent file from an earlier stage (e.g. trained on the real data) that guides round 0; None: round
    0 is unguided, as in policy-guided diffusion. Our small generators' unguided data can teach an agent
    to stand still, and a loop whose first target stands still only reinforces it."""
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    """How each set is sampled (steps, churn, polish, ...: :class:`generators.options.SamplerSettings`)."""
    regeneration: Regeneration = field(default_factory=Regeneration)
    """Rounds after the first: cold (from noise) or warm-started from the last round's samples
    (:class:`generators.options.Regeneration`)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise RlsynthError(f"unknown algorithm {self.algo!r} (algorithms: {', '.join(ALGOS)})")
        for key in ("steps", "regenerate_every", "synthetic_transitions", "synthetic_rows"):
            if getattr(self, key) < 1:
                raise RlsynthError(f"pgd {key} must be positive, got {getattr(self, key)}")
        if self.real_rows < 0:
            raise RlsynthError(f"pgd real_rows must be ≥ 0, got {self.real_rows}")
        check_initial_target(self.initial_target, self.guidance)

    @property
    def rounds(self) -> int:
        return math.ceil(self.steps / self.regenerate_every)


@dataclass(frozen=True)
class PGDRound:
    round: int
    start_step: int
    version: str
    agent: str | None
    """The guidance target's file (None in an unguided round 0)."""
    sigma_start: float | None = None
    """A warm round's σ_start (None: sampled from noise)."""
    sample_seconds: float = 0.0
    """Wall time of the round's synthesis (σ_start's choice included)."""


@dataclass(frozen=True)
class PGDResult:
    agent: Path
    rounds: tuple[PGDRound, ...]
    log: TrainingLog


PILOT_RULES = {"dynamics": Rule("lower", relative=0.05), "target_ll": Rule("higher", absolute=0.1)}
"""A warm pilot may have a lower dynamics error or a higher target likelihood than the cold one, and be
worse by sampling noise plus 5% of the error or 0.1 nats per action dimension of likelihood (a
likelihood ratio of 1.1 per dimension)."""


def pilot_measure(
    gen: LoadedGenerator, target: str | None, real: Dataset, guidance: GuidanceConfig
) -> Measure:
    """Per sample of a pilot round: its one-step dynamics error against the simulator (normalised by the
    real data's std; omitted where the environment has no oracle) and, with a target, its actions' mean
    log-likelihood under the target per action dimension."""
    fam = diffused(gen)
    std = reference_std(real.transitions)
    policy = load_policy(target, guidance.deterministic_std) if target is not None else None

    def measure(raw: np.ndarray) -> dict[str, np.ndarray]:
        episodes, idx = fam.decode(gen, raw)
        out: dict[str, np.ndarray] = {}
        if not episodes:
            return {"dynamics": np.full(len(raw), np.nan)}
        t = episodes_to_transitions(episodes)
        owner = np.repeat(idx, [e.length for e in episodes])
        try:
            oracle = MujocoOracle(str(gen.info.env_id))
        except NoOracleError:
            oracle = None
        if oracle is not None:
            try:
                out["dynamics"] = _per_sample(one_step_row_errors(oracle, t, std), owner, len(raw))
            finally:
                oracle.close()
        if policy is not None:
            with torch.no_grad():
                obs, act = torch.from_numpy(t.observations.copy()), torch.from_numpy(t.actions.copy())
                ll = (policy.log_prob(obs, act) / act.shape[1]).double().numpy()
            out["target_ll"] = _per_sample(ll, owner, len(raw))
        return out

    return measure


def _per_sample(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """The mean of each sample's finite row values (NaN for a sample with none)."""
    ok = np.isfinite(values)
    total = np.bincount(owner[ok], values[ok], minlength=n)
    count = np.bincount(owner[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _commit(catalog: Catalog, name: str, made: Synthesis, tags: dict[str, Any]) -> VersionRef:
    """Commit a round's set; its raw samples, when kept, go with it as the version's samples artifact."""
    if made.samples is None:
        return catalog.write(name, made.dataset, lineage=made.lineage, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_samples(made.samples, Path(tmp))
        return catalog.write(name, made.dataset, lineage=made.lineage, tags=tags, files={SAMPLES_FILE: path})


def run_pgd(
    cfg: PGDConfig,
    generator: LoadedGenerator,
    real: Dataset,
    catalog: Catalog,
    name: str,
    out: Path,
    *,
    real_lineage: dict[str, Any] | None = None,
    every: int = 0,
    callback: Callback | None = None,
    progress: bool = True,
) -> PGDResult:
    """Run the loop; returns the final agent (``out/agent.d3``), the committed versions and the losses."""
    out = Path(out)
    check_initial_target_file(cfg.initial_target)
    (out / "agents").mkdir(parents=True, exist_ok=True)
    final = out / "agent.d3"
    if final.exists():
        raise RlsynthError(f"{final}: exists (a finished PGD run; use a new output folder)")
    rng = np.random.default_rng(cfg.seed)
    algo: Any = None
    log = TrainingLog([], [])
    rounds: list[PGDRound] = []
    previous: str | None = None
    kept: np.ndarray | None = None
    regen = cfg.regeneration
    refiner = refiner_for(generator, SampleOptions())  # autoregressive drafts: the recorded refiner
    # A warm start presumes the last set was drawn for a nearby target: an unguided round 0 was not.
    first_warm = 1 if cfg.initial_target is not None else 2
    for r in range(cfg.rounds):
        start = r * cfg.regenerate_every
        target: Path | None = None
        if r == 0 and cfg.initial_target is not None:
            target = Path(cfg.initial_target).resolve()
        elif r > 0 and cfg.guidance.terms:
            target = out / "agents" / f"step-{start}.d3"
            save_agent(algo, target, {"pgd_round": r, "step": start, "algo": cfg.algo})
        gcfg = None
        if target is not None:
            gcfg = replace(cfg.guidance, policy=str(target) if "policy" in cfg.guidance.terms else None)
        warm = None
        if kept is not None and previous is not None and r >= first_warm:
            aim = None if gcfg is None else gcfg.policy
            measure = (
                None if regen.warm_sigma is not None else pilot_measure(generator, aim, real, cfg.guidance)
            )
            warm = WarmFrom(kept, previous, regen, measure, PILOT_RULES)
        tic = time.perf_counter()
        made = synthesize(
            generator,
            real,
            cfg.synthetic_transitions,
            cfg.sampler,
            gcfg,
            seed=cfg.seed * 1_000_003 + r,
            source_ref=real_lineage,
            refiner=refiner,
            producer={
                "name": "pgd",
                "round": r,
                "agent_step": start,
                "previous": previous,
                "config": asdict(cfg),
            },
            warm=warm,
            keep=regen.warm,
        )
        seconds = time.perf_counter() - tic
        synth, lineage = made.dataset, made.lineage
        started = lineage["sampling"]["warm_start"]
        if started is not None and not started["cold"] and regen.warm_sigma is None:
            # Chosen once, by the first warm round's pilots; later rounds reuse it (a round whose
            # pilots found nothing was cold, and the next round tries again).
            regen = replace(
                regen,
                warm_sigma=started["sigma_start"],
                warm_steps=started["steps"],
                warm_polish=started["polish"],
            )
        ref = _commit(catalog, name, made, {"generator": generator.kind, "pgd_round": r})
        previous, kept = str(ref), made.samples
        rounds.append(
            PGDRound(
                r,
                start,
                previous,
                None if target is None else str(target),
                None if started is None else started["sigma_start"],
                seconds,
            )
        )
        parts = [(synth, cfg.synthetic_rows)] + ([(real, cfg.real_rows)] if cfg.real_rows else [])
        mixture = Mixture.of(parts)
        if algo is None:
            algo = build_algo(cfg.algo, mixture, mixture.batch_size, cfg.seed)
        n = min(cfg.regenerate_every, cfg.steps - start)
        part = fit(
            algo,
            mixture,
            n,
            rng,
            start=start,
            every=every,
            callback=callback,
            progress=progress,
            desc=f"pgd round {r}",
        )
        log.steps.extend(part.steps)
        log.metrics.extend(part.metrics)
    save_agent(algo, final, {"algo": cfg.algo, "steps": cfg.steps, "pgd_rounds": [asdict(x) for x in rounds]})
    return PGDResult(final, tuple(rounds), log)
