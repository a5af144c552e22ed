"""Fidelity: judge a dataset against the true MuJoCo simulator.

The oracle restores the simulator state from an observation and steps it with the recorded action:

* MuJoCo v5 environments whose observation starts with ``qpos[k:]`` then ``qvel`` (Hopper, HalfCheetah,
  Walker2d, Ant, Humanoid, Swimmer, ...; read from the env's ``observation_structure``) are supported; the
  ``k`` unobserved positions (x, or x and y) are set to 0, which none of these envs' dynamics, rewards or
  termination rules depend on (rewards use the x *difference* over the step);
* some envs clip observed velocities (Hopper and Walker2d at ±10); the bounds are found by probing the env,
  not hard-coded. A row whose velocity sits on a bound cannot be restored exactly: the headline one-step
  metrics are over restorable rows, and the count of the others and the metrics over all rows sit beside them;
* the oracle is checked on construction (reset → observe → restore → observe must agree), so an env
  whose observation does not have this layout gets a clear "no oracle" error instead of wrong numbers.

Metrics (all errors normalised per dimension by the reference data's standard deviation):

* ``one_step``: next-observation MSE, reward absolute error, agreement of the terminal flag with the env's
  own termination rule, and how often the restored states interpenetrate (contact depth > 1 cm / 5 cm);
* ``horizons``: open-loop error growth — from a restorable row, replay the next H recorded actions in the
  simulator and compare the states it reaches with the recorded ones (windows never cross episodes);
* ``policy_log_likelihood``: mean over rows of log π(a|s), summed over action dimensions (given a policy);
* ``novelty`` and ``coverage`` against a reference dataset (nearest neighbours in normalised (s, a) space).

When ``sample`` is given, a seeded subset of rows is evaluated and the result says so.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlsynth.datasets.envs import make_env
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset, Transitions

# Probe velocity: far above any clip bound a MuJoCo env applies to its observation.
PROBE_VELOCITY = 1e4
DEFAULT_HORIZONS = (1, 8, 32)
STD_FLOOR = 1e-6
# MuJoCo locomotion models are in metres.
PENETRATION_CM = 0.01


class NoOracleError(RlsynthError):
    """The environment has no simulator oracle."""


@dataclass(frozen=True)
class EvalConfig:
    """What ``datasets evaluate`` computes."""

    sample: int | None = None
    """Evaluate this many rows (seeded); ``None`` evaluates every row."""
    horizons: tuple[int, ...] = DEFAULT_HORIZONS
    """Open-loop horizons of the multi-step error."""
    windows: int = 256
    """Windows per horizon (seeded; fewer if the data has fewer)."""
    novelty_rows: int = 2000
    """Rows (of the dataset and of the reference) used for nearest-neighbour novelty and coverage."""
    seed: int = 0


class MujocoOracle:
    """Restore-and-step access to a MuJoCo v5 environment's true dynamics."""

    def __init__(self, env_id: str) -> None:
        self.env_id = env_id
        self.env = make_env(env_id)
        u = self.env.unwrapped
        structure = getattr(u, "observation_structure", None)
        if (
            not hasattr(u, "set_state")
            or not isinstance(structure, dict)
            or not {"qpos", "qvel"} <= structure.keys()
        ):
            self.env.close()
            raise NoOracleError(
                f"no simulator oracle for '{env_id}': it is not a MuJoCo env whose observation starts with "
                "qpos then qvel (supported: Hopper, HalfCheetah, Walker2d, Ant, Humanoid, Swimmer, ... v5)"
            )
        self.u = u
        self.skipped = int(structure.get("skipped_qpos", 0))
        self.n_qpos = int(structure["qpos"])
        self.n_qvel = int(structure["qvel"])
        if self.skipped + self.n_qpos != u.model.nq or self.n_qvel != u.model.nv:
            self.env.close()
            raise NoOracleError(
                f"no simulator oracle for '{env_id}': observation does not hold the full state"
            )
        self.env.reset(seed=0)
        self.vel_bound = self._probe_velocity_bounds()
        self._check_round_trip()

    def close(self) -> None:
        self.env.close()

    def _observe(self) -> np.ndarray:
        return np.asarray(self.u._get_obs(), np.float64)

    def _probe_velocity_bounds(self) -> np.ndarray:
        qpos = self.u.data.qpos.copy()
        self.u.set_state(qpos, np.full(self.u.model.nv, PROBE_VELOCITY))
        observed = self._observe()[self.n_qpos : self.n_qpos + self.n_qvel]
        bound = np.where(np.abs(observed) < PROBE_VELOCITY * (1 - 1e-9), np.abs(observed), np.inf)
        self.env.reset(seed=0)
        return bound

    def _check_round_trip(self) -> None:
        obs = self._observe()
        self.restore(obs)
        if not np.allclose(self._observe(), obs, rtol=0, atol=1e-9):
            raise NoOracleError(
                f"no simulator oracle for '{self.env_id}': restoring an observation does not reproduce it"
            )

    def restorable(self, obs: np.ndarray) -> np.ndarray:
        """Rows (N, obs_dim) whose velocities are strictly inside the observation clip bounds."""
        vel = np.abs(obs[:, self.n_qpos : self.n_qpos + self.n_qvel])
        return np.all(vel < self.vel_bound - 1e-6, axis=1)

    def restore(self, obs: np.ndarray) -> None:
        qpos = np.concatenate([np.zeros(self.skipped), obs[: self.n_qpos]]).astype(np.float64)
        qvel = np.asarray(obs[self.n_qpos : self.n_qpos + self.n_qvel], np.float64)
        self.u.set_state(qpos, qvel)

    def penetration(self) -> float:
        """Depth (model length units, ≥ 0) of the deepest contact of the state :meth:`restore` set.

        The simulator answers an interpenetrating state with a contact impulse that the recorded next
        state knows nothing of, so this separates physically impossible states from wrong dynamics.
        No forward pass here: ``set_state`` (inside ``restore``) already ran one and found the contacts.
        """
        d = self.u.data
        return max(0.0, -min((float(d.contact[j].dist) for j in range(d.ncon)), default=0.0))

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        obs, reward, terminated, _, _ = self.u.step(np.asarray(action, np.float64))
        return np.asarray(obs, np.float64), float(reward), bool(terminated)


