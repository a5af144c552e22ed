"""Guidance terms: schedules in closed form, gradients against finite differences, and guided sampling."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dataset, random_hopper, tiny_agent, tiny_generator

from rlsynth.datasets.d3rlpy_setup import import_d3rlpy
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Transitions
from rlsynth.generators.api import LoadedGenerator, SampleOptions, codec, load_generator, sample
from rlsynth.generators.checkpoint import Normaliser
from rlsynth.generators.edm import karras_sigmas
from rlsynth.generators.tokens import TokenCodec, TokenLayout, windows
from rlsynth.generators.world_model import WorldModel, WorldModelConfig, WorldModelNormalisers
from rlsynth.guidance.policies import D3rlpyPolicy, GaussianPolicy, TargetPolicy, load_policy
from rlsynth.guidance.terms import (
    DynamicsTerm,
    Guidance,
    PolicyTerm,
    ReturnTerm,
    Term,
    TermOptions,
    draft_tilt,
    guide,
    policy_guidance,
    schedule_weights,
    step_index,
    world_model_guidance,
)

H = 6


def window_codec() -> tuple[TokenCodec, torch.Tensor]:
    """A codec for Hopper-shaped windows and a batch of real normalised windows (float64)."""
    ds = make_dataset()
    layout = TokenLayout.for_spaces(ds.info.observation_space, ds.info.action_space)
    w = windows(layout, ds.episodes(), H)
    norm = Normaliser.fit(w.reshape(-1, layout.dim))
    c = TokenCodec(layout, norm.mean, norm.std, "window")
    return c, norm.normalise(torch.from_numpy(w)).double()


def world_model(seed: int = 0) -> tuple[WorldModel, WorldModelNormalisers]:
    torch.manual_seed(seed)
    wm = WorldModel(11, 3, WorldModelConfig(ensemble=3, elites=2, hidden=16, layers=2)).double()
    return wm, WorldModelNormalisers.fit(make_dataset().transitions)


def target_policy() -> GaussianPolicy:
    w = torch.linspace(-0.5, 0.5, 33, dtype=torch.float64).reshape(11, 3)
    return GaussianPolicy(mean_fn=lambda o: torch.tanh(o @ w.to(o.dtype)), std=torch.full((3,), 0.3))


def test_schedules_closed_form() -> None:
    n = 4
    np.testing.assert_allclose(schedule_weights("constant", n), [1, 1, 1, 1])
    np.testing.assert_allclose(schedule_weights("linear", n), [1, 0.75, 0.5, 0.25])
    s = math.sin
    expected = [1 + 0.3 * s(math.pi / 4), 0.75 + 0.3 * s(math.pi / 2), 0.5 + 0.3 * s(3 * math.pi / 4), 0]
    np.testing.assert_allclose(schedule_weights("pgd", n), expected)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        schedule_weights("cosine", n)


def test_step_index_finds_each_level_and_heun_and_churn_evaluations() -> None:
    sig = karras_sigmas(5)
    assert [step_index(sig, float(sig[k])) for k in range(5)] == [0, 1, 2, 3, 4]
    assert step_index(sig, float(sig[2]) * 1.2) == 2  # churn raises σ a little above the level


@pytest.mark.parametrize(
    "bad",
    [{"scale": -1.0}, {"scale": math.nan}, {"scale": 1.0, "at": "mid"}, {"scale": 1.0, "schedule": "x"}],
)
def test_bad_term_options_are_clear(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TermOptions(**bad)  # type: ignore[arg-type]


def test_codec_reads_windows_as_environment_steps() -> None:
    c, x = window_codec()
    ds = make_dataset()
    s = c.steps(x)
    first = ds.episodes()[0]  # terminated after 5 steps: its first window holds steps 0..4 and padding
    np.testing.assert_allclose(s.obs[0, :, :].numpy(), first.observations[: H - 1], atol=1e-5)
    np.testing.assert_allclose(s.next_obs[0].numpy(), first.observations[1:H], atol=1e-5)
    np.testing.assert_allclose(s.act[0].numpy(), first.actions[: H - 1], atol=2e-3)  # atanh clip 0.999
    np.testing.assert_allclose(s.reward[0].numpy(), first.rewards[: H - 1], atol=1e-5)
    assert s.valid[0].tolist() == [1, 1, 1, 1, 1]
    # The window starting at step 3 has steps 3, 4 (terminal) and then absorbing padding.
    assert s.valid[3].tolist() == [1, 1, 0, 0, 0]


def finite_difference(term: Term, z: torch.Tensor, coords: list[tuple[int, ...]]) -> list[float]:
    out = []
    for c in coords:
        e = torch.zeros_like(z)
        e[c] = 1e-6
        out.append(float((term.objective(z + e) - term.objective(z - e)).sum()) / 2e-6)
    return out


def check_gradient(term: Term, z: torch.Tensor, moved: list[int], fixed: list[int]) -> None:
    g = term.gradient(z, torch.ones(len(z)), z)
    rng = np.random.default_rng(0)
    coords = [(int(rng.integers(len(z))), int(rng.integers(z.shape[1])), d) for d in moved]
    np.testing.assert_allclose(
        [float(g[c]) for c in coords], finite_difference(term, z, coords), rtol=1e-4, atol=1e-7
    )
    assert all(float(g[:, :, d].abs().max()) == 0 for d in fixed)


def test_policy_gradient_matches_finite_differences_and_moves_actions_only() -> None:
    c, z = window_codec()
    term = PolicyTerm(c, TermOptions(scale=1, normalise=False), target_policy())
    check_gradient(term, z, moved=[11, 12, 13], fixed=[0, 5, 10, 14, 15])


def transition_codec() -> tuple[TokenCodec, torch.Tensor]:
    """A codec for Hopper-shaped transition features and a batch of random normalised ones (float64)."""
    layout = TokenLayout.for_spaces(make_dataset().info.observation_space, make_dataset().info.action_space)
    f = 2 * layout.obs_dim + layout.act_dim + 2
    gen = torch.Generator().manual_seed(0)
    c = TokenCodec(layout, np.linspace(-0.5, 0.5, f), np.linspace(0.5, 2.0, f), "transition")
    return c, 2 * torch.randn(64, f, generator=gen, dtype=torch.float64)


class PlainTarget:
    """A target with no closed-form score: guidance falls back to autograd through ``log_prob``."""

    def __init__(self, inner: TargetPolicy) -> None:
        self.inner = inner

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.inner.log_prob(obs, act)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.inner.mean_action(obs)


@pytest.mark.parametrize("form", ["window", "transition"])
def test_closed_form_policy_gradient_is_autograds(form: str) -> None:
    c, z = window_codec() if form == "window" else transition_codec()
    term = PolicyTerm(c, TermOptions(scale=1), target_policy())
    assert term.scored is not None
    j, g = term.value_and_gradient(z)
    j_auto, g_auto = Term.value_and_gradient(term, z)  # the autograd oracle
    assert float(g.abs().max()) > 1e-3
    torch.testing.assert_close(j, j_auto, rtol=0, atol=0)
    torch.testing.assert_close(g, g_auto, rtol=1e-12, atol=1e-12)
    fallback = PolicyTerm(c, TermOptions(scale=1), PlainTarget(target_policy()))
    assert fallback.scored is None
    torch.testing.assert_close(fallback.value_and_gradient(z)[1], g_auto, rtol=0, atol=0)


def test_closed_form_policy_gradient_through_unbounded_action_dimensions_is_autograds() -> None:
    # Unbounded dimensions decode as a = u (slope std), bounded ones through tanh
    # (slope std·span/2·(1 − tanh² u)).
    ds = make_dataset()
    low, high = np.array([-1.0, -np.inf, -3.0]), np.array([1.0, np.inf, 0.5])
    layout = TokenLayout(11, 3, low, high)
    w = windows(layout, ds.episodes(), H)
    norm = Normaliser.fit(w.reshape(-1, layout.dim))
    c = TokenCodec(layout, norm.mean, norm.std, "window")
    z = norm.normalise(torch.from_numpy(w)).double()
    term = PolicyTerm(c, TermOptions(scale=1), target_policy())
    j, g = term.value_and_gradient(z)
    j_auto, g_auto = Term.value_and_gradient(term, z)
    assert float(g[:, :, 12].abs().max()) > 1e-3
    torch.testing.assert_close(j, j_auto, rtol=0, atol=0)
    torch.testing.assert_close(g, g_auto, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", ["iql", "td3plusbc", "cql"])
@pytest.mark.parametrize("form", ["window", "transition"])
def test_closed_form_policy_gradient_of_d3rlpy_agents_is_autograds(config: str, form: str) -> None:
    d3 = import_d3rlpy()
    make = {"iql": d3.algos.IQLConfig, "td3plusbc": d3.algos.TD3PlusBCConfig, "cql": d3.algos.CQLConfig}
    pol = load_target(make[config](batch_size=16))
    c, z = window_codec() if form == "window" else transition_codec()
    term = PolicyTerm(c, TermOptions(scale=1), pol)
    assert term.scored is not None
    j, g = term.value_and_gradient(z)
    j_auto, g_auto = Term.value_and_gradient(term, z)
    assert float(g.abs().max()) > 1e-3
    torch.testing.assert_close(j, j_auto, rtol=0, atol=0)
    torch.testing.assert_close(g, g_auto, rtol=1e-4, atol=1e-5)


def test_closed_form_policy_gradient_of_a_squashed_d3rlpy_agent_is_autograds() -> None:
    # float32 actor: its score agrees with autograd to float32 rounding (tests/guidance/test_policies.py).
    d3 = import_d3rlpy()
    pol = load_target(d3.algos.SACConfig(batch_size=16))
    c, z = window_codec()
    z = z.clone()
    z[:2, :, c.layout.act] *= 40  # action codes far out: decoded actions on the tanh bounds
    term = PolicyTerm(c, TermOptions(scale=1), pol)
    j, g = term.value_and_gradient(z)
    j_auto, g_auto = Term.value_and_gradient(term, z)
    torch.testing.assert_close(j, j_auto, rtol=0, atol=0)
    torch.testing.assert_close(g, g_auto, rtol=1e-4, atol=1e-5)


def load_target(config: object) -> D3rlpyPolicy:
    return D3rlpyPolicy(tiny_agent(config, steps=2))


def whole_ensemble_elite_means(
    term: DynamicsTerm, obs: torch.Tensor, act: torch.Tensor, members: torch.Tensor | None = None
) -> torch.Tensor:
    """The elites' means from the whole ensemble's evaluation (what evaluating only them replaced)."""
    x = torch.cat([term.norms.obs.normalise(obs), term.norms.act.normalise(act)], 1)
    mean, _, _ = term.model(x.unsqueeze(0).expand(term.model.cfg.ensemble, -1, -1))
    return mean[term.model.elite_idx if members is None else members]


@pytest.mark.parametrize("cls", [DynamicsTerm, ReturnTerm])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_world_model_terms_evaluating_only_the_elites_are_bit_identical(
    cls: type[DynamicsTerm], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, z = window_codec()
    wm = WorldModel(11, 3, WorldModelConfig(ensemble=5, elites=3, hidden=32, layers=2)).to(dtype)
    wm.elite_idx.copy_(torch.tensor([0, 2, 4]))  # a dropped member between the elites
    term = cls(c, TermOptions(scale=1), wm, world_model()[1])
    z = z.to(dtype).repeat(8, 1, 1)
    j, g = term.value_and_gradient(z)
    monkeypatch.setattr(cls, "elite_means", whole_ensemble_elite_means)
    j_all, g_all = term.value_and_gradient(z)
    assert float(g.abs().max()) > 0
    assert torch.equal(j, j_all)
    # The input's gradient sums the members' parts, and the whole ensemble's sum held exact zeros for the
    # dropped members: torch's reduction groups its terms by position, so a sum may differ in its last bit.
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(g, g_all, rtol=tol, atol=tol * float(g.abs().max()))


@pytest.mark.parametrize("cls", [DynamicsTerm, ReturnTerm])
def test_world_model_gradients_match_finite_differences(cls: type[DynamicsTerm]) -> None:
    c, z = window_codec()
    wm, norms = world_model()
    term = cls(c, TermOptions(scale=1, normalise=False), wm, norms)
    check_gradient(term, z, moved=[0, 4, 10, 11, 13], fixed=[14, 15])


@pytest.mark.parametrize("cls", [DynamicsTerm, ReturnTerm])
def test_a_sampler_step_uses_one_elite_and_a_cycle_of_steps_is_the_whole_ensembles_gradient(
    cls: type[DynamicsTerm],
) -> None:
    """J is the mean over elites, so its gradient is the mean of the elites' own: the steps of one cycle
    (one elite each, k mod E') sum to E' × the all-elites gradient, and step k + E' is step k."""
    c, z = window_codec()
    wm = WorldModel(11, 3, WorldModelConfig(ensemble=5, elites=3, hidden=16, layers=2)).double()
    wm.elite_idx.copy_(torch.tensor([4, 0, 2]))
    term = cls(c, TermOptions(scale=1), wm, world_model()[1])
    sigma = torch.ones(len(z))
    whole = term.gradient(z, sigma, z)
    per_step = [term.gradient(z, sigma, z, k) for k in range(3)]
    for k, e in enumerate([4, 0, 2]):
        one = torch.tensor([e])
        expected = term._autograd(lambda x, one=one: term.objective_of(x, one), z)[1]
        torch.testing.assert_close(per_step[k], expected, rtol=0, atol=0)
    assert not torch.equal(per_step[0], per_step[1])
    torch.testing.assert_close(term.gradient(z, sigma, z, 3), per_step[0], rtol=0, atol=0)
    torch.testing.assert_close(sum(per_step) / 3, whole, rtol=1e-12, atol=1e-12 * float(whole.abs().max()))


def test_dynamics_objective_is_the_elite_disagreement_in_closed_form() -> None:
    c, z = window_codec()
    wm, norms = world_model()
    term = DynamicsTerm(c, TermOptions(scale=1), wm, norms)
    s = c.steps(z[:1])
    obs, act, nxt = s.obs[0], s.act[0], s.next_obs[0]
    total = 0.0
    for e in wm.elite_idx.tolist():
        x = torch.cat([norms.obs.normalise(obs), norms.act.normalise(act)], 1)
        mean = wm(x.unsqueeze(0).expand(3, -1, -1))[0][e, :, :11]
        total += float(((norms.delta.normalise(nxt - obs) - mean) ** 2).sum())
    assert float(term.objective(z[:1])) == pytest.approx(-0.5 * total / 2, rel=1e-9)


def test_normalised_gradient_has_unit_norm_per_sample() -> None:
    c, z = window_codec()
    g = PolicyTerm(c, TermOptions(scale=1, normalise=True), target_policy()).gradient(z, torch.ones(1), z)
    np.testing.assert_allclose(g.flatten(1).norm(dim=1).numpy(), 1.0, rtol=1e-6)


def test_guided_denoiser_adds_the_scheduled_gradient() -> None:
    c, z = window_codec()
    opts = TermOptions(scale=0.5, schedule="linear", normalise=False)
    term = PolicyTerm(c, opts, target_policy())
    sig = karras_sigmas(4)
    wrapped = guide([term])(lambda x, s: 0.9 * x, sig)
    out = wrapped(z, sig[1].expand(len(z)))
    expected = 0.9 * z + 0.5 * 0.75 * term.gradient(z, sig[1], 0.9 * z)
    torch.testing.assert_close(out, expected)


def own_step_gradient(term: Term, prev: torch.Tensor, new: torch.Tensor, two_tokens: bool) -> torch.Tensor:
    """∇ over the new token's entries of J on (prev, new[, stand-in]) by central differences, the
    stand-in successor held fixed."""
    g = torch.zeros_like(new)
    for d in range(new.shape[1]):
        e = torch.zeros_like(new)
        e[:, d] = 1e-6

        def j(n: torch.Tensor) -> torch.Tensor:
            w = [prev, n] if two_tokens else [prev, n, new]
            return term.objective(torch.stack(w, 1))

        g[:, d] = (j(new + e) - j(new - e)) / 2e-6
    return g * term.codec.mask(new[:, None], term.part)[0]


@pytest.mark.parametrize("kind", ["policy", "dynamics", "return"])
def test_draft_tilt_moves_a_token_along_variance_times_its_own_gradient(kind: str) -> None:
    c, z = window_codec()
    wm, norms = world_model()
    opts = TermOptions(scale=1e-4, normalise=False)
    term: Term = (
        PolicyTerm(c, opts, target_policy())
        if kind == "policy"
        else (DynamicsTerm if kind == "dynamics" else ReturnTerm)(c, opts, wm, norms)
    )
    prev, new = z[:, 0], z[:, 1]
    var = torch.rand(new.shape, generator=torch.Generator().manual_seed(0), dtype=new.dtype) + 0.1
    moved = draft_tilt([term])(prev, new, var)
    # dynamics judges the step prev -> new; policy and return judge the new token's own step.
    g = own_step_gradient(term, prev, new, two_tokens=kind == "dynamics")
    assert float(g.abs().max()) > 1e-3  # the check is not vacuous
    # To first order in the scale the token moves along var ⊙ ∇J (the exact tilt for J linear).
    torch.testing.assert_close((moved - new) / 1e-4, var * g, rtol=2e-3, atol=1e-6)
    part = term.codec.mask(new[:, None], term.part)[0]
    assert float(((moved - new) * (1 - part)).abs().max()) == 0  # entries outside the part stay


class GaussianActionTerm(Term):
    """J = Σ over the tokens that start a step of log N(action code; μ, s²) in token space: quadratic, so
    the tilt has a closed form."""

    def __init__(self, codec: TokenCodec, options: TermOptions, mu: float, sd: float) -> None:
        super().__init__(codec, options)
        self.mu, self.sd = mu, sd

    def objective(self, z: torch.Tensor) -> torch.Tensor:
        a = z[:, :-1, self.codec.layout.act]
        return -0.5 * (((a - self.mu) / self.sd) ** 2).sum((1, 2))


@pytest.mark.parametrize("scale", [0.01, 1.0, 20.0])
def test_draft_tilt_is_the_gaussian_product_mean_for_a_gaussian_objective(scale: float) -> None:
    # N(y; x, v)·N(y; μ, s²)^c peaks at (x/v + cμ/s²)/(1/v + c/s²); at c·v/s² = 80 (scale 20) a plain
    # gradient step would overshoot μ eightyfold.
    c, z = window_codec()
    prev, new = z[:, 0], z[:, 1]
    var = torch.full_like(new, 0.5)
    term = GaussianActionTerm(c, TermOptions(scale=scale, normalise=False), mu=0.7, sd=0.25)
    moved = draft_tilt([term])(prev, new, var)
    act = c.layout.act
    expected = (new[:, act] / 0.5 + scale * 0.7 / 0.25**2) / (1 / 0.5 + scale / 0.25**2)
    after_terminal = c.raw(prev)[:, -1:] > 0.5  # the new token is padding there: it stays
    expected = torch.where(after_terminal, new[:, act], expected)
    torch.testing.assert_close(moved[:, act], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(moved[:, : act.start], new[:, : act.start])


def test_draft_tilt_leaves_tokens_after_a_terminal_and_at_scale_zero() -> None:
    c, z = window_codec()
    term = PolicyTerm(c, TermOptions(scale=1.0), target_policy())
    # Window 3 ends at its token 1 (a terminal): what follows is absorbing padding, which is not a step.
    prev, new = z[3:4, 1], z[3:4, 2]
    assert float(c.raw(prev)[0, -1]) > 0.5
    torch.testing.assert_close(draft_tilt([term])(prev, new, torch.ones_like(new)), new)
    zero = PolicyTerm(c, TermOptions(scale=0.0), target_policy())
    new = z[:, 1]
    assert draft_tilt([zero])(z[:, 0], new, torch.ones_like(new)) is new


def test_normalised_draft_tilt_is_a_unit_gradient_times_variance() -> None:
    c, z = window_codec()
    term = PolicyTerm(c, TermOptions(scale=2.0, normalise=True), target_policy())
    prev, new = z[:, 0], z[:, 1]
    step = (draft_tilt([term])(prev, new, torch.full_like(new, 0.5)) - new) / (2.0 * 0.5)
    alive = (c.raw(prev)[:, -1] <= 0.5).double()  # after a terminal there is no step to guide
    assert 0 < float(alive.sum()) < len(alive)
    np.testing.assert_allclose(step.norm(dim=1).numpy(), alive.numpy(), rtol=1e-6, atol=1e-12)


# --- guided sampling with real generators -------------------------------------------------------------


@pytest.fixture(scope="module")
def gens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedGenerator]:
    root = tmp_path_factory.mktemp("guided")
    kinds = ("trajectory", "transition", "world-model", "autoregressive")
    return {k: tiny_generator(k, root / k, steps=300) for k in kinds}


def toy_target() -> GaussianPolicy:
    return GaussianPolicy(mean_fn=lambda o: torch.full((len(o), 3), 0.5), std=torch.full((3,), 0.2))


def guided(policy: object, scale: float, **kw: object) -> Guidance:
    return policy_guidance(policy, TermOptions(scale=scale, **kw), {"kind": "test"})  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["trajectory", "transition", "autoregressive"])
