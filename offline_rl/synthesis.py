"""One synthesis path: a generator, start states, a count, sampler settings and guidance -> a synthetic
:class:`~datasets.types.Dataset` and its lineage.

``generator sample``, the run's Ray shard tasks, the PGD loop and the benchmarks all sample through
:func:`synthesize`, so every synthetic version records one lineage shape whoever made it (the keys are
:data:`LINEAGE_KEYS`, documented in README, "Lineage of a synthetic version"). It lives in ``offline_rl``
because the PGD loop is the lowest layer that samples; ``pipeline`` and ``bench`` import it downward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlsynth.datasets.catalog import Catalog, VersionRef
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.sources import file_sha256
from rlsynth.datasets.types import Dataset
from rlsynth.generators.api import (
    LoadedGenerator,
    SampleOptions,
    WarmFrom,
    WarmPlan,
    WarmStart,
    draw,
    draw_chunks,
    generator_lineage,
    plan_warm,
    refiner_for,
    sample_seed,
    used_settings,
)
from rlsynth.generators.options import MAX_INT, SamplerSettings
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.guidance.policies import load_policy
from rlsynth.guidance.spec import build_guidance
from rlsynth.guidance.terms import Guidance

LINEAGE_KEYS = ("sources", "generator", "sampling", "seeds", "shards", "agent", "guidance", "producer")
"""The top-level keys of every synthetic version's lineage, in this order."""


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of one synthesis; it samples with ``sample_seed(seed, index)`` so the
    parts never share noise and a resumed part repeats its content."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_INT or not 0 <= self.index < self.count:
            raise RlsynthError(f"shard {self.index} of {self.count}: need 0 ≤ index < count")


@dataclass(frozen=True)
class Synthesis:
    dataset: Dataset
    lineage: dict[str, Any]
    """Keys :data:`LINEAGE_KEYS`; JSON-ready, for ``Catalog.write`` or a transaction's commit."""
    samples: np.ndarray | None = None
    """With ``keep``: the raw samples the dataset's episodes were decoded from, in order (kept with the
    version as :data:`generators.warm.SAMPLES_FILE`, where a warm start reads them)."""


def synthesize(
    generator: LoadedGenerator,
    source: Dataset,
    n_transitions: int,
    settings: SamplerSettings | None = None,
    guidance: GuidanceConfig | None = None,
    *,
    seed: int = 0,
    source_ref: dict[str, Any] | None = None,
    actor: str | Path | None = None,
    refiner: LoadedGenerator | None = None,
    shard: Shard | None = None,
    producer: dict[str, Any] | None = None,
    warm: WarmStart | WarmFrom | None = None,
    keep: bool = False,
) -> Synthesis:
    """Sample ``n_transitions`` from ``generator`` starting from ``source``'s states, in memory
    (:func:`plan_synthesis` says what each argument does; ``keep`` returns the raw samples too)."""
    return plan_synthesis(
        generator,
        source,
        n_transitions,
        settings,
        guidance,
        seed=seed,
        source_ref=source_ref,
        actor=actor,
        refiner=refiner,
        shard=shard,
        producer=producer,
        warm=warm,
    ).draw(keep=keep)


@dataclass(frozen=True)
class SynthesisPlan:
    """A checked synthesis request and the lineage its set will record (:func:`plan_synthesis`), drawn
    in memory (:meth:`draw`) or written to a catalog as it is sampled (:meth:`write`)."""

    generator: LoadedGenerator
    source: Dataset
    n_transitions: int
    opts: SampleOptions
    warm: WarmStart | None
    lineage: dict[str, Any]

    def draw(self, *, keep: bool = False) -> Synthesis:
        ds, samples = draw(
            self.generator, self.source, self.n_transitions, self.opts, warm=self.warm, keep=keep
        )
        return Synthesis(ds, self.lineage, samples)

    def write(self, catalog: Catalog, name: str, *, tags: Mapping[str, Any] | None = None) -> VersionRef:
        """Commit the set as the next version of ``name``, each chunk handed to the catalog as it is
        sampled (:meth:`~datasets.catalog.Catalog.stream`): parts are written while sampling goes on,
        memory holds a few parts rather than the set, and the files and content hash are those of
        ``catalog.write(name, self.draw().dataset)``. An error or interrupt leaves no version."""
        g, n = self.generator, self.n_transitions
        with catalog.stream(name, g.info) as out:
            for chunk in draw_chunks(g, self.source, n, self.opts, warm=self.warm):
                out.add(chunk.transitions)
            return out.commit(lineage=self.lineage, tags=tags)


