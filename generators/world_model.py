"""The learned world-model baseline: a probabilistic MLP ensemble (PETS, Chua et al. 2018; MOPO, Yu et al.
2020).

Each member maps a normalised (s, a) to a diagonal Gaussian over the normalised (Δs, r) and a Bernoulli
logit for the terminal flag. Log-variances are softly bounded by learned limits (PETS appendix A.1);
the loss is the Gaussian negative log-likelihood plus binary cross-entropy, summed over members, each
member seeing its own bootstrap resample of the batch. After training, the ``elites`` members with the
lowest held-out MSE are kept for sampling.

Rollouts start from real dataset states and step autoregressively: at each step a random elite is picked
per rollout and the next state is drawn from its Gaussian. Errors therefore compound with the horizon —
which is exactly what trajectory diffusion is compared against.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.fidelity import window_starts
from rlsynth.datasets.scratch import scratch_array
from rlsynth.datasets.types import Dataset, Episode, Transitions
from rlsynth.generators.checkpoint import BLOCK_ROWS, CheckpointError, Normaliser, column_moments


@dataclass(frozen=True)
class WorldModelConfig:
    """Architecture of the ensemble."""

    ensemble: int = 5
    """Members trained."""
    elites: int = 4
    """Members kept for sampling (lowest validation MSE)."""
    hidden: int = 200
    """Width of each hidden layer."""
    layers: int = 3
    """Hidden layers."""
    logvar_penalty: float = 0.01
    """Weight of the penalty keeping the learned log-variance limits tight (PETS)."""
    divergence_bound: float = 50.0
    """A rollout stops (truncated) once a normalised state component leaves ±this: the model left the data."""


class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul. x: (E, B, in) -> (E, B, out), or
    (len(members), B, in) -> (len(members), B, out) for a subset of members."""

    def __init__(self, members: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1.0 / np.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(members, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(members, 1, d_out))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        if members is None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[members], x, self.weight[members])


MSE_ROWS = 2048
"""Held-out rows per block of :meth:`WorldModel.member_mse`."""


@dataclass(frozen=True)
class WorldModelNormalisers:
    obs: Normaliser
    act: Normaliser
    delta: Normaliser
    reward: Normaliser

    @classmethod
    def fit(cls, t: Transitions) -> WorldModelNormalisers:
        return cls(
            obs=Normaliser.fit(t.observations),
            act=Normaliser.fit(t.actions),
            delta=Normaliser.of_moments(*column_moments(len(t), t.one_step_change)),
            reward=Normaliser.fit(t.rewards[:, None]),
        )

    KEYS = ("obs", "act", "delta", "reward")

    @classmethod
    def from_map(cls, d: dict[str, Normaliser]) -> WorldModelNormalisers:
        return cls(**{k: d[k] for k in cls.KEYS})

    def as_map(self) -> dict[str, Normaliser]:
        return {k: getattr(self, k) for k in self.KEYS}

    def to_json(self) -> dict[str, dict[str, list[float]]]:
        return {k: v.to_json() for k, v in self.as_map().items()}

    @classmethod
    def from_json(cls, d: dict[str, dict[str, list[float]]]) -> WorldModelNormalisers:
        return cls(**{k: Normaliser.from_json(d[k]) for k in cls.KEYS})


def check_elites(model: WorldModel, where: object) -> None:
    """The loaded elite indices name distinct members of the ensemble (a file's ``elite_idx`` out of range
    would fail mid-rollout as an indexing error, or repeat one member)."""
    idx = model.elite_idx.tolist()
    if len(set(idx)) != len(idx) or not all(0 <= i < model.cfg.ensemble for i in idx):
        raise CheckpointError(
            f"{where}: elite_idx {idx[:8]} must be distinct members of 0..{model.cfg.ensemble - 1}"
        )