@pytest.mark.parametrize("at", ["noisy", "x0"])
def test_scale_zero_is_bit_identical_to_unguided(
    gens: dict[str, LoadedGenerator], kind: str, at: str
) -> None:
    plain = sample(gens[kind], random_hopper(), 40, SampleOptions(seed=4)).transitions
    g = guided(toy_target(), 0.0, at=at) + world_model_guidance(
        "dynamics",
        gens["world-model"].model,  # type: ignore[arg-type]
        WorldModelNormalisers.from_map(gens["world-model"].norms),
        TermOptions(scale=0.0),
        {},
    )
    zero = sample(gens[kind], random_hopper(), 40, SampleOptions(seed=4, guidance=g)).transitions
    for col in ("observations", "actions", "rewards", "next_observations"):
        np.testing.assert_array_equal(getattr(plain, col), getattr(zero, col))


SCALES = {"trajectory": (0.0, 0.003, 0.01, 0.03, 0.1), "transition": (0.0, 0.003, 0.01, 0.03, 0.1)}
# A drafted token moves by scale × its predictive variance × ∇ log π once (not at every sampler step).
SCALES["autoregressive"] = (0.0, 0.03, 0.3, 3.0)


@pytest.mark.parametrize("kind", ["trajectory", "transition", "autoregressive"])
def test_distance_to_the_target_mean_falls_monotonically_with_scale(
    gens: dict[str, LoadedGenerator], kind: str
) -> None:
    dist = []
    for scale in SCALES[kind]:
        g = guided(toy_target(), scale, at="x0", normalise=False)
        t = sample(gens[kind], random_hopper(), 300, SampleOptions(seed=1, steps=8, guidance=g))
        dist.append(float(((t.transitions.actions - 0.5) ** 2).sum(1).mean()))
    assert all(b < a for a, b in itertools.pairwise(dist)), dist
    assert dist[-1] < (0.5 if kind == "autoregressive" else 0.1) * dist[0], dist