def plan_synthesis(
    generator: LoadedGenerator,
    source: Dataset,
    n_transitions: int,
    settings: SamplerSettings | None = None,
    guidance: GuidanceConfig | None = None,
    *,
    seed: int = 0,
    source_ref: dict[str, Any] | None = None,
    actor: str | Path | None = None,
    refiner: LoadedGenerator | None = None,
    shard: Shard | None = None,
    producer: dict[str, Any] | None = None,
    warm: WarmStart | WarmFrom | None = None,
) -> SynthesisPlan:
    """Check a request to sample ``n_transitions`` from ``generator`` starting from ``source``'s states,
    and resolve what its set's lineage records; nothing is sampled yet (a warm start's pilots aside).

    ``guidance`` names its files (target agent, world model); ``actor`` is the agent that acts in
    world-model rollouts; ``refiner`` overrides the one recorded for autoregressive drafts;
    ``source_ref`` is how the start states are recorded (default: the dataset's source string);
    ``producer`` holds what only its maker knows (a PGD round, a run folder), ``name`` first;
    ``warm`` starts from earlier samples, as a :class:`WarmStart` or planned here from a
    :class:`WarmFrom` with this call's guidance (:func:`generators.api.plan_warm`; recorded as
    ``sampling.warm_start``)."""
    s = settings if settings is not None else SamplerSettings()
    _check_inputs(generator, n_transitions, s, guidance, seed, actor)
    if shard is not None and not isinstance(shard, Shard):
        raise RlsynthError(f"shard must be a Shard(index, count), got {shard!r}")
    if warm is not None and not isinstance(warm, WarmStart | WarmFrom):
        raise RlsynthError(f"warm must be a WarmStart or WarmFrom, got {type(warm).__name__}")
    if refiner is not None and generator.kind != "autoregressive":
        raise RlsynthError(
            f"only autoregressive drafts take a refiner; {generator.folder} is {generator.kind}"
        )
    g = build_guidance(guidance, generator.info) if guidance is not None else None
    policy = load_policy(actor).mean_action if actor is not None else None
    ref = refiner if refiner is not None else refiner_for(generator, SampleOptions())
    noise_seed = seed if shard is None else sample_seed(seed, shard.index)
    opts = SampleOptions.of(s, seed=noise_seed, policy=policy, refiner=ref, guidance=g)
    used = used_settings(generator, opts)  # before sampling: a bad setting fails in one line, at once
    plan = (
        plan_warm(generator, source, opts, warm)
        if isinstance(warm, WarmFrom)
        else WarmPlan(warm, None, "" if warm is None else warm.origin)
    )
    lineage = {
        "sources": [source_ref or {"source": source.source}],
        "generator": generator_lineage(generator, ref),
        # The settings used (the model's defaults resolved), not the options as given.
        "sampling": {"n_transitions": n_transitions, **used, "warm_start": _warm_lineage(plan)},
        "seeds": {"sample": seed},
        "shards": None if shard is None else {"index": shard.index, "count": shard.count},
        "agent": _agent_lineage(actor, "actor") if actor is not None else _target_lineage(guidance),
        "guidance": None if g is None or guidance is None else _guidance_lineage(guidance, g),
        "producer": producer or {"name": "library"},
    }
    return SynthesisPlan(generator, source, n_transitions, opts, plan.warm, lineage)