def reference_std(ref: Transitions) -> np.ndarray:
    return np.maximum(ref.observations.astype(np.float64).std(0), STD_FLOOR)


def _simulate(
    oracle: MujocoOracle, t: Transitions, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The simulator's next observation, reward and termination from each row's state and action, and
    the restored state's penetration depth."""
    n, d = len(rows), t.observations.shape[1]
    sim_next = np.empty((n, d))
    sim_rew = np.empty(n)
    sim_term = np.empty(n, bool)
    depth = np.empty(n)
    for k, i in enumerate(rows):
        oracle.restore(t.observations[i].astype(np.float64))
        depth[k] = oracle.penetration()
        sim_next[k], sim_rew[k], sim_term[k] = oracle.step(t.actions[i])
    return sim_next, sim_rew, sim_term, depth


def one_step_row_errors(oracle: MujocoOracle, t: Transitions, std: np.ndarray) -> np.ndarray:
    """Each row's one-step error (mean over dimensions of the squared error in units of ``std``), NaN
    for rows whose state cannot be restored."""
    rows = np.arange(len(t))
    sim_next = _simulate(oracle, t, rows)[0]
    sq = (((sim_next - t.next_observations.astype(np.float64)) / std) ** 2).mean(1)
    return np.where(oracle.restorable(t.observations), sq, np.nan)


def _one_step(oracle: MujocoOracle, t: Transitions, rows: np.ndarray, std: np.ndarray) -> dict[str, Any]:
    sim_next, sim_rew, sim_term, depth = _simulate(oracle, t, rows)
    err = sim_next - t.next_observations[rows].astype(np.float64)
    sq_norm = (err / std) ** 2
    rew_err = np.abs(sim_rew - t.rewards[rows].astype(np.float64))
    agree = sim_term == t.terminals[rows]
    ok = oracle.restorable(t.observations[rows])

    def mean(x: np.ndarray) -> float | None:
        return float(x.mean()) if x.size else None

    return {
        "obs_mse": mean(err[ok] ** 2),
        "obs_mse_normalised": mean(sq_norm[ok]),
        # Synthetic data has heavy tails (a few wild rows move the mean): the row distribution, too.
        "obs_mse_normalised_median": float(np.median(sq_norm[ok].mean(1))) if ok.any() else None,
        "obs_mse_normalised_p90": float(np.quantile(sq_norm[ok].mean(1), 0.9)) if ok.any() else None,
        "reward_mae": mean(rew_err[ok]),
        "terminal_agreement": mean(agree[ok].astype(float)),
        "rows": int(ok.sum()),
        "unrecoverable_rows": int((~ok).sum()),
        "obs_mse_all_rows": mean(err**2),
        "obs_mse_normalised_all_rows": mean(sq_norm),
        "reward_mae_all_rows": mean(rew_err),
        "terminal_agreement_all_rows": mean(agree.astype(float)),
        "per_dim_obs_mse_normalised": sq_norm[ok].mean(0).tolist() if ok.any() else None,
        # Restored states that put a body into another (or the floor) by more than 1 / 5 cm, and the
        # one-step error of the > 1 cm ones: how much of a generator's error is impossible states.
        "penetration_over_1cm": mean((depth[ok] > PENETRATION_CM).astype(float)),
        "penetration_over_5cm": mean((depth[ok] > 5 * PENETRATION_CM).astype(float)),
        "obs_mse_normalised_penetrating": mean(sq_norm[ok & (depth > PENETRATION_CM)]),
    }


def window_starts(t: Transitions, horizon: int, candidates: np.ndarray | None = None) -> np.ndarray:
    """Rows from which ``horizon`` consecutive steps stay inside one episode."""
    bounds = t.episode_bounds()
    lengths = np.diff(bounds)
    ep_len = np.repeat(lengths, lengths)
    ok = t.step.astype(np.int64) + horizon <= ep_len
    if candidates is not None:
        ok &= candidates
    return np.flatnonzero(ok)


BatchStep = Callable[[np.ndarray, np.ndarray], np.ndarray]


def open_loop_curve(
    step: BatchStep, t: Transitions, starts: np.ndarray, horizon: int, std: np.ndarray
) -> np.ndarray:
    """Normalised MSE after k = 1..horizon open-loop steps, averaged over windows.

    From each start row, ``step(states (B, o), actions (B, a)) -> next states`` is applied to its own
    predictions with the recorded actions, and compared with the recorded next observations.
    """
    states = t.observations[starts].astype(np.float64)
    curve = np.zeros(horizon)
    for k in range(horizon):
        states = np.asarray(step(states, t.actions[starts + k]), np.float64)
        curve[k] = float((((states - t.next_observations[starts + k]) / std) ** 2).mean())
    return curve


def _linear_features(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.concatenate([s, a, np.ones((len(s), 1))], 1).astype(np.float64)


def linear_step(train: Transitions) -> BatchStep:
    """The cheapest dynamics model a user could fit: least squares s' = [s, a, 1]·W on ``train``."""
    x = _linear_features(train.observations, train.actions)
    w, *_ = np.linalg.lstsq(x, train.next_observations.astype(np.float64), rcond=None)
    return lambda s, a: _linear_features(s, a) @ w


def linear_yardstick(t: Transitions) -> float:
    """One-step normalised MSE of :func:`linear_step` fitted and scored on ``t``: the error a synthetic
    dataset's one-step error should be well below to be worth more than a linear model."""
    err = (linear_step(t)(t.observations, t.actions) - t.next_observations) / reference_std(t)
    return float((err**2).mean())


def oracle_step(oracle: MujocoOracle) -> BatchStep:
    """The simulator as a batched step function (restores each row, steps it)."""

    def step(states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        out = np.empty_like(states)
        for i in range(len(states)):
            oracle.restore(states[i])
            out[i] = oracle.step(actions[i])[0]
        return out

    return step


def _horizon(
    oracle: MujocoOracle, t: Transitions, h: int, n_windows: int, std: np.ndarray, rng: np.random.Generator
) -> dict[str, Any]:
    starts = window_starts(t, h, oracle.restorable(t.observations))
    possible = len(starts)
    if possible == 0:
        return {"windows": 0, "windows_possible": 0, "obs_mse_normalised": None, "curve": []}
    chosen = np.sort(rng.choice(starts, size=min(n_windows, possible), replace=False))
    curve = open_loop_curve(oracle_step(oracle), t, chosen, h, std)
    return {
        "windows": len(chosen),
        "windows_possible": int(possible),
        "obs_mse_normalised": float(curve[-1]),
        "curve": curve.tolist(),
    }


def policy_log_likelihood(
    policy: Any, t: Transitions, rows: np.ndarray, batch: int = 4096
) -> dict[str, float]:
    import torch

    total = 0.0
    with torch.no_grad():
        for lo in range(0, len(rows), batch):
            idx = rows[lo : lo + batch]
            lp = policy.log_prob(torch.tensor(t.observations[idx]), torch.tensor(t.actions[idx]))
            total += float(lp.double().sum())
    mean = total / max(1, len(rows))
    return {"mean": mean, "per_action_dim": mean / t.actions.shape[1], "rows": len(rows)}


NN_QUERY_BLOCK = 1024
"""Query rows per distance block (the chunks the dense search used: the matrix product's path, and so
the last bits of a distance, may depend on a call's row counts)."""
NN_REF_BLOCK = 32768
"""Reference rows per distance block, at least (a reference is split evenly into blocks of between this
and twice this many rows; a smaller one is one block): a block of distances is at most NN_QUERY_BLOCK ×
2·NN_REF_BLOCK float32 (256 MB) whatever the sizes of the query set and the reference, and normalised
features are built a block at a time too, so memory does not grow with |reference| × |queries| (4 GB at
1M reference rows for the dense search)."""


def _features(x: Transitions, rows: slice | np.ndarray) -> np.ndarray:
    """(s, a) of some rows, float64."""
    return np.concatenate([x.observations[rows], x.actions[rows]], 1).astype(np.float64)


def _blocks(n: int, size: int) -> Iterator[slice]:
    return (slice(lo, min(lo + size, n)) for lo in range(0, n, size))


def _even_blocks(n: int, size: int) -> Iterator[slice]:
    """``n`` rows in blocks of ``size`` to ``2·size − 1`` rows (one block if n < size). No short tail
    block: matrix products with a handful of rows take another path, whose distances differ in the last
    bit from those of the whole reference."""
    k = max(1, n // size)
    bounds = np.arange(k + 1) * n // k
    return (slice(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds))


def _sequential_sum(parts: Iterator[np.ndarray]) -> np.ndarray:
    """Column sums of blocks stacked in order, bit-equal to ``np.sum(stacked, 0)``: numpy sums a C-ordered
    table's axis 0 row after row, so each block's rows are added after the running total."""
    total: np.ndarray | None = None
    for part in parts:
        total = part.sum(0) if total is None else np.concatenate([total[None], part]).sum(0)
    assert total is not None, "no rows"
    return total


def feature_stats(x: Transitions) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (floored) of the (s, a) columns, bit-equal to numpy's ``mean(0)`` and ``std(0)`` of
    the whole float64 table, summed a block at a time."""
    n = len(x)
    mean = _sequential_sum(_features(x, b) for b in _blocks(n, NN_REF_BLOCK)) / n
    sq = _sequential_sum(np.square(_features(x, b) - mean) for b in _blocks(n, NN_REF_BLOCK)) / n
    return mean, np.maximum(np.sqrt(sq), STD_FLOOR)


@dataclass(frozen=True)
class ZScored:
    """Rows of a dataset's (s, a) features z-scored by reference statistics, made float32 when read (the
    float32 cast of the float64 z-score, as distances were always taken), a block at a time."""

    x: Transitions
    mu: np.ndarray
    sd: np.ndarray

    def rows(self, idx: slice | np.ndarray) -> np.ndarray:
        return ((_features(self.x, idx) - self.mu) / self.sd).astype(np.float32)

    def blocks(self, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """All rows (or the rows ``order`` lists) in blocks of NN_REF_BLOCK to twice that."""
        n = len(self.x) if order is None else len(order)
        for b in _even_blocks(n, NN_REF_BLOCK):
            yield self.rows(b if order is None else order[b])


def _nn_dist(query: np.ndarray, ref_blocks: Iterator[np.ndarray], n_ref: int) -> np.ndarray:
    """Distance from each query row (float32) to its nearest row among the reference blocks (float32,
    ``n_ref`` rows in all), float64.

    Each distance is the one ``torch.cdist`` gives against the whole reference: cdist takes matrix
    products unless both sides have at most 25 rows, so each block is measured by the path the call on the
    whole reference would have taken, and a minimum of minima is the minimum. A product's entries do not
    depend on the other rows of the call once both sides have a dozen rows or more (MKL; the tests check
    it); query chunks of fewer rows (a remainder of under 8 queries) may differ from the whole-reference
    call in the last bit of a float32 distance, as the whole-reference call differs between thread counts.
    """
    import torch

    q = torch.as_tensor(query, dtype=torch.float32)
    best = torch.full((len(q),), math.inf)
    for block in ref_blocks:
        r = torch.as_tensor(block, dtype=torch.float32)
        for b in _blocks(len(q), NN_QUERY_BLOCK):
            mm = b.stop - b.start > 25 or n_ref > 25
            mode = "use_mm_for_euclid_dist" if mm else "donot_use_mm_for_euclid_dist"
            near = torch.cdist(q[b], r, compute_mode=mode).min(1).values
            torch.minimum(best[b], near, out=best[b])
    return best.numpy().astype(np.float64)


def novelty_and_coverage(
    t: Transitions, ref: Transitions, n: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Nearest-neighbour distances in (s, a) space normalised by the reference's per-dimension std.

    ``novelty``: distance from dataset rows to their nearest reference row; ``reference_spacing``: the same
    for reference rows against the rest of the reference (the scale to read novelty against);
    ``coverage``: fraction of reference rows with a dataset row closer than the median reference spacing.
    Memory: the distance blocks of :data:`NN_REF_BLOCK` and one permutation of the reference rows.
    """
    mu, sd = feature_stats(ref)
    ref_z, ds_z = ZScored(ref, mu, sd), ZScored(t, mu, sd)
    q = ds_z.rows(rng.choice(len(t), size=min(n, len(t)), replace=False))
    perm = rng.permutation(len(ref))
    half = len(perm) // 2
    spacing = _nn_dist(ref_z.rows(perm[:half][:n]), ref_z.blocks(perm[half:]), len(perm) - half)
    novelty = _nn_dist(q, ref_z.blocks(), len(ref))
    ref_q = ref_z.rows(rng.choice(len(ref), size=min(n, len(ref)), replace=False))
    cover = _nn_dist(ref_q, ds_z.blocks(), len(t)) <= float(np.median(spacing))
    return {
        "novelty": {"mean": float(novelty.mean()), "median": float(np.median(novelty)), "rows": len(q)},
        "reference_spacing": {"mean": float(spacing.mean()), "median": float(np.median(spacing))},
        "coverage": float(cover.mean()),
    }


def evaluate(
    ds: Dataset,
    *,
    env_id: str | None = None,
    reference: Dataset | None = None,
    policy: Any = None,
    config: EvalConfig | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every fidelity metric of ``ds`` (see the module docstring). Raises :class:`NoOracleError`."""
    cfg = config or EvalConfig()
    env = env_id or ds.info.env_id
    if not env:
        raise RlsynthError(f"{ds.source}: dataset names no environment; pass --env")
    t = ds.transitions
    ref_t = reference.transitions if reference is not None else t
    if ref_t.observations.shape[1] != t.observations.shape[1] or ref_t.actions.shape[1] != t.actions.shape[1]:
        raise RlsynthError(
            f"reference {reference.source if reference else ''} has other spaces than {ds.source}"
        )
    std = reference_std(ref_t)
    rng = np.random.default_rng(cfg.seed)
    n = len(t)
    rows = (
        np.arange(n)
        if cfg.sample is None or cfg.sample >= n
        else np.sort(rng.choice(n, size=cfg.sample, replace=False))
    )
    oracle = MujocoOracle(env)
    if oracle.env.observation_space.shape != t.observations.shape[1:]:
        oracle.close()
        raise RlsynthError(
            f"{ds.source}: observations of width {t.observations.shape[1]} do not fit "
            f"'{env}' (width {oracle.env.observation_space.shape[0]})"
        )
    try:
        one = _one_step(oracle, t, rows, std)
        horizons = {str(h): _horizon(oracle, t, h, cfg.windows, std, rng) for h in sorted(cfg.horizons)}
    finally:
        oracle.close()
    out: dict[str, Any] = {
        "env_id": env,
        "dataset": ds.source,
        "reference": reference.source if reference is not None else "self",
        "evaluated_rows": len(rows),
        "total_rows": int(n),
        "sampled": bool(len(rows) < n),
        "config": asdict(cfg),
        "velocity_clip_bound": [None if math.isinf(b) else float(b) for b in oracle.vel_bound],
        "one_step": one,
        "horizons": horizons,
        "policy_log_likelihood": policy_log_likelihood(policy, t, rows) if policy is not None else None,
    }
    if reference is not None:
        out.update(novelty_and_coverage(t, ref_t, cfg.novelty_rows, rng))
    else:
        out.update({"novelty": None, "coverage": None, "reference_spacing": None})
    return out


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Error growth with horizon and per-dimension one-step error, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for h, r in result["horizons"].items():
        if r["curve"]:
            ax1.plot(
                range(1, len(r["curve"]) + 1),
                r["curve"],
                marker="." if len(r["curve"]) < 10 else None,
                label=f"H={h} ({r['windows']} windows)",
            )
    ax1.set_yscale("symlog", linthresh=1e-12)
    ax1.set_xlabel("open-loop step")
    ax1.set_ylabel("normalised obs MSE vs simulator")
    ax1.set_title("error growth with horizon")
    ax1.legend(fontsize=8)
    per_dim = result["one_step"]["per_dim_obs_mse_normalised"] or []
    ax2.bar(range(len(per_dim)), per_dim)
    ax2.set_yscale("symlog", linthresh=1e-12)
    ax2.set_xlabel("observation dimension")
    ax2.set_title(f"one-step error, {result['one_step']['rows']} restorable rows")
    fig.suptitle(f"fidelity of {result['dataset']} on {result['env_id']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