def test_a_huge_scale_does_not_throw_drafted_actions_past_the_target(
    gens: dict[str, LoadedGenerator],
) -> None:
    # A plain gradient step of scale × variance × ∇ log π would overshoot the target's mean by orders of
    # magnitude here; the damped, backtracked tilt keeps the actions nearer the target than unguided ones.
    def distance(scale: float) -> float:
        g = guided(toy_target(), scale, normalise=False)
        t = sample(gens["autoregressive"], random_hopper(), 300, SampleOptions(seed=1, guidance=g))
        return float(((t.transitions.actions - 0.5) ** 2).sum(1).mean())

    assert distance(1000.0) < 0.7 * distance(0.0)


def test_dynamics_guidance_lowers_model_disagreement(gens: dict[str, LoadedGenerator]) -> None:
    wm_gen = gens["world-model"]
    wm: WorldModel = wm_gen.model  # type: ignore[assignment]
    norms = WorldModelNormalisers.from_map(wm_gen.norms)
    gen = gens["trajectory"]

    def disagreement(scale: float) -> float:
        g = world_model_guidance("dynamics", wm, norms, TermOptions(scale=scale, normalise=True), {})
        ds = sample(gen, random_hopper(), 200, SampleOptions(seed=2, guidance=g)).transitions
        x = torch.cat(
            [
                norms.obs.normalise(torch.tensor(ds.observations)),
                norms.act.normalise(torch.tensor(ds.actions)),
            ],
            1,
        )
        with torch.no_grad():
            mean = wm(x.unsqueeze(0).expand(wm.cfg.ensemble, -1, -1))[0][wm.elite_idx, :, :11].mean(0)
        delta = norms.delta.normalise(torch.from_numpy(ds.next_observations - ds.observations))
        return float(((delta - mean) ** 2).sum(1).mean())

    assert disagreement(1.0) < 0.9 * disagreement(0.0)