class WorldModel(nn.Module):
    """Probabilistic ensemble. Inputs and targets are normalised; see :func:`training_tensors`."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: WorldModelConfig) -> None:
        super().__init__()
        if not 1 <= cfg.elites <= cfg.ensemble:
            raise ValueError(f"elites must be in [1, ensemble={cfg.ensemble}], got {cfg.elites}")
        self.cfg = cfg
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.out_dim = obs_dim + 1
        dims = [obs_dim + act_dim] + [cfg.hidden] * cfg.layers
        self.trunk = nn.ModuleList(EnsembleLinear(cfg.ensemble, a, b) for a, b in itertools.pairwise(dims))
        self.head = EnsembleLinear(cfg.ensemble, cfg.hidden, 2 * self.out_dim + 1)
        self.max_logvar = nn.Parameter(torch.full((1, 1, self.out_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((1, 1, self.out_dim), -10.0))
        self.elite_idx: torch.Tensor
        self.register_buffer("elite_idx", torch.arange(cfg.elites))

    def forward(
        self, x: torch.Tensor, members: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (E, B, obs+act) -> mean (E, B, D), logvar (E, B, D), terminal logit (E, B); D = obs + 1.

        ``members`` (E',) evaluates only those members, x (E', B, obs+act) holding each one's rows: the same
        per-member products as the whole ensemble's at E'/E of the cost.
        """
        return self.read_head(self.head_output(x, members))

    def head_output(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """The head's raw output (E, B, 2D + 1) (or (E', B, 2D + 1) for ``members``): see :meth:`forward`."""
        h = x
        for layer in self.trunk:
            h = F.silu(layer(h, members))
        return self.head(h, members)

    def read_head(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw head outputs (..., 2D + 1) -> mean, log-variance within the learned bounds, terminal logit."""
        mean, raw, term = out[..., : self.out_dim], out[..., self.out_dim : 2 * self.out_dim], out[..., -1]
        hi, lo = self.max_logvar.flatten(), self.min_logvar.flatten()
        logvar = hi - F.softplus(hi - raw)
        logvar = lo + F.softplus(logvar - lo)
        return mean, logvar, term

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, y, term = batch["x"], batch["y"], batch["terminal"]
        e, b = self.cfg.ensemble, x.shape[0]
        # Bootstrap: each member trains on its own resample of the batch.
        idx = torch.randint(b, (e, b), device=x.device)
        mean, logvar, logit = self(x[idx])
        target = y[idx]
        nll = (((mean - target) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
        bce = F.binary_cross_entropy_with_logits(logit, term[idx], reduction="none").mean(1).sum()
        reg = self.cfg.logvar_penalty * (self.max_logvar.sum() - self.min_logvar.sum())
        mse = float(((mean - target) ** 2).mean().detach())
        return nll + bce + reg, {"mse": mse}

    @torch.no_grad()
    def member_mse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Held-out MSE of each member's mean prediction: (E,), float64.

        In blocks of ``MSE_ROWS`` rows: the held-out share of a 2M-row dataset is 100k rows, and every
        member's activations for all of them at once took gigabytes."""
        total = torch.zeros(self.cfg.ensemble, dtype=torch.float64)
        for lo in range(0, len(x), MSE_ROWS):
            xb, yb = x[lo : lo + MSE_ROWS], y[lo : lo + MSE_ROWS]
            mean, _, _ = self(xb.unsqueeze(0).expand(self.cfg.ensemble, -1, -1))
            total += ((mean - yb.unsqueeze(0)) ** 2).sum(dim=(1, 2)).cpu().double()
        return total / (len(x) * y.shape[-1])

    def select_elites(self, x: torch.Tensor, y: torch.Tensor) -> list[int]:
        order = torch.argsort(self.member_mse(x, y))[: self.cfg.elites]
        self.elite_idx.copy_(torch.sort(order).values)
        return [int(i) for i in self.elite_idx]


def training_tensors(t: Transitions, norms: WorldModelNormalisers) -> dict[str, torch.Tensor]:
    """x = [ŝ, â], y = [Δŝ, r̂] (hats: normalised), terminal as float.

    Filled block by block into :func:`~rlsynth.datasets.scratch.scratch_array` tables (file-backed when
    they would not fit in memory), with the float32 operations of :meth:`Normaliser.normalise`, so every
    value is what normalising the whole columns at once gives."""
    o, a = t.observations.shape[1], t.actions.shape[1]
    x = scratch_array((len(t), o + a), np.float32)
    y = scratch_array((len(t), o + 1), np.float32)
    for lo in range(0, len(t), BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, len(t))
        x[lo:hi, :o] = _normalised(norms.obs, t.observations[lo:hi])
        x[lo:hi, o:] = _normalised(norms.act, t.actions[lo:hi])
        y[lo:hi, :o] = _normalised(norms.delta, t.one_step_change(lo, hi))
        y[lo:hi, o:] = _normalised(norms.reward, t.rewards[lo:hi, None])
    return {
        "x": torch.from_numpy(x),
        "y": torch.from_numpy(y),
        "terminal": torch.as_tensor(t.terminals.astype(np.float32)),
    }


def _normalised(norm: Normaliser, block: np.ndarray) -> np.ndarray:
    """:meth:`Normaliser.normalise` of a block, in numpy: the same two correctly rounded float32
    operations, so the same values (and no tensor over a read-only memory-mapped column)."""
    return (np.asarray(block, np.float32) - norm.mean) / norm.std


@dataclass(frozen=True)
class StepOutput:
    next_obs: torch.Tensor
    reward: torch.Tensor
    terminal: torch.Tensor
    diverged: torch.Tensor


BUCKET_ROWS = 64
"""Rows per member's product: a multiple of this. A row must come out as the whole-ensemble evaluation of
all rollouts gave it, bit for bit, and two things there depend on the shape: BLAS kernels for a handful of
rows (fewer than 12 on the CPUs measured) sum in another order than for many, and torch's elementwise
kernels take a scalar path, with other rounding, for a tail that does not fill a vector (at the end of a
tensor, or of a thread's share of it). A multiple of 64 rows fills the vectors of each share at 1, 2, 4 or
8 threads; at others (3, 6) the whole ensemble's own shares end mid-vector, its results already differ from
its results at 2 threads, and rows near those ends can differ in their last bits from these."""


def member_buckets(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows grouped by the member evaluating them: (used (U,) members, rows (U, M) each one's row indices,
    padded with row 0, bucket (B,) and slot (B,) where each row's result lies); M a multiple of
    BUCKET_ROWS."""
    used, bucket, counts = torch.unique(member, return_inverse=True, return_counts=True)
    order = torch.argsort(bucket, stable=True)
    index = torch.arange(len(member), device=member.device)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(bucket)
    slot[order] = index - starts[bucket[order]]
    m = -(-int(counts.max()) // BUCKET_ROWS) * BUCKET_ROWS
    rows = torch.zeros((len(used), m), dtype=torch.long, device=member.device)
    rows[bucket, slot] = index
    return used, rows, bucket, slot


@torch.no_grad()
def model_step(
    model: WorldModel,
    norms: WorldModelNormalisers,
    obs: torch.Tensor,
    act: torch.Tensor,
    member: torch.Tensor,
    noise: torch.Tensor | None,
) -> StepOutput:
    """One autoregressive step for B rollouts. obs (B, o), act (B, a), member (B,) indices into the ensemble,
    noise (B, o+1) standard normal draws or ``None`` for the mean prediction.

    Each row is evaluated by its own member only (:func:`member_buckets`), not by the whole ensemble."""
    x = torch.cat([norms.obs.normalise(obs), norms.act.normalise(act)], 1)
    used, rows, bucket, slot = member_buckets(member)
    # Rows are read off the head first, so the log-variance bounds run on B rows, not on the padded buckets.
    mu, lv, lg = model.read_head(model.head_output(x[rows], members=used)[bucket, slot])
    z = mu if noise is None else mu + torch.exp(0.5 * lv) * noise
    o = model.obs_dim
    next_obs = obs + norms.delta.denormalise(z[:, :o])
    reward = norms.reward.denormalise(z[:, o:]).squeeze(1)
    bound = model.cfg.divergence_bound
    diverged = ~torch.isfinite(next_obs).all(1) | (norms.obs.normalise(next_obs).abs() > bound).any(1)
    return StepOutput(next_obs, reward, torch.sigmoid(lg) > 0.5, diverged)


ROLLOUT_CHUNK = 256
ActionFn = Callable[[torch.Tensor], torch.Tensor]


def _rollout_chunk(
    model: WorldModel,
    norms: WorldModelNormalisers,
    source: Dataset,
    rows: np.ndarray,
    horizon: int,
    policy: ActionFn | None,
    tg: torch.Generator,
) -> list[Episode]:
    """Roll B = len(rows) trajectories for up to ``horizon`` steps from the rows' states."""
    t = source.transitions
    device = next(model.parameters()).device
    b, o = len(rows), model.obs_dim
    noise = torch.randn((horizon, b, o + 1), generator=tg).to(device)
    elites = model.elite_idx
    members = elites[torch.randint(len(elites), (horizon, b), generator=tg).to(elites.device)].to(device)
    obs = torch.as_tensor(np.array(t.observations[rows]), device=device)
    low = torch.as_tensor(source.info.action_space.low, device=device)
    high = torch.as_tensor(source.info.action_space.high, device=device)
    states, acts, rews = [obs], [], []
    alive = torch.ones(b, dtype=torch.bool, device=device)
    ends = torch.full((b,), horizon, dtype=torch.long, device=device)
    terminated = torch.zeros(b, dtype=torch.bool, device=device)
    for k in range(horizon):
        if policy is None:
            act = torch.as_tensor(np.array(t.actions[rows + k]), device=device)
        else:
            act = torch.clamp(policy(obs), low, high)
        out = model_step(model, norms, obs, act, members[k], noise[k])
        stop_div = alive & out.diverged
        ends[stop_div] = k  # the diverged step is not kept
        alive &= ~out.diverged
        stop_term = alive & out.terminal
        ends[stop_term] = k + 1
        terminated |= stop_term
        alive &= ~out.terminal
        states.append(torch.where(out.diverged[:, None], obs, out.next_obs))
        acts.append(act)
        rews.append(out.reward)
        obs = states[-1]
        if not alive.any():
            break
    s = torch.stack(states, 1).cpu().numpy()
    a, r = torch.stack(acts, 1).cpu().numpy(), torch.stack(rews, 1).cpu().numpy()
    episodes = []
    for i in range(b):
        n = int(ends[i])
        if n > 0:
            episodes.append(Episode.ending(s[i, : n + 1], a[i, :n], r[i, :n], terminated=bool(terminated[i])))
    return episodes


def sample_world_model(
    model: WorldModel,
    norms: WorldModelNormalisers,
    source: Dataset,
    n_transitions: int,
    *,
    seed: int = 0,
    horizon: int = 32,
    policy: ActionFn | None = None,
) -> list[Episode]:
    """Rollouts holding at least ``n_transitions`` transitions, from real start states of ``source``.

    ``policy=None`` replays the dataset's own actions after each start state (the start is drawn among rows
    with ``horizon`` steps left in their episode); otherwise actions come from ``policy(obs)``. Work is done
    in fixed chunks of rollouts, each seeded by (seed, chunk): the result depends on the seed only.
    """
    t = source.transitions
    pool = window_starts(t, horizon) if policy is None else np.arange(len(t))
    if len(pool) == 0:
        raise RlsynthError(f"{source.source} has no episode with {horizon} steps to replay; lower --horizon")
    episodes: list[Episode] = []
    total, chunk = 0, 0
    while total < n_transitions:
        rng = np.random.default_rng([seed, chunk])
        tg = torch.Generator().manual_seed(int(rng.integers(2**62)))
        got = _rollout_chunk(model, norms, source, rng.choice(pool, size=ROLLOUT_CHUNK), horizon, policy, tg)
        if not got:
            raise RlsynthError("every world-model rollout diverged at its first step; the model is unusable")
        episodes.extend(got)
        total += sum(e.length for e in got)
        chunk += 1
    return episodes
