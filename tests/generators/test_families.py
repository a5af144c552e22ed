"""Every generator family against the shared contract (:mod:`family_contract`: shapes, finiteness, seeds,
save/load, lineage, resume), and the family-specific behaviour beside it.

Models are tiny and trained for a handful of steps: these tests check the machinery, not the quality
(the benchmark measures quality).
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from family_contract import check_family
from helpers import SharedGenerator, random_hopper, tiny_generator

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators import api
from rlsynth.generators.api import KINDS, LoadedGenerator, SampleOptions, sample
from rlsynth.generators.autoregressive import AutoregressiveConfig, Drafter
from rlsynth.generators.checkpoint import CheckpointError
from rlsynth.generators.diffusion import TrajectoryDiffusion, TransitionDiffusion
from rlsynth.generators.edm import PerSampleNoise
from rlsynth.generators.nets import CausalTransformer
from rlsynth.generators.tokens import TokenLayout
from rlsynth.generators.world_model import WorldModel

CLASSES = {
    "trajectory": TrajectoryDiffusion,
    "transition": TransitionDiffusion,
    "autoregressive": Drafter,
    "world-model": WorldModel,
}


@pytest.fixture(scope="module")
def trained(shared_generator: SharedGenerator) -> dict[str, LoadedGenerator]:
    return {k: shared_generator(k) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_every_family_keeps_the_contract(
    trained: dict[str, LoadedGenerator], tmp_path: Path, kind: str
) -> None:
    """Valid samples decided by their seeds, an exact save/load round trip, lineage, and resume."""
    assert type(trained[kind].model) is CLASSES[kind]
    check_family(kind, tmp_path, trained[kind])


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_drafter_prediction_at_t_ignores_later_tokens(kv_heads: int | None) -> None:
    torch.manual_seed(0)
    net = CausalTransformer(dim=5, width=16, depth=2, heads=4, max_len=10, kv_heads=kv_heads).eval()
    x = torch.randn(3, 10, 5)
    y = x.clone()
    y[:, 6:] = torch.randn(3, 4, 5) * 10
    m1, v1 = net(x)
    m2, v2 = net(y)
    torch.testing.assert_close(m1[:, :6], m2[:, :6])
    torch.testing.assert_close(v1[:, :6], v2[:, :6])
    assert not torch.allclose(m1[:, 6:], m2[:, 6:])


def test_a_draft_tilt_moves_each_token_before_the_next_is_predicted_from_it() -> None:
    """The tilt sees (previous token, sampled token, its variance (temperature × std)²) and the next
    prediction is made from the moved token: the draft equals a teacher-forced pass over itself."""
    torch.manual_seed(0)
    layout = TokenLayout(2, 1, np.array([-1.0]), np.array([1.0]))
    drafter = Drafter(layout, AutoregressiveConfig(horizon=6, width=16, depth=1, heads=2)).eval()
    first = torch.randn(3, layout.dim)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def tilt(prev: torch.Tensor, new: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        seen.append((prev, new, var))
        return new + 1.0

    noise = PerSampleNoise([1, 2, 3], torch.device("cpu"))
    out = drafter.draft(first, noise, temperature=0.5, tilt=tilt)
    plain = drafter.draft(first, PerSampleNoise([1, 2, 3], torch.device("cpu")), temperature=0.5)
    assert len(seen) == 5
    mean, logvar = drafter.net(out[:, :-1])
    plain_mean, plain_logvar = drafter.net(plain[:, :-1])
    eps = (plain[:, 1:] - plain_mean) / (0.5 * torch.exp(0.5 * plain_logvar))  # the draft noise
    expected = mean + 0.5 * torch.exp(0.5 * logvar) * eps + 1.0
    torch.testing.assert_close(out[:, 1:], expected, rtol=1e-4, atol=1e-4)
    for k, (prev, new, var) in enumerate(seen):
        torch.testing.assert_close(prev, out[:, k])
        torch.testing.assert_close(new + 1.0, out[:, k + 1])
        torch.testing.assert_close(var, (0.5 * torch.exp(0.5 * logvar[:, k])) ** 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("kv_heads", "mlp_ratio"), [(None, 4), (2, 4), (1, 4), (1, 2)])
def test_cached_decoding_equals_the_full_pass(kv_heads: int | None, mlp_ratio: int) -> None:
    torch.manual_seed(0)
    net = CausalTransformer(
        dim=5, width=16, depth=2, heads=4, max_len=10, kv_heads=kv_heads, mlp_ratio=mlp_ratio
    ).eval()
    assert net.blocks[0].mlp[0].out_features == mlp_ratio * 16
    x = torch.randn(2, 7, 5)
    full_mean, _ = net(x)
    caches = net.new_cache()
    steps = [net.step(x[:, k : k + 1], k, caches)[0] for k in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full_mean, rtol=1e-5, atol=1e-5)
    # A prompt of several tokens at once, then one at a time: the same predictions.
    caches = net.new_cache()
    prompt = net.step(x[:, :3], 0, caches)[0]
    rest = [net.step(x[:, k : k + 1], k, caches)[0] for k in range(3, 7)]
    torch.testing.assert_close(torch.cat([prompt, *rest], 1), full_mean, rtol=1e-5, atol=1e-5)


def test_grouped_key_value_heads_equal_multi_head_attention_with_shared_weights() -> None:
    """kv_heads = 2 of 4 heads is multi-head attention whose heads 0-1 (and 2-3) have the same key and
    value projections: copy the grouped block's weights into a multi-head block and compare."""
    torch.manual_seed(0)
    w, h, kv = 16, 4, 2
    d = w // h
    grouped = CausalTransformer(dim=5, width=w, depth=1, heads=h, max_len=8, kv_heads=kv).eval()
    full = CausalTransformer(dim=5, width=w, depth=1, heads=h, max_len=8).eval()
    state = grouped.state_dict()
    for name in ("weight", "bias"):
        p = state[f"blocks.0.qkv.{name}"]
        q, k, v = p.split([w, kv * d, kv * d])
        rest = p.shape[1:]
        k, v = (z.reshape(kv, d, *rest).repeat_interleave(h // kv, 0).reshape(w, *rest) for z in (k, v))
        state[f"blocks.0.qkv.{name}"] = torch.cat([q, k, v])
    full.load_state_dict(state)
    x = torch.randn(3, 8, 5)
    torch.testing.assert_close(grouped(x)[0], full(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kv_heads"):
        CausalTransformer(dim=5, width=16, depth=1, heads=4, kv_heads=3)


def test_draft_temperature_scales_the_predictive_noise() -> None:
    """Temperature 0 follows the predictive means (each token is the mean given the ones before it);
    temperature τ (2, not the config's 0.5) moves the first drafted token by exactly τ·σ·ε."""
    from helpers import TINY

    from rlsynth.generators.autoregressive import AutoregressiveConfig
    from rlsynth.generators.tokens import TokenLayout

    torch.manual_seed(0)
    layout = TokenLayout(3, 2, -np.ones(2), np.ones(2))
    drafter = Drafter(layout, AutoregressiveConfig(**{**TINY["autoregressive"], "horizon": 6})).eval()
    first = torch.randn(4, layout.dim)
    eps = torch.randn(4, 5, layout.dim)
    with torch.no_grad():
        mean_path = drafter.draft(first, lambda shape: eps, temperature=0.0)
        mean, logvar = drafter.net(mean_path)
        torch.testing.assert_close(mean_path[:, 1:], mean[:, :-1], rtol=1e-5, atol=1e-5)
        hot = drafter.draft(first, lambda shape: eps, temperature=2.0)
    step = 2.0 * torch.exp(0.5 * logvar[:, 0]) * eps[:, 0]
    torch.testing.assert_close(hot[:, 1] - mean_path[:, 1], step, rtol=1e-5, atol=1e-5)


def test_bad_temperature_is_refused(trained: dict[str, LoadedGenerator]) -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RlsynthError, match="temperature must be a finite non-negative number"):
            sample(
                trained["autoregressive"],
                random_hopper(),
                10,
                SampleOptions(sigma_start=0.0, temperature=bad),
            )


def test_used_settings_resolve_the_model_defaults_and_the_options(
    trained: dict[str, LoadedGenerator],
) -> None:
    traj_cfg = trained["trajectory"].model.cfg  # type: ignore[union-attr]
    assert api.used_settings(trained["trajectory"], SampleOptions()) == {
        "steps": traj_cfg.sample_steps,
        "churn": traj_cfg.s_churn,
        "polish": 0,
    }
    assert api.used_settings(trained["transition"], SampleOptions(steps=3, churn=2.5, polish=4)) == {
        "steps": 3,
        "churn": 2.5,
        "polish": 4,
    }
    ar_cfg = trained["autoregressive"].model.cfg  # type: ignore[union-attr]
    assert api.used_settings(trained["autoregressive"], SampleOptions(temperature=0.9)) == {
        "steps": ar_cfg.refine_steps,
        "sigma_start": ar_cfg.sigma_start,
        "temperature": 0.9,
        "churn": 0.0,
        "polish": 0,
    }
    assert api.used_settings(trained["world-model"], SampleOptions(horizon=6)) == {"horizon": 6}


@pytest.mark.parametrize("kind", ["trajectory", "transition"])
def test_churn_changes_samples_and_keeps_them_split_independent(
    trained: dict[str, LoadedGenerator], kind: str
) -> None:
    gen = trained[kind]
    plain = sample(gen, random_hopper(), 60, SampleOptions(seed=1, steps=4, churn=0.0)).transitions
    churned = sample(gen, random_hopper(), 60, SampleOptions(seed=1, steps=4, churn=3.0)).transitions
    assert not np.array_equal(plain.observations, churned.observations)
    # Churn noise comes from each sample's own noise source: a larger request repeats the first samples.
    more = sample(gen, random_hopper(), 400, SampleOptions(seed=1, steps=4, churn=3.0)).transitions
    np.testing.assert_array_equal(more.observations[:59], churned.observations[:59])


@pytest.mark.parametrize("kind", ["trajectory", "transition"])
def test_polish_changes_samples_and_keeps_them_split_independent(
    trained: dict[str, LoadedGenerator], kind: str
) -> None:
    gen = trained[kind]
    plain = sample(gen, random_hopper(), 60, SampleOptions(seed=1, steps=4)).transitions
    polished = sample(gen, random_hopper(), 60, SampleOptions(seed=1, steps=4, polish=3)).transitions
    assert not np.array_equal(plain.observations, polished.observations)
    more = sample(gen, random_hopper(), 400, SampleOptions(seed=1, steps=4, polish=3)).transitions
    np.testing.assert_array_equal(more.observations[:59], polished.observations[:59])


def test_bad_polish_is_refused(trained: dict[str, LoadedGenerator]) -> None:
    with pytest.raises(RlsynthError, match="polish must be a non-negative number of iterations, got -2"):
        sample(trained["trajectory"], random_hopper(), 10, SampleOptions(polish=-2))
    with pytest.raises(RlsynthError, match="raw drafts"):
        sample(trained["autoregressive"], random_hopper(), 10, SampleOptions(sigma_start=0.0, polish=2))


@pytest.mark.parametrize("kind", ["trajectory", "autoregressive"])
def test_bad_churn_is_refused(trained: dict[str, LoadedGenerator], kind: str) -> None:
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(RlsynthError, match="churn must be a finite non-negative number"):
            sample(trained[kind], random_hopper(), 10, SampleOptions(sigma_start=0.0, churn=bad))


def test_refinement_with_sigma_start_zero_returns_the_draft(trained: dict[str, LoadedGenerator]) -> None:
    drafter, refiner = trained["autoregressive"], trained["trajectory"]
    raw = sample(drafter, random_hopper(), 50, SampleOptions(seed=3, sigma_start=0.0)).transitions
    with_refiner = sample(
        drafter, random_hopper(), 50, SampleOptions(seed=3, sigma_start=0.0, refiner=refiner)
    ).transitions
    np.testing.assert_array_equal(raw.observations, with_refiner.observations)
    refined = sample(
        drafter, random_hopper(), 50, SampleOptions(seed=3, sigma_start=0.5, steps=2, refiner=refiner)
    )
    assert not np.array_equal(refined.transitions.observations, raw.observations)


def test_drafts_start_from_real_states(trained: dict[str, LoadedGenerator]) -> None:
    ds = sample(trained["autoregressive"], random_hopper(), 40, SampleOptions(seed=0, sigma_start=0.0))
    real = {r.tobytes() for r in random_hopper().transitions.observations}
    starts = ds.transitions.observations[ds.transitions.step == 0]
    assert all(s.tobytes() in real for s in starts)


def test_per_sample_noise_makes_network_sampling_split_independent(
    trained: dict[str, LoadedGenerator],
) -> None:
    gen = trained["trajectory"]
    cfg = gen.model.cfg  # type: ignore[union-attr]
    from rlsynth.generators.edm import generate

    def run(seeds: range) -> torch.Tensor:
        with torch.no_grad():
            return generate(
                gen.model.denoiser,
                (len(seeds), 8, gen.layout.dim),
                3,
                cfg.edm,  # type: ignore[union-attr]
                PerSampleNoise(seeds),
            )

    whole = run(range(6))
    parts = torch.cat([run(range(0, 2)), run(range(2, 6))])
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-5)


def test_bad_refiner_and_missing_refiner_are_clear(trained: dict[str, LoadedGenerator]) -> None:
    with pytest.raises(RlsynthError, match="refinement needs a trajectory-diffusion model"):
        sample(trained["autoregressive"], random_hopper(), 10, SampleOptions(sigma_start=0.5))
    with pytest.raises(RlsynthError, match="is not a trajectory model"):
        sample(
            trained["autoregressive"],
            random_hopper(),
            10,
            SampleOptions(sigma_start=0.5, refiner=trained["transition"]),
        )


def test_drafts_are_refined_by_the_refiner_recorded_at_training(
    trained: dict[str, LoadedGenerator], tmp_path: Path
) -> None:
    drafter, traj = trained["autoregressive"], trained["trajectory"]
    opts = SampleOptions(seed=3, sigma_start=0.5, steps=2)
    recorded = replace(drafter, config={**drafter.config, "refiner": str(traj.folder)})
    explicit = sample(drafter, random_hopper(), 50, replace(opts, refiner=traj)).transitions
    implicit = sample(recorded, random_hopper(), 50, opts).transitions
    np.testing.assert_array_equal(explicit.observations, implicit.observations)
    assert api.refiner_for(traj, opts) is None  # only drafts are refined
    gone = replace(drafter, config={**drafter.config, "refiner": str(tmp_path / "deleted")})
    with pytest.raises(RlsynthError, match=r"recorded refiner .* is gone"):
        sample(gone, random_hopper(), 10, opts)


def test_resume_of_another_model_config_is_refused_before_config_json_changes(tmp_path: Path) -> None:
    tiny_generator("autoregressive", tmp_path / "ar", 3)
    before = (tmp_path / "ar" / "config.json").read_bytes()
    with pytest.raises(CheckpointError, match="another configuration"):
        tiny_generator("autoregressive", tmp_path / "ar", 3, temperature=0.25)
    assert (tmp_path / "ar" / "config.json").read_bytes() == before


def test_unknown_kind_and_preset() -> None:
    with pytest.raises(RlsynthError, match="unknown generator kind"):
        api.preset("gan", "cpu-small")
    with pytest.raises(RlsynthError, match="unknown preset"):
        api.preset("trajectory", "tiny")
    assert replace(api.preset("trajectory", "cpu-small")[0]).horizon == 32


def test_presets_are_fixed_step_counts_and_a_budget_plans_under_a_cap(tmp_path: Path) -> None:
    """Every preset trains a fixed step count (the same weights on any machine); ``budget_s=`` plans the
    steps that fit instead, capped by ``steps`` (here 80: 10 minutes fit far more tiny steps), and the
    version made from it says so in its lineage."""
    from helpers import TINY, TINY_TRAIN

    from rlsynth.generators.checkpoint import read_json

    assert all(cfg.budget_s is None for kind in api.PRESETS.values() for _, cfg in kind.values())
    res = api.train_generator("trajectory", random_hopper(), tmp_path / "b", steps=80, budget_s=600.0,
                              seed=0, progress=False, model_overrides=TINY["trajectory"],
                              train_overrides=TINY_TRAIN)  # fmt: skip
    assert res.steps == 80
    assert read_json(tmp_path / "b" / "config.json")["train"]["budget_s"] == 600.0
    assert read_json(tmp_path / "b" / "state.json")["planned_steps"] == 80
    budgeted = api.load_generator(tmp_path / "b", device="cpu")
    assert api.generator_lineage(budgeted)["training"] == {"steps": 80, "budget_s": 600.0}
    fixed = api.train_generator("trajectory", random_hopper(), tmp_path / "f", steps=7, seed=0,
                                progress=False, model_overrides=TINY["trajectory"],
                                train_overrides=TINY_TRAIN)  # fmt: skip
    assert fixed.steps == 7 and read_json(tmp_path / "f" / "config.json")["train"]["budget_s"] is None
    lineage = api.generator_lineage(api.load_generator(tmp_path / "f", device="cpu"))
    assert lineage["training"] == {"steps": 7, "budget_s": None}


def _burn_cpu(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(10_000))


def test_same_seed_gives_the_same_weights_under_cpu_load(tmp_path: Path) -> None:
    """A preset's weights do not depend on how fast the machine runs: the same seed trained once on a
    quiet machine and once beside two processes burning every core gives byte-identical weights."""
    from helpers import TINY, TINY_TRAIN

    from rlsynth.generators.checkpoint import checkpoint_hash

    def run(out: Path) -> str:
        api.train_generator("trajectory", random_hopper(), out, steps=20, seed=3, progress=False,
                            model_overrides=TINY["trajectory"], train_overrides=TINY_TRAIN)  # fmt: skip
        return checkpoint_hash(out)

    quiet = run(tmp_path / "quiet")
    ctx = multiprocessing.get_context("spawn")
    burners = [ctx.Process(target=_burn_cpu, args=(60.0,)) for _ in range(2)]
    for b in burners:
        b.start()
    try:
        loaded = run(tmp_path / "loaded")
    finally:
        for b in burners:
            b.terminate()
            b.join()
    assert loaded == quiet
