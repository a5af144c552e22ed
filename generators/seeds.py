"""Per-sample noise seeds: a sample's randomness depends on (run seed, sample index) only, so a sample does
not depend on how a caller splits the work."""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def sample_seeds(seed: int, first: int, n: int) -> np.ndarray:
    """Noise seeds (n,) uint64 of samples first..first+n−1 of a run seeded ``seed``: SplitMix64 of
    (seed, index), vectorised (one SeedSequence per sample cost more than drafting it)."""
    with np.errstate(over="ignore"):
        z = np.arange(first, first + n, dtype=np.uint64) + np.uint64(
            (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample ``index`` of a run seeded ``seed``."""
    return int(sample_seeds(seed, index, 1)[0])
