"""Warm starts: sampling that begins from earlier samples raised to a noise level σ_start, not from noise.

The PGD loop regenerates its synthetic set every round for a target agent that has moved only a little,
so last round's samples are already close to what this round needs (as RTI-DP reuses the last solution
of a diffusion policy). A warm round noises them to σ_start and runs the sampler from there.

How far down the schedule one may start is read off the sampler's **contraction**: two starts that
differ by δ end, after the warm sampler and with the same noise, δ·c(σ_start) apart. c is 1 at σ_start
→ 0 (nothing changes) and falls towards 0 as σ_start grows (the output forgets its start). For data
N(μ, s²) and an exact denoiser the probability-flow ODE from σ to 0 is the affine map
x ↦ μ + s/√(s² + σ²)·(x − μ), so c(σ) = s/√(s² + σ²) per dimension (the closed form the tests check the
estimate against). Whatever separates last round's samples from the ones a cold round would draw now
(the target moved, the model drifted) survives a warm round scaled by c; :func:`choose_sigma_start`
picks the smallest σ_start on a ladder whose measured c is within a tolerance.

The samples themselves are kept with the version they made (:data:`SAMPLES_FILE`, raw units: windows
(M, H, D) of tokens, or transition features (M, F)), so a round can start from any earlier version.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


Resample = Callable[[np.ndarray, float], np.ndarray]
"""``resample(starts (P, ...) raw, sigma_start) -> outputs (P, ...) raw``, the same noise for row i on
every call (seeded by the row's index)."""


def contraction(
    resample: Resample, a: np.ndarray, b: np.ndarray, sigma_start: float, scale: np.ndarray
) -> float:
    """The median over rows of ‖out(a_i) − out(b_i)‖ / ‖a_i − b_i‖, distances in units of ``scale``
    (per last-axis dimension: the generator's normaliser std), both outputs drawn with the same noise."""
    ya, yb = resample(a, sigma_start), resample(b, sigma_start)
    d_in = np.sqrt((((a - b) / scale) ** 2).reshape(len(a), -1).sum(1))
    d_out = np.sqrt((((ya - yb) / scale) ** 2).reshape(len(a), -1).sum(1))
    keep = d_in > 0
    if not keep.any():
        raise RlsynthError("contraction needs pairs of different starts")
    return float(np.median(d_out[keep] / d_in[keep]))


@dataclass(frozen=True)
class Choice:
    """The σ_start picked and the contraction curve it was read from."""

    sigma_start: float
    curve: tuple[tuple[float, float], ...]
    """(σ_start, measured c) on the ladder, up to the pick."""
    tolerance: float


def choose_sigma_start(
    resample: Resample,
    samples: np.ndarray,
    scale: np.ndarray,
    edm: EDMConfig,
    tolerance: float,
    pairs: int = 32,
    sigmas: Sequence[float] | None = None,
) -> Choice:
    """The smallest σ_start on the ladder whose contraction is ≤ ``tolerance`` (σ_max if none is),
    measured on ``pairs`` pairs of distinct rows of ``samples``: row i against row i + pairs, a real
    difference between two samples rather than an infinitesimal one."""
    if not 0 < tolerance <= 1:
        raise RlsynthError(f"warm tolerance must be in (0, 1], got {tolerance}")
    p = min(pairs, len(samples) // 2)
    if p < 1:
        raise RlsynthError("choosing σ_start needs at least two samples")
    a, b = samples[:p], samples[p : 2 * p]
    curve = []
    for s in sigmas if sigmas is not None else ladder(edm):
        c = contraction(resample, a, b, s, scale)
        curve.append((float(s), c))
        if c <= tolerance:
            return Choice(float(s), tuple(curve), tolerance)
    return Choice(float(edm.sigma_max), tuple(curve), tolerance)


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
