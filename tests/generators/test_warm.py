"""Warm starts (:mod:`generators.warm`, :mod:`generators.regeneration`): the contraction estimate against
the Gaussian closed form, σ_start = σ_max reproducing a cold round, kept samples, and bad inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from helpers import SharedGenerator, random_hopper

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators.api import (
    SampleOptions,
    WarmFrom,
    WarmStart,
    choose,
    draw,
    load_samples,
    plan_warm,
    save_samples,
)
from rlsynth.generators.edm import EDMConfig, generate
from rlsynth.generators.options import OptionError, Regeneration
from rlsynth.generators.tokens import decode_windows
from rlsynth.generators.warm import (
    Candidate,
    Choice,
    Resample,
    Rule,
    contraction,
    ladder,
    matches,
    warm_steps,
)

MU, S = 0.3, 0.7
"""The Gaussian toy: data N(MU, S²) in every dimension."""


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact posterior mean E[x0 | x] for N(MU, S²) data under noise σ."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + S**2 / (S**2 + s**2) * (x - MU)


def gaussian_resample(steps: int = 60) -> Resample:
    """Warm-started EDM sampling of the Gaussian toy; row i's noise depends on its index only."""
    edm = EDMConfig()

    def noise(shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def resample(starts: np.ndarray, how: Candidate) -> np.ndarray:
        x = torch.from_numpy(starts).double()
        return generate(
            gaussian_denoiser, x.shape, steps, edm, noise, x_init=x, sigma_start=how.sigma_start
        ).numpy()

    return resample


@pytest.mark.parametrize("sigma", [0.2, 0.7, 2.0, 10.0])
def test_contraction_on_a_gaussian_matches_its_closed_form(sigma: float) -> None:
    """For N(μ, s²) the ODE from σ maps x to μ + s/√(s² + σ²)(x − μ): c(σ) = s/√(s² + σ²)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(MU, S, (16, 4, 3)), rng.normal(MU, S, (16, 4, 3))
    how = Candidate(sigma, 60, 0)
    c = contraction(gaussian_resample(), a, b, how, np.ones(3))
    assert c is not None and contraction(gaussian_resample(), a, a, how, np.ones(3)) is None
    assert c == pytest.approx(S / math.sqrt(S**2 + sigma**2), rel=2e-3)


def test_the_choice_is_the_smallest_sigma_whose_pilot_matches_the_cold_spread() -> None:
    """Starts with no spread (v = 0) noised to σ end with std s·σ/√(s² + σ²) (the affine ODE map), so
    the spread ratio to a cold round is σ/√(s² + σ²): within 5% from σ ≥ 1.825 for s = 0.6, which on
    the ladder is σ = 2 (1.5 gives 0.928, 2 gives 0.958). Bisection finds it in a few pilots."""
    s = 0.6
    rng = np.random.default_rng(1)
    starts = np.full((20000, 5), MU)
    cold = rng.normal(MU, s, (20000, 5))
    edm = EDMConfig()

    def run(cold_cost: int) -> Choice:
        return choose(
            gaussian_resample(), starts, cold, np.ones(5), sigmas=ladder(edm), polishes=(0,),
            steps_of=lambda sig: warm_steps(20, edm, sig), cold_cost=cold_cost,
        )  # fmt: skip

    old = globals()["S"]
    globals()["S"] = s
    try:
        choice, cheap = run(100), run(5)
    finally:
        globals()["S"] = old
    assert choice.pick is not None and choice.pick.sigma_start == 2.0
    assert choice.rungs[0].candidate.sigma_start == 80.0 and choice.rungs[0].passed
    assert len(choice.rungs) <= 1 + math.ceil(math.log2(len(ladder(edm))))
    for r in choice.rungs:
        closed = r.candidate.sigma_start / math.sqrt(s**2 + r.candidate.sigma_start**2)
        assert r.spread / choice.cold_spread == pytest.approx(closed, abs=0.02)
        assert r.passed == (r.candidate.sigma_start >= 2.0)
    assert choice.to_json()["rungs"][0]["passed"] is True  # type: ignore[index]
    # Nothing cheaper than the cold round: no pick (the round is sampled cold).
    assert cheap.pick is None and cheap.rungs == ()


def test_a_measure_may_differ_freely_only_on_its_good_side() -> None:
    cold = {"err": np.linspace(0.9, 1.1, 100), "ll": np.linspace(-1.1, -0.9, 100)}
    better = {"err": cold["err"] - 0.5, "ll": cold["ll"] + 0.5}
    worse = {"err": cold["err"] + 0.5, "ll": cold["ll"] - 0.5}
    rules = {"err": Rule("lower"), "ll": Rule("higher")}
    assert matches(cold, better, rules, 2.0) and matches(cold, cold, rules, 2.0)
    assert not matches(cold, worse, rules, 2.0)
    assert not matches(cold, better, {"err": Rule(), "ll": Rule()}, 2.0)
    near = {"err": cold["err"] + 0.01, "ll": cold["ll"]}  # 0.01 is under 2 standard errors (0.016)
    assert matches(cold, near, rules, 2.0) and not matches(cold, near, rules, 0.5)
    # The stated tolerances: 0.5 worse passes with 50% relative slack on a mean of 1, or 0.5 absolute.
    slack = {"err": Rule("lower", relative=0.5), "ll": Rule("higher", absolute=0.5)}
    assert matches(cold, worse, slack, 0.1)
    with pytest.raises(RlsynthError, match="side must be one of lower, higher, both"):
        Rule("up")


def test_a_warm_start_from_sigma_max_forgets_its_start_and_keeps_the_distribution() -> None:
    """Starts drawn far from the data (mean +3) end where a cold round does: the bias left is
    c(σ_max)·3 ≈ 0.03, and the output variance is s²(v + σ²)/(s² + σ²) ≈ s²."""
    rng = np.random.default_rng(2)
    starts = rng.normal(MU + 3.0, 0.1, (4000, 2))
    out = gaussian_resample(steps=40)(starts, Candidate(80.0, 40, 0))
    bias = 3.0 * S / math.sqrt(S**2 + 80.0**2)
    assert out.mean() == pytest.approx(MU + bias, abs=0.03)
    assert out.std() == pytest.approx(S, rel=0.03)


def test_warm_steps_keep_the_cold_schedules_density() -> None:
    edm = EDMConfig()
    assert warm_steps(20, edm, edm.sigma_max) == 20
    assert warm_steps(20, edm, 1.0) == 8  # the 20-step ρ = 7 schedule spends 8 steps at σ ≤ 1
    assert warm_steps(20, edm, 1e-3) == 1


def test_sigma_max_with_the_full_schedule_from_the_data_mean_is_a_cold_round(
    shared_generator: SharedGenerator,
) -> None:
    """Starting from the normaliser's mean (0 in normalised space) at σ_max, x_init + σ_max·n is the cold
    start σ_max·n exactly, so the samples are identical, not just alike."""
    gen = shared_generator("trajectory")
    src = random_hopper()
    opts = SampleOptions(seed=5, polish=2)
    cold, kept = draw(gen, src, 40, opts, keep=True)
    assert kept is not None
    mean = np.broadcast_to(gen.norms["tokens"].mean, (256, *kept.shape[1:])).copy()
    steps = gen.model.cfg.sample_steps  # type: ignore[union-attr]
    warm = WarmStart(mean, gen.model.cfg.edm.sigma_max, steps, 2, "mean")  # type: ignore[union-attr]
    again, _ = draw(gen, src, 40, opts, warm=warm)
    np.testing.assert_array_equal(again.transitions.observations, cold.transitions.observations)
    np.testing.assert_array_equal(again.transitions.actions, cold.transitions.actions)


@pytest.mark.parametrize("kind", ["trajectory", "transition"])
def test_kept_samples_decode_to_the_dataset_and_warm_rounds_start_from_them(
    shared_generator: SharedGenerator, kind: str
) -> None:
    gen = shared_generator(kind)
    src = random_hopper()
    ds, kept = draw(gen, src, 50, SampleOptions(seed=1), keep=True)
    assert kept is not None and kept.dtype == np.float32
    if kind == "trajectory":
        block, idx = decode_windows(gen.layout, kept)
        assert len(idx) == len(kept)  # every kept window gave an episode
        lengths = np.diff(block.episode_bounds())
        assert lengths[:-1].sum() < 50 <= lengths.sum()  # the last one was cut to 50
        np.testing.assert_allclose(
            ds.transitions.observations[: lengths[0]], block.observations[: lengths[0]]
        )
    else:
        assert len(kept) == 50
        np.testing.assert_allclose(ds.transitions.rewards, kept[:, gen.layout.obs_dim + gen.layout.act_dim])
    warm = WarmStart(kept, 0.5, 2, 0, "prev")
    ds2, kept2 = draw(gen, src, 50, SampleOptions(seed=2), warm=warm, keep=True)
    assert ds2.n_transitions == 50 and kept2 is not None
    # A low σ_start changes the samples by little: the warm round stays near its start.
    assert 0 < np.abs(kept2[: len(kept)] - kept[: len(kept2)]).mean() < np.abs(kept - kept.mean(0)).mean()


def test_a_warm_round_too_short_is_filled_from_noise_sized_to_what_is_missing(
    shared_generator: SharedGenerator,
) -> None:
    gen = shared_generator("trajectory")
    src = random_hopper()
    _, kept = draw(gen, src, 30, SampleOptions(seed=1), keep=True)
    assert kept is not None
    ds, more = draw(gen, src, 100, SampleOptions(seed=1), warm=WarmStart(kept, 0.5, 2), keep=True)
    assert ds.n_transitions == 100 and more is not None
    np.testing.assert_array_less(len(more), 256)  # not rounded up to a whole chunk of 256


def test_plan_warm_reseeds_its_share_and_chooses_sigma_from_the_guided_sampler(
    shared_generator: SharedGenerator,
) -> None:
    gen = shared_generator("trajectory")
    src = random_hopper()
    _, kept = draw(gen, src, 140, SampleOptions(seed=1), keep=True)
    assert kept is not None and len(kept) > 4
    settings = Regeneration(regenerate="warm", warm_reseed=0.25, warm_pilot=8)
    plan = plan_warm(gen, src, SampleOptions(seed=3, polish=6), WarmFrom(kept, "x@1", settings))
    assert plan.choice is not None and plan.origin == "x@1"
    tried = plan.choice.rungs
    assert all(r.candidate.cost < plan.choice.cold_cost for r in tried)
    assert tried and {r.candidate.polish for r in tried} <= {0, 6}  # 10 would cost more than cold
    if plan.warm is None:  # no candidate matched the cold pilot: the round is cold
        assert not any(r.passed for r in tried)
    else:
        assert len(plan.warm.samples) == len(kept) - round(0.25 * len(kept))
        picked = [r for r in tried if (r.candidate.sigma_start, r.candidate.polish) == (
            plan.warm.sigma_start, plan.warm.polish)]  # fmt: skip
        assert len(picked) == 1 and picked[0].passed
    given = plan_warm(gen, src, SampleOptions(seed=3), WarmFrom(kept, "x@1", Regeneration(
        regenerate="warm", warm_sigma=1.0, warm_reseed=0.0)))  # fmt: skip
    assert given.choice is None and given.warm is not None and given.warm.sigma_start == 1.0
    rows = {r.tobytes() for r in kept}
    assert all(r.tobytes() in rows for r in given.warm.samples)
    assert given.warm.steps == warm_steps(gen.model.cfg.sample_steps, gen.model.cfg.edm, 1.0)  # type: ignore[union-attr]
    everything = Regeneration(regenerate="warm", warm_sigma=1.0, warm_reseed=1.0)
    assert plan_warm(gen, src, SampleOptions(), WarmFrom(kept, "x@1", everything)).warm is None


def test_bad_warm_starts_are_refused_in_one_line(shared_generator: SharedGenerator) -> None:
    gen = shared_generator("trajectory")
    src = random_hopper()
    ok = np.zeros((4, 8, gen.layout.dim), np.float32)
    with pytest.raises(RlsynthError, match=r"rows of shape \(3,\), this trajectory generator samples"):
        draw(gen, src, 10, warm=WarmStart(np.zeros((4, 3), np.float32), 1.0, 2, origin="v@1"))
    with pytest.raises(RlsynthError, match="sigma_start must be positive"):
        WarmStart(ok, 0.0, 2)
    with pytest.raises(RlsynthError, match="steps must be a positive integer"):
        WarmStart(ok, 1.0, 0)
    with pytest.raises(RlsynthError, match="must be finite"):
        WarmStart(np.full_like(ok, np.nan), 1.0, 2)
    with pytest.raises(RlsynthError, match="cannot be warm-started"):
        draw(shared_generator("world-model"), src, 10, warm=WarmStart(ok, 1.0, 2))
    with pytest.raises(OptionError, match=r"warm_z must be in \(0, 10\]"):
        Regeneration(regenerate="warm", warm_z=0)
    with pytest.raises(OptionError, match="regenerate must be one of cold, warm"):
        Regeneration(regenerate="tepid")
    with pytest.raises(OptionError, match="is cold: warm_sigma"):
        Regeneration(warm_sigma=1.0)


def test_samples_file_round_trip_and_refusals(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = save_samples(x, folder)
    np.testing.assert_array_equal(load_samples(path.read_bytes(), (3, 4), "v@1"), x)
    with pytest.raises(RlsynthError, match=r"v@1: expected one float32 tensor 'samples' of rows \(4, 3\)"):
        load_samples(path.read_bytes(), (4, 3), "v@1")
    with pytest.raises(RlsynthError, match="not a valid safetensors file"):
        load_samples(b"\xff" * 16, (3, 4), "v@1")
