"""Warm starts: sampling that begins from earlier samples raised to a noise level σ_start, not from noise.

The PGD loop regenerates its synthetic set every round for a target agent that has moved only a little,
so last round's samples are already close to what this round needs (as RTI-DP reuses the last solution
of a diffusion policy). A warm round noises them to σ_start and runs the sampler from there.

How far down the schedule one may start: the sampler's **contraction** says how much of a start
survives. Two starts that differ by δ end, after the warm sampler and with the same noise, δ·c(σ_start)
apart; c is 1 at σ_start → 0 and falls as σ_start grows. For data N(μ, s²) and an exact denoiser the
probability-flow ODE from σ to 0 is the affine map x ↦ μ + s/√(s² + σ²)·(x − μ), so c(σ) = s/√(s² + σ²)
(the closed form the tests check the estimate against). Real trajectory windows lie on a thin manifold,
and a start's identity survives until σ nears the distance between samples (c stays near 1 far above
σ = 1), so requiring a small c would send every warm round back to σ_max. What must not survive is not
a sample's identity but a shift of the distribution (the target moved), so :func:`choose_sigma_start`
compares outcomes: the smallest σ_start on a ladder at which a pilot warm round is indistinguishable
from a pilot cold round in the measures that matter (the caller's: target likelihood, dynamics error)
and in spread; the contraction of every rung tried is recorded beside them.

The samples themselves are kept with the version they made (:data:`SAMPLES_FILE`, raw units: windows
(M, H, D) of tokens, or transition features (M, F)), so what each warm round started from can be
read back from the catalog (:func:`load_samples`) and checked against its lineage.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators.checkpoint import read_tensors, write_tensors
from rlsynth.generators.edm import EDMConfig, karras_sigmas

SAMPLES_FILE = "samples.safetensors"
"""The artifact of a version that holds the raw samples it was decoded from (tensor ``samples``)."""

LADDER = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
"""σ_start candidates below σ_max (then σ_max itself, where a warm round is a cold one)."""


@dataclass(frozen=True)
class WarmStart:
    """Start from ``samples`` (raw, the generator's sample shape) noised to ``sigma_start``, then
    ``steps`` sampler steps and ``polish`` iterations (None: the cold rounds'); ``origin`` names where the
    samples came from (a catalog version), for lineage."""

    samples: np.ndarray
    sigma_start: float
    steps: int
    polish: int | None = None
    origin: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.sigma_start, float | int) and math.isfinite(self.sigma_start)):
            raise RlsynthError(f"warm start sigma_start must be a finite number, got {self.sigma_start!r}")
        if self.sigma_start <= 0:
            raise RlsynthError(f"warm start sigma_start must be positive, got {self.sigma_start}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise RlsynthError(f"warm start steps must be a positive integer, got {self.steps!r}")
        if self.polish is not None and (not isinstance(self.polish, int) or self.polish < 0):
            raise RlsynthError(f"warm start polish must be a non-negative integer, got {self.polish!r}")
        if self.samples.ndim < 2 or len(self.samples) == 0:
            raise RlsynthError(f"warm start needs a batch of samples, got shape {self.samples.shape}")
        if not np.isfinite(self.samples).all():
            raise RlsynthError("warm start samples must be finite")


def warm_steps(cold_steps: int, edm: EDMConfig, sigma_start: float) -> int:
    """Steps from ``sigma_start`` at the cold schedule's density: as many as the cold schedule of
    ``cold_steps`` spends at or below it (at least one), so a warm round discretises the ODE as finely
    as a cold one where they overlap."""
    sig = karras_sigmas(cold_steps, edm.sigma_min, edm.sigma_max, edm.rho)[:-1]
    return max(1, int((sig <= sigma_start * (1 + 1e-9)).sum()))


def ladder(edm: EDMConfig) -> tuple[float, ...]:
    """The σ_start candidates of :data:`LADDER` inside (σ_min, σ_max), then σ_max."""
    return (*[s for s in LADDER if edm.sigma_min < s < edm.sigma_max], edm.sigma_max)


@dataclass(frozen=True)
class Candidate:
    """One way to run a warm round: σ_start, the steps from there, the polish after; ``cost`` is its
    denoiser evaluations per sample (Heun: two per step but the last)."""

    sigma_start: float
    steps: int
    polish: int

    @property
    def cost(self) -> int:
        return 2 * self.steps - 1 + self.polish


Resample = Callable[[np.ndarray, Candidate], np.ndarray]
"""``resample(starts (P, ...) raw, candidate) -> outputs (P, ...) raw``, warm-started as ``candidate``
says, with the same noise for row i on every call (seeded by the row's index)."""


def contraction(
    resample: Resample,
    a: np.ndarray,
    b: np.ndarray,
    how: Candidate,
    scale: np.ndarray,
    ya: np.ndarray | None = None,
) -> float | None:
    """The median over rows of ‖out(a_i) − out(b_i)‖ / ‖a_i − b_i‖, distances in units of ``scale``
    (per last-axis dimension: the generator's normaliser std), both outputs drawn with the same noise;
    None when no pair of starts differs. ``ya``: ``resample(a, how)`` when the caller has it already
    (row i's noise depends on its index only, so the first rows of a larger batch are it)."""
    ya = resample(a, how) if ya is None else ya
    yb = resample(b, how)
    d_in = np.sqrt((((a - b) / scale) ** 2).reshape(len(a), -1).sum(1))
    d_out = np.sqrt((((ya - yb) / scale) ** 2).reshape(len(a), -1).sum(1))
    keep = d_in > 0
    return float(np.median(d_out[keep] / d_in[keep])) if keep.any() else None


Measure = Callable[[np.ndarray], dict[str, np.ndarray]]
"""``measure(raw samples (P, ...)) -> {name: per-sample values (P,)}`` (NaN where a sample has none)."""

SIDES = ("lower", "higher", "both")


@dataclass(frozen=True)
class Rule:
    """How a warm pilot's measure may differ from the cold pilot's: freely on ``side`` (a lower dynamics
    error or a higher target likelihood is no reason to reject a warm round; ``both``: neither way), and
    on the other by at most z standard errors of the difference plus ``relative`` × |cold mean| plus
    ``absolute`` (the stated tolerance: a difference too small to matter is not a reason either)."""

    side: str = "both"
    relative: float = 0.0
    absolute: float = 0.0

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise RlsynthError(f"a measure's side must be one of {', '.join(SIDES)}, got {self.side!r}")
        if not (self.relative >= 0 and self.absolute >= 0):
            raise RlsynthError("a measure's tolerances must be non-negative")


SPREAD_TOLERANCE = 0.05
"""A warm pilot's spread (per-dimension std, geometric mean) may differ from the cold pilot's by this
share: the tolerance the project holds every generator's spread to against the data."""


def spread(samples: np.ndarray, scale: np.ndarray) -> float:
    """Geometric mean over the last axis's dimensions of the std of ``samples / scale``."""
    flat = (samples / scale).reshape(-1, samples.shape[-1])
    return float(np.exp(np.mean(np.log(np.maximum(flat.std(0), 1e-12)))))


@dataclass(frozen=True)
class Rung:
    """One candidate tried: its contraction, the warm pilot's measures and spread, and the verdict."""

    candidate: Candidate
    contraction: float | None
    measures: dict[str, float]
    spread: float
    passed: bool


@dataclass(frozen=True)
class Choice:
    """The candidate picked (None: none matched the cold pilot below the cold round's cost), the cold
    pilot it was compared with, and every rung tried."""

    pick: Candidate | None
    cold: dict[str, float]
    cold_spread: float
    rungs: tuple[Rung, ...]
    z: float
    cold_cost: int

    def to_json(self) -> dict[str, object]:
        """JSON-ready (a mean with no finite value is null, not NaN)."""
        return {
            "z": self.z,
            "spread_tolerance": SPREAD_TOLERANCE,
            "cold": {**_finite({**self.cold, "spread": self.cold_spread}), "cost": self.cold_cost},
            "rungs": [
                {**asdict(r.candidate), "cost": r.candidate.cost, "contraction": r.contraction,
                 **_finite(r.measures), "spread": _finite({"s": r.spread})["s"], "passed": r.passed}
                for r in self.rungs
            ],
        }  # fmt: skip


def _finite(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in d.items()}


def _summary(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the finite values."""
    v = values[np.isfinite(values)]
    if v.size < 2:
        return (float(v.mean()) if v.size else float("nan")), float("inf")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def matches(
    cold: dict[str, np.ndarray], warm: dict[str, np.ndarray], rules: dict[str, Rule], z: float
) -> bool:
    """Every measure of the warm pilot within its :class:`Rule`'s bound of the cold pilot's."""
    for name, rule in rules.items():
        (mc, sc), (mw, sw) = _summary(cold[name]), _summary(warm.get(name, np.array([])))
        if not np.isfinite(mw):
            return False
        bound = z * float(np.hypot(sc, sw)) + rule.relative * abs(mc) + rule.absolute
        if rule.side in ("lower", "both") and mw - mc > bound:
            return False
        if rule.side in ("higher", "both") and mc - mw > bound:
            return False
    return True


def choose(
    resample: Resample,
    starts: np.ndarray,
    cold: np.ndarray,
    scale: np.ndarray,
    *,
    sigmas: Sequence[float],
    polishes: Sequence[int],
    steps_of: Callable[[float], int],
    cold_cost: int,
    measure: Measure | None = None,
    rules: dict[str, Rule] | None = None,
    z: float = 2.0,
    pairs: int = 16,
) -> Choice:
    """The cheapest warm round (σ_start in ``sigmas``, polish in ``polishes``, ``steps_of(σ)`` steps),
    below ``cold_cost``, whose pilot from ``starts`` is indistinguishable from the ``cold`` pilot (raw
    samples of a cold round with the same guidance): spread within :data:`SPREAD_TOLERANCE` and every
    ``measure`` within its rule (default ``Rule()``: z standard errors either way).

    A warm round comes closer to a cold one as σ_start grows, so for each polish the smallest passing
    σ_start is found by bisection over the affordable ones (after checking the largest passes at all):
    about log2 of the ladder's length pilots per polish, not one per candidate. Each rung tried also
    records the sampler's contraction on ``pairs`` pairs of starts."""
    if not z > 0:
        raise RlsynthError(f"warm z must be positive, got {z}")
    if len(starts) < 2 or len(cold) < 2:
        raise RlsynthError("choosing σ_start needs at least two starts and two cold samples")
    p = min(pairs, len(starts) // 2)
    cold_m = measure(cold) if measure is not None else {}
    rule_of = {k: (rules or {}).get(k, Rule()) for k in cold_m}
    cold_spread = spread(cold, scale)
    rungs: dict[Candidate, Rung] = {}

    def passes(how: Candidate) -> bool:
        if how not in rungs:
            out = resample(starts, how)
            warm_m = measure(out) if measure is not None else {}
            sp = spread(out, scale)
            ok = abs(sp / cold_spread - 1) <= SPREAD_TOLERANCE and matches(cold_m, warm_m, rule_of, z)
            c = contraction(resample, starts[:p], starts[p : 2 * p], how, scale, ya=out[:p])
            rungs[how] = Rung(how, c, {k: _summary(v)[0] for k, v in warm_m.items()}, sp, ok)
        return rungs[how].passed

    best: Candidate | None = None
    for polish in sorted(set(polishes)):
        line = [Candidate(float(s), steps_of(float(s)), int(polish)) for s in sorted(sigmas)]
        line = [c for c in line if c.cost < (cold_cost if best is None else best.cost)]
        if not line or not passes(line[-1]):
            continue
        lo, hi = 0, len(line) - 1  # line[hi] passes
        while lo < hi:
            mid = (lo + hi) // 2
            if passes(line[mid]):
                hi = mid
            else:
                lo = mid + 1
        best = line[hi]
    cold_means = {k: _summary(v)[0] for k, v in cold_m.items()}
    return Choice(best, cold_means, cold_spread, tuple(rungs.values()), z, cold_cost)


def save_samples(samples: np.ndarray, folder: Path) -> Path:
    """``samples`` as :data:`SAMPLES_FILE` in ``folder`` (written atomically)."""
    path = Path(folder) / SAMPLES_FILE
    write_tensors(path, {"samples": torch.from_numpy(np.ascontiguousarray(samples, np.float32))})
    return path


def load_samples(data: bytes | memoryview, shape: tuple[int, ...], where: str) -> np.ndarray:
    """The samples of a :data:`SAMPLES_FILE` (its bytes, e.g. ``Catalog.file_buffer``), refused unless it
    holds exactly one float32 tensor ``samples`` of rows of ``shape``; the header is checked before
    anything is read."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SAMPLES_FILE
        path.write_bytes(bytes(data))
        tensors = read_tensors(path)
    t = tensors.get("samples")
    if set(tensors) != {"samples"} or t is None or t.dtype != torch.float32 or tuple(t.shape[1:]) != shape:
        got = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
        raise RlsynthError(f"{where}: expected one float32 tensor 'samples' of rows {shape}, found {got}")
    return t.numpy()
