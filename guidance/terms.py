"""Guidance terms and the guided denoiser.

A term is an objective J(z) over samples z in the generator's normalised space (per sample, (B,)), a mask
of the entries it may move, a scale, a schedule over sampler steps and an evaluation point:

* ``at="noisy"``: the gradient is taken at the current noisy sample x;
* ``at="x0"``: at the denoiser's estimate x0 = D(x; σ), with respect to x0's values (no back-propagation
  through the network: cheap, and what policy-guided diffusion's "x0" option does).

Terms:

* :class:`PolicyTerm` — J = Σ_t log π(a_t | s_t) of a target policy on unnormalised states and decoded
  actions; moves the action entries only (policy-guided diffusion);
* :class:`DynamicsTerm` — J = −½ Σ_t mean_e ‖Δ̂(s_t, s_{t+1}) − μ_e(s_t, a_t)‖², the disagreement of a
  learned dynamics ensemble's elites with the sample's own next states (normalised deltas); moves states
  and actions. While sampling, each sampler step k takes the gradient under elite k mod E' alone (the
  steps of a schedule cycle through the elites; the mean of one cycle is the whole ensemble's gradient),
  at 1/E' of the ensemble's cost; the dynamics error of the samples was unchanged (BENCHMARKS.md,
  guidance);
* :class:`ReturnTerm` — J = Σ_t mean_e r̂_e(s_t, a_t), a learned reward head (the world model's,
  normalised); moves states and actions toward higher predicted reward (one elite per sampler step, as
  the dynamics term).

Steps after a window's first terminal (absorbing padding) are excluded from every objective.

How the gradient enters sampling: the guided denoiser returns D(x; σ) + Σ_terms λ_k g_term, where λ_k is
the term's scale times its schedule at sampler step k and g is the (optionally per-sample L2-normalised)
gradient. An EDM step from σ_k to σ_{k+1} then moves the sample by (1 − σ_{k+1}/σ_k) λ_k g on top of the
unguided step; the samplers are not touched. Normalisation is per sample (‖g_i‖ + ε), not over the whole
batch as in the reference code: a global norm would make a sample depend on the batch it was drawn in
(and the reference adds ε after dividing, which does not guard a zero gradient).

Autoregressive drafts are guided while they are drafted, token by token (:func:`draft_tilt`): each
sampled token moves to the maximiser of its Gaussian predictive's log density around the sample plus
scale·J (≈ scale × its predictive variance × ∇J for small steps; damped where J curves, so a large scale
stops at J's maximum instead of overshooting it).

A scale of 0 (or a schedule weight of 0) skips the term entirely, so unguided sampling is reproduced bit
for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlsynth.generators.edm import Denoiser
from rlsynth.generators.tokens import Steps, TokenCodec
from rlsynth.generators.world_model import WorldModel, WorldModelNormalisers
from rlsynth.guidance.policies import ScoredPolicy, TargetPolicy

SCHEDULES = ("constant", "linear", "pgd")
POINTS = ("noisy", "x0")
NORM_EPS = 1e-8


def schedule_weights(kind: str, n: int) -> np.ndarray:
    """Per-step weights (n,) for a sampler of n steps, step k = 0 being the noisiest.

    constant: 1; linear: 1 − k/n; pgd: (1 − k/n) + 0.3 sin(π(k+1)/n), 0 on the last step (the reference).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r} (schedules: {', '.join(SCHEDULES)})")
    k = np.arange(n, dtype=np.float64)
    if kind == "constant":
        return np.ones(n)
    if kind == "linear":
        return 1 - k / n
    w = (1 - k / n) + 0.3 * np.sin(math.pi * (k + 1) / n)
    w[-1] = 0.0
    return w


def step_index(sigmas: torch.Tensor, sigma: float) -> int:
    """The sampler step whose noise level is nearest ``sigma`` (log scale); covers churn's raised σ̂ and
    Heun's second evaluation at σ_{k+1}."""
    levels = sigmas[:-1].double().clamp_min(1e-12).log()
    return int(torch.argmin((levels - math.log(max(sigma, 1e-12))).abs()))


