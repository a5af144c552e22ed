"""Generator presets: one base per family (``cpu-small``), and the ``gpu-paper`` variant made from it by
:func:`dataclasses.replace`, so that a variant shows only what it changes. Every preset trains a fixed step
count, so the same seed gives the same weights on every machine."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators.autoregressive import AutoregressiveConfig
from rlsynth.generators.diffusion import TrajectoryConfig, TransitionConfig
from rlsynth.generators.families import KINDS
from rlsynth.generators.training import TrainConfig
from rlsynth.generators.world_model import WorldModelConfig

# Sized to ≤ 15 min on the slower 2-core machines: 0.19 s per step there for the earlier 32-64 U-Net
# (planned by a 14-minute budget run), and a 64-64 step costs 1.38× that here, so 3,000 steps take about
# 13 min with data preparation and validation. The model is under-trained at this count (BENCHMARKS.md);
# ``--steps N`` or ``--budget-minutes M`` trains longer. Width: 64 channels at full resolution, not 32 —
# the tokens of both datasets measured have 24 dimensions, and 32 channels left little room beside them;
# at the same training time (3,000 steps against 4,000) the polished one-step error fell 0.52× → 0.40×
# linear on HalfCheetah and 1.27× → 0.92× on Walker2d, spread unchanged (BENCHMARKS.md, "Trajectory
# cpu-small: 64 channels").
# The learning rate is what the fixed count made matter: 6e-3 cut the polished one-step error 2-3×
# against 1e-3 on both datasets measured (BENCHMARKS.md, "Trajectory cpu-small learning rate").
# No weight average: the cosine schedule's last steps already average at a twentieth of the peak rate, and
# an EMA whose horizon is a quarter of so short a run lags behind them. The final weights kept more of the
# data's spread on both datasets measured and a lower unpolished error; polished, they were better on one
# and worse on the other, where the average's lower error came with a collapsed spread (BENCHMARKS.md,
# "Trajectory cpu-small without a weight average").
TRAJECTORY_CPU = (
    TrajectoryConfig(channels=(64, 64), emb=64, stride=1),
    TrainConfig(
        steps=3_000,
        batch_size=128,
        lr=6e-3,
        weight_decay=1e-4,
        warmup_steps=500,
        ema_decay=0.0,
        eval_every=1000,
        checkpoint_every=1000,
    ),
)
# Janner et al.'s temporal U-Net widths (dim 128, mults 1-2-4), trained as policy-guided diffusion.
TRAJECTORY_GPU = (
    replace(TRAJECTORY_CPU[0], channels=(128, 256, 512), emb=128),
    replace(
        TRAJECTORY_CPU[1],
        steps=250_000,
        batch_size=256,
        lr=2e-4,
        warmup_steps=2000,
        ema_decay=0.9995,
        eval_every=5000,
        checkpoint_every=10_000,
    ),
)

TRANSITION_CPU = (
    TransitionConfig(width=256, depth=3, emb=64),
    TrainConfig(
        steps=15_000,
        batch_size=256,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_steps=500,
        ema_decay=0.999,
        eval_every=1000,
        checkpoint_every=2000,
    ),
)
# SynthER: residual MLP width 1024, depth 6, 100k steps of batch 256 at lr 3e-4.
TRANSITION_GPU = (
    replace(TRANSITION_CPU[0], width=1024, depth=6, emb=128),
    replace(
        TRANSITION_CPU[1],
        steps=100_000,
        lr=3e-4,
        weight_decay=0.0,
        warmup_steps=1000,
        eval_every=5000,
        checkpoint_every=10_000,
    ),
)

# Drafting speed is the point of the drafter, so the arithmetic per drafted token is cut where the error
# allowed it (HalfCheetah medium-replay, BENCHMARKS.md): one key/value head (multi-query attention, 1.28×
# faster than 4 at the same refined error) and MLPs of twice the width, not four (the MLP was three quarters
# of a step), in 2 blocks, not 3. Like the trajectory preset it is a fixed step count sized to ≤ 15 min on
# the slower 2-core machines (0.074 s per step there, planned by a 14-minute budget run).
AUTOREGRESSIVE_CPU = (
    AutoregressiveConfig(width=96, depth=2, heads=4, kv_heads=1, mlp_ratio=2),
    TrainConfig(
        steps=10_000,
        batch_size=128,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_steps=300,
        ema_decay=0.999,
        eval_every=500,
        checkpoint_every=1000,
    ),
)
# The model is not a variant of the CPU one: it is the plain transformer (every head its own key/value
# head, MLPs four times the width) that the CPU preset cuts down, so it is spelled out in full.
AUTOREGRESSIVE_GPU = (
    AutoregressiveConfig(width=256, depth=6, heads=8),
    replace(
        AUTOREGRESSIVE_CPU[1],
        steps=100_000,
        batch_size=256,
        lr=3e-4,
        warmup_steps=2000,
        eval_every=5000,
        checkpoint_every=10_000,
    ),
)

# A usable model of a 100k-transition dataset in a few minutes on 2 CPU cores.
WORLD_MODEL_CPU = (
    WorldModelConfig(ensemble=5, elites=4, hidden=200, layers=3),
    TrainConfig(
        steps=10_000,
        batch_size=256,
        lr=1e-3,
        weight_decay=5e-5,
        warmup_steps=200,
        ema_decay=0.0,
        eval_every=1000,
        checkpoint_every=2000,
    ),
)
# MOPO's sizes: 7 members, 5 elites, 4 hidden layers of 200.
WORLD_MODEL_GPU = (
    replace(WORLD_MODEL_CPU[0], ensemble=7, elites=5, layers=4),
    replace(WORLD_MODEL_CPU[1], steps=100_000, warmup_steps=1000, eval_every=2000, checkpoint_every=5000),
)

PRESETS: dict[str, dict[str, tuple[Any, TrainConfig]]] = {
    "trajectory": {"cpu-small": TRAJECTORY_CPU, "gpu-paper": TRAJECTORY_GPU},
    "transition": {"cpu-small": TRANSITION_CPU, "gpu-paper": TRANSITION_GPU},
    "autoregressive": {"cpu-small": AUTOREGRESSIVE_CPU, "gpu-paper": AUTOREGRESSIVE_GPU},
    "world-model": {"cpu-small": WORLD_MODEL_CPU, "gpu-paper": WORLD_MODEL_GPU},
}


def preset(kind: str, name: str) -> tuple[Any, TrainConfig]:
    """The (model config, train config) of preset ``name`` for ``kind``; an error names the choices."""
    if kind not in PRESETS:
        raise RlsynthError(f"unknown generator kind '{kind}' (kinds: {', '.join(KINDS)})")
    if name not in PRESETS[kind]:
        raise RlsynthError(f"unknown preset '{name}' for {kind} (presets: {', '.join(PRESETS[kind])})")
    return PRESETS[kind][name]
