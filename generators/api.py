"""Train, load and sample generators by kind: the public face of :mod:`generators`, what the CLI, the
pipeline and the benchmarks call. Each idea lives in its own module and is re-exported here:

- :mod:`generators.families`: the four families (data preparation, model, sampling), ``FAMILIES``, ``KINDS``
- :mod:`generators.sampling`: ``LoadedGenerator``, ``SampleOptions``, resolved sampler settings, trimming
- :mod:`generators.seeds`: per-sample noise seeds
- :mod:`generators.presets`: ``PRESETS`` and ``preset``
- :mod:`generators.trainer`: ``train_generator`` and its staging folder
- :mod:`generators.loading`: ``load_generator`` (every file checked) and the refiner of a drafter
- :mod:`generators.lineage`: what a sampled version records about its generator
- :mod:`generators.warm`: warm starts from earlier samples, their σ_start chosen by measured contraction

A trained generator is a folder (see :mod:`generators.checkpoint`): ``config.json`` (kind, model and
training config, the source dataset and its lineage entry), ``normaliser.json``, ``model.safetensors``,
the resumable training state, ``train.json`` (loss history, timings) and ``loss.png``.

Every family samples in fixed chunks whose randomness depends on (seed, sample index) only, so a sample
does not depend on how a caller splits the work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset, concat_transitions
from rlsynth.datasets.validation import validate_transitions
from rlsynth.generators.families import (
    FAMILIES,
    KINDS,
    AutoregressiveFamily,
    Family,
    TrajectoryFamily,
    TransitionFamily,
    WorldModelFamily,
    layout_of,
    window_data,
)
from rlsynth.generators.lineage import generator_lineage, training_lineage
from rlsynth.generators.loading import load_generator, record_refiner, refiner_for
from rlsynth.generators.presets import PRESETS, preset
from rlsynth.generators.regeneration import WarmFrom, WarmPlan, diffused, plan_warm
from rlsynth.generators.sampling import (
    CHUNKS,
    Drawn,
    Guide,
    LoadedGenerator,
    SampleOptions,
    codec,
    episode_count,
    trim,
    used_settings,
)
from rlsynth.generators.seeds import sample_seed, sample_seeds
from rlsynth.generators.trainer import (
    BUDGET_CAP_FACTOR,
    STAGING_SUFFIX,
    staging_folder,
    train_generator,
    training_folder,
)
from rlsynth.generators.warm import (
    SAMPLES_FILE,
    Measure,
    Rule,
    WarmStart,
    choose,
    load_samples,
    save_samples,
)

__all__ = [
    "BUDGET_CAP_FACTOR",
    "CHUNKS",
    "FAMILIES",
    "KINDS",
    "PRESETS",
    "SAMPLES_FILE",
    "STAGING_SUFFIX",
    "AutoregressiveFamily",
    "Family",
    "Guide",
    "LoadedGenerator",
    "Measure",
    "Rule",
    "SampleOptions",
    "TrajectoryFamily",
    "TransitionFamily",
    "WarmFrom",
    "WarmPlan",
    "WarmStart",
    "WorldModelFamily",
    "choose",
    "codec",
    "diffused",
    "draw",
    "draw_chunks",
    "generator_lineage",
    "layout_of",
    "load_generator",
    "load_samples",
    "plan_warm",
    "preset",
    "record_refiner",
    "refiner_for",
    "sample",
    "sample_seed",
    "sample_seeds",
    "save_samples",
    "staging_folder",
    "train_generator",
    "training_folder",
    "training_lineage",
    "trim",
    "used_settings",
    "window_data",
]


def draw(
    gen: LoadedGenerator,
    source: Dataset,
    n_transitions: int,
    opts: SampleOptions | None = None,
    *,
    warm: WarmStart | None = None,
    keep: bool = False,
) -> tuple[Dataset, np.ndarray | None]:
    """Exactly ``n_transitions`` validated transitions from ``gen`` (``source`` gives start states),
    warm-started from ``warm`` when given, and, with ``keep``, the raw samples they were decoded from
    (row i of the samples for episode i of the dataset; what a later warm start needs)."""
    drawn = list(draw_chunks(gen, source, n_transitions, opts, warm=warm, keep=keep))
    t = concat_transitions([d.transitions for d in drawn])
    samples = np.concatenate([d.samples for d in drawn if d.samples is not None]) if keep else None
    return Dataset(info=gen.info, transitions=t, source=f"{gen.kind} samples"), samples


def draw_chunks(
    gen: LoadedGenerator,
    source: Dataset,
    n_transitions: int,
    opts: SampleOptions | None = None,
    *,
    warm: WarmStart | None = None,
    keep: bool = False,
) -> Iterator[Drawn]:
    """:func:`draw`'s transitions chunk by chunk as the family makes them (episode ids numbered on from
    chunk to chunk, each chunk validated), for a caller that writes them as they come
    (:meth:`datasets.catalog.Catalog.stream`). A bad request fails here, before anything is sampled."""
    o = opts or SampleOptions()
    if n_transitions < 1:
        raise RlsynthError(f"n_transitions must be positive, got {n_transitions}")
    if (
        source.info.observation_space != gen.info.observation_space
        or source.info.action_space != gen.info.action_space
    ):
        raise RlsynthError(f"{source.source} has other spaces than the generator's training data")
    if o.guidance is not None and gen.kind == "world-model":
        raise RlsynthError("world-model rollouts are steered by --policy (the agent acts), not by guidance")
    if gen.kind == "autoregressive" and (warm is not None or used_settings(gen, o)["sigma_start"] > 0):
        o = replace(o, refiner=refiner_for(gen, o))
    return _validated(gen, FAMILIES[gen.kind].chunks(gen, source, n_transitions, o, warm, keep))


def _validated(gen: LoadedGenerator, chunks: Iterator[Drawn]) -> Iterator[Drawn]:
    # The families hand their episodes over columnar: the value checks run on the flat view, as the
    # episodes' would have (their structure, one row per step, holds by construction of the block).
    offset = 0
    for c in chunks:
        t = (
            c.transitions
            if not offset
            else replace(c.transitions, episode_id=c.transitions.episode_id + offset)
        )
        validate_transitions(t, gen.info, f"{gen.kind} samples")
        offset = episode_count(t)
        yield Drawn(t, c.samples)


def sample(
    gen: LoadedGenerator, source: Dataset, n_transitions: int, opts: SampleOptions | None = None
) -> Dataset:
    """Exactly ``n_transitions`` validated transitions from ``gen`` (``source`` gives start states)."""
    return draw(gen, source, n_transitions, opts)[0]
