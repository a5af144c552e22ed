"""A warm-started round planned from a :class:`~generators.options.Regeneration`: which of the last round's
samples start it, from which σ_start (given, or chosen by measured contraction) and with how many steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset
from rlsynth.generators.families import FAMILIES, DiffusedFamily
from rlsynth.generators.options import Regeneration
from rlsynth.generators.sampling import LoadedGenerator, SampleOptions, codec, used_settings
from rlsynth.generators.seeds import sample_seed
from rlsynth.generators.warm import Choice, WarmStart, choose_sigma_start, warm_steps


@dataclass(frozen=True)
class WarmFrom:
    """Last round's raw samples (rows aligned with its version's episodes), the version they made, and
    how to warm-start from them."""

    samples: np.ndarray
    origin: str
    settings: Regeneration


@dataclass(frozen=True)
class WarmPlan:
    warm: WarmStart | None
    """None when every sample is reseeded from noise (a cold round)."""
    choice: Choice | None
    """The contraction curve σ_start was read from (None when it was given)."""


def diffused(gen: LoadedGenerator) -> DiffusedFamily:
    """The family of a generator whose samples can be warm-started and kept (not the world model)."""
    fam = FAMILIES[gen.kind]
    if not isinstance(fam, DiffusedFamily):
        raise RlsynthError(f"{gen.kind} rollouts are not diffused: they cannot be warm-started")
    return fam


def plan_warm(gen: LoadedGenerator, source: Dataset, opts: SampleOptions, frm: WarmFrom) -> WarmPlan:
    """The warm start of a round sampled with ``opts`` (its guidance included, so the contraction is the
    guided sampler's): a ``1 − warm_reseed`` share of ``frm.samples`` in an order drawn from the round's
    seed, σ_start as given or the smallest on the ladder whose contraction ≤ ``warm_tolerance``, and
    ``warm_steps`` or the cold schedule's step density below σ_start."""
    fam, s = diffused(gen), frm.settings
    if tuple(frm.samples.shape[1:]) != fam.sample_shape(gen):
        raise RlsynthError(
            f"warm start from {frm.origin}: rows of shape {tuple(frm.samples.shape[1:])}, this "
            f"{gen.kind} generator samples {fam.sample_shape(gen)}"
        )
    m = len(frm.samples)
    keep = m - round(s.warm_reseed * m)
    if keep < 1:
        return WarmPlan(None, None)
    order = np.random.default_rng(sample_seed(opts.seed, 0)).permutation(m)[:keep]
    starts = frm.samples[np.sort(order)]
    polish = s.warm_polish if s.warm_polish is not None else int(used_settings(gen, opts)["polish"])
    edm, cold = fam.warm_schedule(gen, opts)
    choice = None
    sigma = s.warm_sigma
    if sigma is None:
        scale = codec(gen).std
        choice = choose_sigma_start(
            fam.resampler(gen, source, opts, polish), starts, scale, edm, s.warm_tolerance
        )
        sigma = choice.sigma_start
    steps = s.warm_steps if s.warm_steps is not None else warm_steps(cold, edm, sigma)
    return WarmPlan(WarmStart(starts, float(sigma), steps, polish, frm.origin), choice)