@pytest.mark.parametrize("algo", ["iql", "td3plusbc"])
def test_d3rlpy_agents_work_as_targets(gens: dict[str, LoadedGenerator], tmp_path: Path, algo: str) -> None:
    d3 = import_d3rlpy()
    config = {"iql": d3.algos.IQLConfig, "td3plusbc": d3.algos.TD3PlusBCConfig}[algo](batch_size=32)
    path = tmp_path / f"{algo}.d3"
    tiny_agent(config, random_hopper(), steps=30, save_to=path)
    pol = load_policy(path)
    lls = []
    for scale in (0.0, 1.0):
        ds = sample(
            gens["trajectory"],
            random_hopper(),
            200,
            SampleOptions(seed=5, steps=8, guidance=guided(pol, scale, normalise=True)),
        )
        t = ds.transitions
        with torch.no_grad():
            lls.append(
                float(
                    pol.log_prob(
                        torch.from_numpy(t.observations.copy()), torch.from_numpy(t.actions.copy())
                    ).mean()
                )
            )
    assert lls[1] > lls[0] + 1.0, lls


@pytest.mark.parametrize("kind", ["trajectory", "transition", "autoregressive"])
def test_closed_form_guided_sampling_is_deterministic_and_matches_autograd(
    gens: dict[str, LoadedGenerator], kind: str
) -> None:
    # A squashed agent (the score's most involved form); drafts move once per token, so take larger scales.
    d3 = import_d3rlpy()
    pol = load_target(d3.algos.SACConfig(batch_size=16))
    scale = 1.0 if kind == "autoregressive" else 0.05

    def draw(target: object) -> Transitions:
        g = guided(target, scale) if target is not None else None
        return sample(gens[kind], random_hopper(), 60, SampleOptions(seed=7, steps=6, guidance=g)).transitions

    first, again, oracle, unguided = draw(pol), draw(pol), draw(PlainTarget(pol)), draw(None)  # type: ignore[arg-type]
    assert float(np.abs(first.actions - unguided.actions).max()) > 1e-3  # the guidance moved actions
    for col in ("observations", "actions", "rewards", "next_observations"):
        np.testing.assert_array_equal(getattr(first, col), getattr(again, col))
        np.testing.assert_allclose(getattr(first, col), getattr(oracle, col), rtol=1e-4, atol=1e-4)


