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
from rlsynth.generators.warm import Choice, Measure, Rule, WarmStart, choose, ladder, warm_steps

PILOT_FIRST = 1 << 40
"""Sample index of the cold pilot's first sample: far past any round's, so it shares no noise with one."""

POLISH_CANDIDATES = (0, 10)
"""Polish iterations a warm round may use (with the cold rounds'): its starts were polished already, so
less may do; the pilots decide."""


@dataclass(frozen=True)
class WarmFrom:
    """Last round's raw samples (rows aligned with its version's episodes), the version they made, and
    how to warm-start from them."""

    samples: np.ndarray
    origin: str
    settings: Regeneration
    measure: Measure | None = None
    """What σ_start's pilots are compared on (per-sample values; spread is always compared)."""
    rules: dict[str, Rule] | None = None
    """Per measure, how far a warm pilot may differ from the cold one (default :class:`Rule`())."""


@dataclass(frozen=True)
class WarmPlan:
    warm: WarmStart | None
    """None: the round is sampled cold (every sample reseeded, or no candidate matched a cold pilot)."""
    choice: Choice | None = None
    """The pilots σ_start was chosen by (None when it was given)."""
    origin: str = ""


def diffused(gen: LoadedGenerator) -> DiffusedFamily:
    """The family of a generator whose samples can be warm-started and kept (not the world model)."""
    fam = FAMILIES[gen.kind]
    if not isinstance(fam, DiffusedFamily):
        raise RlsynthError(f"{gen.kind} rollouts are not diffused: they cannot be warm-started")
    return fam


def plan_warm(gen: LoadedGenerator, source: Dataset, opts: SampleOptions, frm: WarmFrom) -> WarmPlan:
    """The warm start of a round sampled with ``opts`` (its guidance included: the pilots are guided as
    the round is): a ``1 − warm_reseed`` share of ``frm.samples`` in an order drawn from the round's
    seed. σ_start, steps and polish as given, or the cheapest (σ_start on the ladder, polish) at which a
    pilot warm round from the first ``warm_pilot`` starts matches a pilot cold round of as many samples
    (:func:`generators.warm.choose`), steps at the cold schedule's density below σ_start; when none
    matches below the cold round's cost, the round is cold."""
    fam, s = diffused(gen), frm.settings
    fam.check_rows(gen, frm.samples, frm.origin)  # before any pilot runs
    m = len(frm.samples)
    keep = m - round(s.warm_reseed * m)
    if keep < 1:
        return WarmPlan(None, None, frm.origin)
    order = np.random.default_rng(sample_seed(opts.seed, 0)).permutation(m)[:keep]
    starts = frm.samples[np.sort(order)]
    cold_polish = int(used_settings(gen, opts)["polish"])
    edm, cold_steps = fam.warm_schedule(gen, opts)
    if s.warm_sigma is not None:
        sigma = s.warm_sigma
        steps = s.warm_steps if s.warm_steps is not None else warm_steps(cold_steps, edm, sigma)
        polish = s.warm_polish if s.warm_polish is not None else cold_polish
        return WarmPlan(WarmStart(starts, float(sigma), steps, polish, frm.origin), None, frm.origin)
    polishes = (s.warm_polish,) if s.warm_polish is not None else sorted({*POLISH_CANDIDATES, cold_polish})
    fixed = s.warm_steps

    def steps_of(sigma: float) -> int:
        return fixed if fixed is not None else warm_steps(cold_steps, edm, sigma)

    pilot = starts[: s.warm_pilot]
    cold_pilot = fam.maker(gen, source, opts, None)(PILOT_FIRST, len(pilot), None)
    choice = choose(
        fam.resampler(gen, source, opts), pilot, cold_pilot, codec(gen).std, sigmas=ladder(edm),
        polishes=polishes, steps_of=steps_of, cold_cost=fam.cold_cost(gen, opts), measure=frm.measure,
        rules=frm.rules, z=s.warm_z,
    )  # fmt: skip
    if choice.pick is None:
        return WarmPlan(None, choice, frm.origin)
    c = choice.pick
    return WarmPlan(WarmStart(starts, c.sigma_start, c.steps, c.polish, frm.origin), choice, frm.origin)