def _check_inputs(
    gen: LoadedGenerator,
    n: int,
    settings: SamplerSettings,
    guidance: GuidanceConfig | None,
    seed: int,
    actor: str | Path | None,
) -> None:
    """Refuse a bad request in one line before anything is loaded or sampled."""
    if not isinstance(gen, LoadedGenerator):
        raise RlsynthError(
            f"synthesize needs a loaded generator (generators.api.load_generator), got {gen!r}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_INT:
        raise RlsynthError(f"n_transitions must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) > MAX_INT:
        raise RlsynthError(f"seed must be an integer of at most {MAX_INT}, got {seed!r}")
    if not isinstance(settings, SamplerSettings):
        raise RlsynthError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    if guidance is not None and not isinstance(guidance, GuidanceConfig):
        raise RlsynthError(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
    if gen.kind == "world-model" and guidance is not None and guidance.terms:
        raise RlsynthError("world-model rollouts are steered by --policy (the agent acts), not by guidance")
    if actor is not None and gen.kind != "world-model":
        raise RlsynthError(
            "an acting agent applies to world-model rollouts; diffusion samples follow one through "
            "policy guidance"
        )
    if actor is not None and not Path(actor).is_file():
        raise RlsynthError(f"{actor}: no such agent file")


def _warm_lineage(plan: WarmPlan) -> dict[str, Any] | None:
    """Where a warm start began: the version its samples came from, how many, σ_start, steps, polish,
    and the pilots it was chosen by (None when given); ``cold``: no candidate matched, sampled cold."""
    w, c = plan.warm, plan.choice
    if w is None and c is None:
        return None
    return {
        "from": plan.origin,
        "cold": w is None,
        "samples": None if w is None else len(w.samples),
        "sigma_start": None if w is None else w.sigma_start,
        "steps": None if w is None else w.steps,
        "polish": None if w is None else w.polish,
        "chosen": None if c is None else c.to_json(),
    }


def _guidance_lineage(cfg: GuidanceConfig, built: Guidance) -> dict[str, Any]:
    """The options as configured (files named) and each term as built (its resolved scale, schedule and
    point, and the target's or world model's hash)."""
    return {"options": asdict(cfg), "terms": list(built.spec)}


def _agent_lineage(path: str | Path, role: str) -> dict[str, Any]:
    """The agent file that steered the samples, pinned by its SHA-256."""
    p = Path(path)
    return {"role": role, "path": str(p.resolve()), "sha256": file_sha256(p)}


def _target_lineage(guidance: GuidanceConfig | None) -> dict[str, Any] | None:
    if guidance is None or "policy" not in guidance.terms or guidance.policy is None:
        return None
    return _agent_lineage(guidance.policy, "guidance target")


def combine_shards(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The lineage of a version made of ``parts`` (each shard's lineage, in index order): the parts must
    agree on everything but their index and size; the version records the count and every part's size."""
    if not parts:
        raise RlsynthError("no shards to combine")
    first = parts[0]
    count = len(parts)

    def common(lin: dict[str, Any]) -> dict[str, Any]:
        return {**lin, "shards": None, "sampling": {**lin["sampling"], "n_transitions": None}}

    for i, lin in enumerate(parts):
        if lin["shards"] != {"index": i, "count": count}:
            raise RlsynthError(f"shard lineage {i}: records {lin['shards']}, expected part {i} of {count}")
        if common(lin) != common(first):
            raise RlsynthError(f"shard {i} sampled with other settings than shard 0")
    sizes = [lin["sampling"]["n_transitions"] for lin in parts]
    return {
        **first,
        "sampling": {**first["sampling"], "n_transitions": sum(sizes)},
        "shards": {"count": count, "sizes": sizes},
    }