def test_world_models_and_autoregressive_drafts_refuse_or_accept_guidance(
    gens: dict[str, LoadedGenerator],
) -> None:
    with pytest.raises(RlsynthError, match="steered by --policy"):
        sample(gens["world-model"], random_hopper(), 10, SampleOptions(guidance=guided(toy_target(), 1.0)))
    with pytest.raises(RlsynthError, match="cannot be guided"):
        codec(gens["world-model"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["trajectory", "transition"])
def test_cpu_agent_and_world_model_guide_a_cuda_generator(
    gens: dict[str, LoadedGenerator], tmp_path: Path, kind: str
) -> None:
    # The PGD loop trains its agent on the CPU while the generator samples on the GPU: every term must
    # compute on its own model's device and answer on the sample's.
    d3 = import_d3rlpy()
    path = tmp_path / "td3.d3"
    tiny_agent(d3.algos.TD3PlusBCConfig(batch_size=32), random_hopper(), steps=30, save_to=path)
    pol = load_policy(path)
    wm_gen = gens["world-model"]
    wm = world_model_guidance(
        "dynamics",
        wm_gen.model,  # type: ignore[arg-type]
        WorldModelNormalisers.from_map(wm_gen.norms),
        TermOptions(scale=0.5, normalise=True),
        {},
    )
    gen = load_generator(gens[kind].folder, device="cuda")
    lls = []
    for scale in (0.0, 1.0):
        g = guided(pol, scale, normalise=True) + wm
        t = sample(gen, random_hopper(), 200, SampleOptions(seed=5, steps=8, guidance=g)).transitions
        assert np.isfinite(t.observations).all() and np.isfinite(t.actions).all()
        with torch.no_grad():
            obs, act = torch.from_numpy(t.observations), torch.from_numpy(t.actions)
            lls.append(float(pol.log_prob(obs, act).mean()))
    assert lls[1] > lls[0] + 1.0, lls


def test_a_world_model_terms_move_is_clipped_to_the_noise_level_and_a_policy_terms_is_not() -> None:
    c, z = window_codec()
    wm, norms = world_model()
    sig = karras_sigmas(4)
    sigma = sig[2].expand(len(z))
    dyn = DynamicsTerm(c, TermOptions(scale=1e6, schedule="constant"), wm, norms)
    raw = 1e6 * dyn.gradient(z, sigma, 0.9 * z, 2)
    assert float(raw.abs().max()) > float(sig[2])  # the bound binds
    out = guide([dyn])(lambda x, s: 0.9 * x, sig)(z, sigma)
    torch.testing.assert_close(out - 0.9 * z, raw.clamp(-float(sig[2]), float(sig[2])), rtol=0, atol=1e-12)
    pol = PolicyTerm(c, TermOptions(scale=1e3, schedule="constant"), target_policy())
    moved = guide([pol])(lambda x, s: 0.9 * x, sig)(z, sigma) - 0.9 * z
    assert float(moved.abs().max()) > float(sig[2])