@dataclass(frozen=True)
class TermOptions:
    scale: float
    schedule: str = "pgd"
    at: str = "x0"
    normalise: bool = False
    """Divide each sample's gradient by its L2 norm (+ε), so ``scale`` is a step length."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r} (schedules: {', '.join(SCHEDULES)})")
        if self.at not in POINTS:
            raise ValueError(f"unknown evaluation point {self.at!r} (use noisy or x0)")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"guidance scale must be a finite number ≥ 0, got {self.scale}")

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "schedule": self.schedule, "at": self.at, "normalise": self.normalise}


def per_sample_unit(g: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient divided by its L2 norm (+ε)."""
    norm = g.flatten(1).norm(dim=1).reshape(-1, *([1] * (g.ndim - 1)))
    return g / (norm + NORM_EPS)


class Term:
    """One guidance term bound to a codec; subclasses give ``objective`` and the ``part`` they move."""

    name = "term"
    part = "act"
    bounded = False
    """Whether the guided denoiser clips this term's move to ±σ per entry (see :class:`_WorldModelTerm`)."""
    uses_next_obs = False
    """Whether J reads a step's next observation (then a drafted token is judged as the previous step's
    successor, not by a step of its own: see :func:`draft_tilt`)."""

    def __init__(self, codec: TokenCodec, options: TermOptions) -> None:
        self.codec = codec
        self.options = options

    def objective(self, z: torch.Tensor) -> torch.Tensor:
        """J per sample (B,), differentiable in z (normalised samples)."""
        raise NotImplementedError

    def value_and_gradient(self, point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """J (B,) and ∇J at ``point``, the gradient zero outside the term's entries."""
        return self._autograd(self.objective, point)

    def _autograd(
        self, objective: Callable[[torch.Tensor], torch.Tensor], point: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            j = objective(point)
            (g,) = torch.autograd.grad(j.sum(), point)
        return j.detach(), torch.nan_to_num(g) * self.codec.mask(point, self.part)

    def masked_gradient(self, point: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """∇J at ``point``, zero outside the term's entries (``step``: the sampler step it is taken at)."""
        return self.value_and_gradient(point)[1]

    def gradient(
        self, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, step: int | None = None
    ) -> torch.Tensor:
        """∇J at the evaluation point, masked to the term's entries and optionally normalised per sample;
        ``step`` is the sampler step (a world-model term uses one elite per step, see below)."""
        g = self.masked_gradient(x if self.options.at == "noisy" else x0, step)
        return per_sample_unit(g) if self.options.normalise else g


def step_actions(codec: TokenCodec, x: torch.Tensor) -> torch.Tensor:
    """The entries of ``x`` (samples' shape) that hold each step's action code, as a view (B, T, a): the
    entries :meth:`TokenCodec.steps` decodes ``act`` from (a window's last token starts no step)."""
    lay = codec.layout
    if codec.form == "transition":
        return x[:, None, lay.act]
    return x[:, :-1, lay.act]


def action_decoding_slope(codec: TokenCodec, point: torch.Tensor) -> torch.Tensor:
    """∂a/∂z per step-action entry (B, T, a): the codec's decoding is elementwise, z → u = z·std + mean →
    a = low + (tanh u + 1)/2·span on bounded dimensions (a = u on unbounded ones), so its Jacobian is
    diagonal: std·span/2·(1 − tanh² u), or std."""
    lay = codec.layout
    u = step_actions(codec, codec.raw(point))  # the codes steps() decodes, bit for bit
    # Both forms hold the action code at the layout's action slice of the last axis.
    std = torch.as_tensor(codec.std[lay.act], device=u.device, dtype=u.dtype)
    y = torch.tanh(u)
    bounded = torch.as_tensor(lay.bounded, device=u.device)
    span = torch.as_tensor(lay.span, dtype=u.dtype, device=u.device)
    return torch.where(bounded, span / 2 * (1 - y * y), torch.ones_like(y)) * std


class PolicyTerm(Term):
    """J = Σ_t log π(a_t | s_t). The term moves actions only, so ∇J needs ∂ log π/∂a and not the actor's
    state gradient: a :class:`ScoredPolicy` gives it in closed form from one forward pass of the actor,
    and the codec's action decoding is elementwise, so the chain rule to the sample's entries is one
    product (:func:`action_decoding_slope`) — no graph is built and nothing is back-propagated. Other
    targets fall back to autograd through ``log_prob`` (:meth:`Term.value_and_gradient`, also the tests'
    oracle)."""

    name = "policy"
    part = "act"

    def __init__(self, codec: TokenCodec, options: TermOptions, policy: TargetPolicy) -> None:
        super().__init__(codec, options)
        self.policy = policy
        self.scored = policy if isinstance(policy, ScoredPolicy) else None

    @torch.no_grad()
    def value_and_gradient(self, point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scored is None:
            return super().value_and_gradient(point)
        s = self.codec.steps(point)
        b, t = s.valid.shape
        lp, score = self.scored.log_prob_and_action_score(s.obs.reshape(b * t, -1), s.act.reshape(b * t, -1))
        # The target may live on another device than the sample (a CPU agent guiding a CUDA generator).
        j = (lp.reshape(b, t).to(point.device, point.dtype) * s.valid).sum(1)
        cotangent = score.reshape(b, t, -1).to(point.device, point.dtype) * s.valid[..., None]
        g = torch.zeros_like(point)
        # Only step-action entries are written, so the result is already masked to the term's part.
        step_actions(self.codec, g).copy_(cotangent * action_decoding_slope(self.codec, point))
        return j, torch.nan_to_num(g)

    def objective(self, z: torch.Tensor) -> torch.Tensor:
        s = self.codec.steps(z)
        b, t = s.valid.shape
        lp = self.policy.log_prob(s.obs.reshape(b * t, -1), s.act.reshape(b * t, -1)).reshape(b, t)
        return (lp.to(z.device, z.dtype) * s.valid).sum(1)


class _WorldModelTerm(Term):
    """A term on a learned world model. Its move in the guided denoiser is clipped to ±σ (the noise level
    being removed) per entry: away from the data the model's predictions, and with them the gradient,
    grow without bound, and at low σ (the last steps and polish iterations, many evaluations at small σ)
    an unclipped raw gradient fed back on itself drove some HalfCheetah windows to |obs| ≈ 26,000 at
    d = 0.01; clipped, no window diverged and the dynamics error fell (BENCHMARKS.md, guidance)."""

    part = "obs_act"
    bounded = True

    def __init__(
        self, codec: TokenCodec, options: TermOptions, model: WorldModel, norms: WorldModelNormalisers
    ) -> None:
        super().__init__(codec, options)
        self.model = model
        self.norms = norms
        for p in model.parameters():
            p.requires_grad_(False)

    def flat_steps(self, s: Steps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(obs, act, next_obs) of decoded steps, flattened to rows and moved to the model's device: the
        world model may live on another device than the sample (compute there, answer on the sample's)."""
        dev = next(self.model.parameters()).device

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, x.shape[-1]).to(dev)

        return flat(s.obs), flat(s.act), flat(s.next_obs)

    def elite_means(
        self, obs: torch.Tensor, act: torch.Tensor, members: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elite members' mean predictions (E', N, o+1), normalised: [Δŝ, r̂]; inputs on the model's device.
        Only the elites (or ``members``, a subset of them) are evaluated and back-propagated through."""
        x = torch.cat([self.norms.obs.normalise(obs), self.norms.act.normalise(act)], 1)
        elites = self.model.elite_idx if members is None else members
        mean, _, _ = self.model(x.unsqueeze(0).expand(len(elites), -1, -1), members=elites)
        return mean

    def objective(self, z: torch.Tensor) -> torch.Tensor:
        return self.objective_of(z, None)

    def objective_of(self, z: torch.Tensor, members: torch.Tensor | None) -> torch.Tensor:
        """J of the mean over ``members`` (default: every elite)."""
        raise NotImplementedError

    def masked_gradient(self, point: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """At sampler step k, the gradient of J under elite k mod E' alone; without a step, under all of
        them. J is a mean over elites, so over the steps of a schedule each elite pulls in turn and the
        sum is the whole ensemble's pull at 1/E' of its cost (the ensemble's back-propagation is most of
        what dynamics guidance costs). The elite depends on the step only, never on the batch, so a
        sample is the same however a request is split."""
        if step is None:
            return super().masked_gradient(point)
        elites = self.model.elite_idx
        one = elites[step % len(elites)].reshape(1)
        return self._autograd(lambda z: self.objective_of(z, one), point)[1]


class DynamicsTerm(_WorldModelTerm):
    name = "dynamics"
    uses_next_obs = True

    def objective_of(self, z: torch.Tensor, members: torch.Tensor | None) -> torch.Tensor:
        s = self.codec.steps(z)
        b, t = s.valid.shape
        obs, act, nxt = self.flat_steps(s)
        pred = self.elite_means(obs, act, members)[..., : self.model.obs_dim]
        delta = self.norms.delta.normalise(nxt - obs)
        err = ((delta.unsqueeze(0) - pred) ** 2).sum(-1).mean(0).reshape(b, t).to(z.device)
        return -0.5 * (err * s.valid).sum(1)


class ReturnTerm(_WorldModelTerm):
    name = "return"

    def objective_of(self, z: torch.Tensor, members: torch.Tensor | None) -> torch.Tensor:
        s = self.codec.steps(z)
        b, t = s.valid.shape
        obs, act, _ = self.flat_steps(s)
        pred = self.elite_means(obs, act, members)
        reward = pred[..., -1].mean(0).reshape(b, t).to(z.device)
        return (reward * s.valid).sum(1)


DenoiserWrap = Callable[[Denoiser, torch.Tensor], Denoiser]
TermFactory = Callable[[TokenCodec], Term]


def bounded(move: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``move`` clipped entry by entry to ±σ (σ: one level for the batch, or one per sample)."""
    level = sigma.to(move.dtype).reshape(-1, *([1] * (move.ndim - 1)))
    return move.clamp(-level, level)


def guide(terms: Sequence[Term]) -> DenoiserWrap:
    """The guided denoiser for a σ schedule: D(x; σ) + Σ λ_term(step(σ)) g_term."""

    def wrap(denoiser: Denoiser, sigmas: torch.Tensor) -> Denoiser:
        n = len(sigmas) - 1
        weights = [t.options.scale * schedule_weights(t.options.schedule, n) for t in terms]

        def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            x0 = denoiser(x, sigma)
            k = step_index(sigmas, float(sigma.reshape(-1)[0]))
            out = x0
            for term, w in zip(terms, weights, strict=True):
                if w[k] != 0:
                    move = float(w[k]) * term.gradient(x, sigma, x0, k).to(x0.dtype)
                    out = out + (bounded(move, sigma) if term.bounded else move)
            return out

        return guided

    return wrap


DraftTilt = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
HALVINGS = 8


def backtracked(
    term: Term,
    window: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    j0: torch.Tensor,
    var: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """``step`` halved per sample until it does not lower −‖δ‖²/(2 var) + c·J (0 if it never stops);
    ``j0`` is J at ``x``.

    The secant step is exact where J is quadratic; far from that (a tanh-squashed action driven into
    saturation) it can land where J is worse than at the start, and halving brings it back.
    """
    c = term.options.scale
    with torch.no_grad():
        for _ in range(HALVINGS + 1):
            penalty = (step * step / (2 * var.clamp_min(1e-30))).sum(1)
            gain = c * (term.objective(window(x + step)) - j0).to(step.dtype) - penalty
            worse = ~(gain >= 0)  # NaN counts as worse
            if not bool(worse.any()):
                return step
            step = torch.where(worse[:, None], step / 2, step)
        return torch.where(worse[:, None], torch.zeros_like(step), step)


def tilt_step(term: Term, prev: torch.Tensor, new: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """How far one term moves a drafted token (see :func:`draft_tilt`)."""
    c = term.options.scale

    def window(y: torch.Tensor) -> torch.Tensor:
        # A term that reads next observations judges the step prev -> y; the others y's own step, whose
        # successor (a stand-in) they do not read.
        return torch.stack([prev, y] if term.uses_next_obs else [y, new], 1)

    slot = 1 if term.uses_next_obs else 0
    j0, g0 = term.value_and_gradient(window(new))
    g0 = g0[:, slot].to(new.dtype)
    if not term.uses_next_obs:
        # The new token's own step is a step only if prev was not a terminal (else it is padding).
        g0 = g0 * (term.codec.raw(prev)[:, -1:] <= 0.5).to(g0.dtype)
    if term.options.normalise:
        return c * var * per_sample_unit(g0)
    step = c * var * g0
    g1 = term.value_and_gradient(window(new + step))[1][:, slot].to(new.dtype)
    moved = g0 != 0
    # 1 − g₁/g₀ = c·var·(curvature) for J quadratic along the step; negative (convex) is not damped.
    damping = torch.where(moved, 1 - g1 / torch.where(moved, g0, 1.0), 0.0).clamp_min(0.0)
    step = step / (1 + torch.nan_to_num(damping, nan=0.0, posinf=1e12))
    return backtracked(term, window, new, j0, var, step)


def draft_tilt(terms: Sequence[Term]) -> DraftTilt:
    """Guidance for autoregressive drafting: ``tilt(prev, new, var)`` moves a drafted token.

    The drafter samples token t+1 as ``new`` ~ N(m, var) given the tokens up to ``prev`` (token t); both
    (B, D), normalised. Guided drafting moves the sample to the maximiser of
    −‖y − new‖²/(2 var) + c·J(y) (perturb-and-MAP for the tilted predictive N(m, var)·exp(c J)): for J
    linear that is new + c·var·∇J — the tilted distribution exactly; for J quadratic per entry (a Gaussian
    target policy in token space) the moved samples have the product's mean exactly and a spread shrunk
    by the target's share of the precision. One secant step finds it: δ = c·var·g₀ with g₀ = ∇J(new),
    then each entry's curvature is read off g₁ = ∇J(new + δ) and the step is divided by 1 + (1 − g₁/g₀)
    (no division where J is not concave along the step), and halved per sample while it lowers the
    maximised objective (:func:`backtracked`). So a large scale walks a token towards the target's mode
    instead of past it.
    Two gradient evaluations and a few objective evaluations per term and token; entries outside a
    term's part do not move; the step is scaled by the predictive variance, so guidance moves what the
    drafter is unsure of.

    A term reading next observations (dynamics) judges the step prev → new; the others judge the new
    token's own step (its observation and action), which is no step when prev was a terminal (the new
    token is then padding and does not move). Schedules are for sampler steps and do not apply here;
    ``normalise`` takes the step along the unit gradient (c·var·g₀/‖g₀‖), undamped.
    """

    def tilt(prev: torch.Tensor, new: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        out = new
        for term in terms:
            if term.options.scale != 0:
                out = out + tilt_step(term, prev, new, var)
        return out

    return tilt


@dataclass(frozen=True)
class Guidance:
    """A guidance spec not yet bound to a generator: term factories plus the JSON that lineage records.

    ``bind(codec)`` gives the denoiser wrapper for one generator's sample space, ``bind_draft(codec)`` the
    tilt of autoregressive drafting.
    """

    factories: tuple[TermFactory, ...]
    spec: tuple[dict[str, Any], ...]

    def bind(self, codec: TokenCodec) -> DenoiserWrap:
        return guide([f(codec) for f in self.factories])

    def bind_draft(self, codec: TokenCodec) -> DraftTilt:
        """The tilt of autoregressive drafting for one drafter's token space (:func:`draft_tilt`)."""
        return draft_tilt([f(codec) for f in self.factories])

    def __add__(self, other: Guidance) -> Guidance:
        return Guidance(self.factories + other.factories, self.spec + other.spec)


def policy_guidance(policy: TargetPolicy, options: TermOptions, lineage: dict[str, Any]) -> Guidance:
    return Guidance(
        (lambda c: PolicyTerm(c, options, policy),),
        ({"term": "policy", **options.to_json(), "target": lineage},),
    )


def world_model_guidance(
    kind: str,
    model: WorldModel,
    norms: WorldModelNormalisers,
    options: TermOptions,
    lineage: dict[str, Any],
) -> Guidance:
    """``kind`` "dynamics" or "return", both from one trained world-model ensemble."""
    classes: dict[str, type[_WorldModelTerm]] = {"dynamics": DynamicsTerm, "return": ReturnTerm}
    if kind not in classes:
        raise ValueError(f"unknown world-model guidance {kind!r}")
    cls = classes[kind]
    return Guidance(
        (lambda c: cls(c, options, model, norms),),
        ({"term": kind, **options.to_json(), "world_model": lineage},),
    )
