"""Generator presets: every preset resolves to exactly these (model config, train config) values, written
out here as literals so that a change to a base preset cannot silently move a variant made from it."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import pytest

from rlsynth.generators.api import KINDS, PRESETS, preset
from rlsynth.generators.autoregressive import AutoregressiveConfig
from rlsynth.generators.diffusion import TrajectoryConfig, TransitionConfig
from rlsynth.generators.world_model import WorldModelConfig

EXPECTED: dict[tuple[str, str], tuple[type, dict[str, Any], dict[str, Any]]] = {
    ("trajectory", "cpu-small"): (
        TrajectoryConfig,
        {
            "horizon": 32,
            "channels": (64, 64),
            "emb": 64,
            "stride": 1,
            "step_scale": 0.0,
            "sample_steps": 20,
            "s_churn": 0.0,
            "polish": 30,
            "edm": {
                "sigma_data": 1.0,
                "sigma_min": 0.002,
                "sigma_max": 80.0,
                "rho": 7.0,
                "p_mean": -1.2,
                "p_std": 1.2,
            },
        },
        {
            "steps": 3000,
            "budget_s": None,
            "batch_size": 128,
            "lr": 0.006,
            "weight_decay": 0.0001,
            "warmup_steps": 500,
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "ema_decay": 0.0,
            "val_fraction": 0.05,
            "eval_every": 1000,
            "checkpoint_every": 1000,
            "seed": 0,
            "device": "auto",
            "threads": 0,
            "progress": True,
        },
    ),
    ("trajectory", "gpu-paper"): (
        TrajectoryConfig,
        {
            "horizon": 32,
            "channels": (128, 256, 512),
            "emb": 128,
            "stride": 1,
            "step_scale": 0.0,
            "sample_steps": 20,
            "s_churn": 0.0,
            "polish": 30,
            "edm": {
                "sigma_data": 1.0,
                "sigma_min": 0.002,
                "sigma_max": 80.0,
                "rho": 7.0,
                "p_mean": -1.2,
                "p_std": 1.2,
            },
        },
        {
            "steps": 250000,
            "budget_s": None,
            "batch_size": 256,
            "lr": 0.0002,
            "weight_decay": 0.0001,
            "warmup_steps": 2000,
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "ema_decay": 0.9995,
            "val_fraction": 0.05,
            "eval_every": 5000,
            "checkpoint_every": 10000,
            "seed": 0,
            "device": "auto",
            "threads": 0,
            "progress": True,
        },
    ),
    ("transition", "cpu-small"): (
        TransitionConfig,
        {
            "width": 256,
            "depth": 3,
            "emb": 64,
            "sample_steps": 20,
            "s_churn": 0.0,
            "polish": 30,
            "edm": {
                "sigma_data": 1.0,
                "sigma_min": 0.002,
                "sigma_max": 80.0,
                "rho": 7.0,
                "p_mean": -1.2,
                "p_std": 1.2,
            },
        },
        {
            "steps": 15000,
            "budget_s": None,
            "batch_size": 256,
            "lr": 0.001,
            "weight_decay": 0.0001,
            "warmup_steps": 500,
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "ema_decay": 0.999,
            "val_fraction": 0.05,
            "eval_every": 1000,
            "checkpoint_every": 2000,
            "seed": 0,
            "device": "auto",
            "threads": 0,
            "progress": True,
        },
    ),
    ("transition", "gpu-paper"): (
        TransitionConfig,
        {
            "width": 1024,
            "depth": 6,
            "emb": 128,
            "sample_steps": 20,
            "s_churn": 0.0,
            "polish": 30,
            "edm": {
                "sigma_data": 1.0,
                "sigma_min": 0.002,
                "sigma_max": 80.0,
                "rho": 7.0,
                "p_mean": -1.2,
                "p_std": 1.2,
            },
        },
        {
            "steps": 100000,
            "budget_s": None,
            "batch_size": 256,
            "lr": 0.0003,
            "weight_decay": 0.0,
            "warmup_steps": 1000,
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "ema_decay": 0.999,
            "val_fraction": 0.05,
            "eval_every": 5000,
            "checkpoint_every": 10000,
            "seed": 0,
            "device": "auto",
            "threads": 0,
            "progress": True,
        },
    ),
    ("autoregressive", "cpu-small"): (
        AutoregressiveConfig,
        {
            "horizon": 32,
            "width": 96,
            "depth": 2,
            "heads": 4,
            "kv_heads": 1,
            "mlp_ratio": 2,
            "stride": 1,
            "temperature": 0.5,
            "sigma_start": 0.3,
            "refine_steps": 1,
            "polish": 10,
        },
        {
            "steps": 10000,
            "budget_s": None,
            "batch_size": 128,
            "lr": 0.001,
            "weight_decay": 0.0001,
            "warmup_steps": 300,
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "ema_decay": 0.999,
            "val_fraction": 0.05,
            "eval_every": 500,
            "checkpoint_every": 1000,
            "seed": 0,
            "device": "auto",
            "threads": 0,
            "progress": True,
        },
    ),
    ("autoregressive", "gpu-paper"): (
        AutoregressiveConfig,
        {
            "horizon": 32,
            "width": 256,
            "depth": 6,
            "heads": 8,
            "kv_heads": None,
            "mlp_ratio": 4,
            "stride": 1,
            "temperature": 0.5,
            "sigma_start": 0.3,
            "refine_steps": 1,
            "polish": 10,
        },
        {
            "steps": 100000,
            "budget_s": None,
            "batch_size": 256,
            "lr": 0.0003,
            "weight_decay": 0.0001,
            "warmup_steps": 2000,
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "ema_decay": 0.999,
            "val_fraction": 0.05,
            "eval_every": 5000,
            "checkpoint_every": 10000,
            "seed": 0,
            "device": "auto",
            "threads": 0,
            "progress": True,
        },
    ),
    ("world-model", "cpu-small"): (
        WorldModelConfig,
        {
            "ensemble": 5,
            "elites": 4,
            "hidden": 200,
            "layers": 3,
            "logvar_penalty": 0.01,
            "divergence_bound": 50.0,
        },
        {
            "steps": 10000,
            "budget_s": None,
            "batch_size": 256,
            "lr": 0.001,
            "weight_decay": 5e-05,
            "warmup_steps": 200,
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "ema_decay": 0.0,
            "val_fraction": 0.05,
            "eval_every": 1000,
            "checkpoint_every": 2000,
            "seed": 0,
            "device": "auto",
            "threads": 0,
            "progress": True,
        },
    ),
    ("world-model", "gpu-paper"): (
        WorldModelConfig,
        {
            "ensemble": 7,
            "elites": 5,
            "hidden": 200,
            "layers": 4,
            "logvar_penalty": 0.01,
            "divergence_bound": 50.0,
        },
        {
            "steps": 100000,
            "budget_s": None,
            "batch_size": 256,
            "lr": 0.001,
            "weight_decay": 5e-05,
            "warmup_steps": 1000,
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
            "ema_decay": 0.0,
            "val_fraction": 0.05,
            "eval_every": 2000,
            "checkpoint_every": 5000,
            "seed": 0,
            "device": "auto",
            "threads": 0,
            "progress": True,
        },
    ),
}


def test_every_kind_has_the_two_presets() -> None:
    assert {(k, n) for k in KINDS for n in PRESETS[k]} == set(EXPECTED)
    assert list(PRESETS) == list(KINDS)


@pytest.mark.parametrize(("kind", "name"), sorted(EXPECTED))
def test_a_preset_resolves_to_its_recorded_values(kind: str, name: str) -> None:
    model_cls, model, train = EXPECTED[(kind, name)]
    model_cfg, train_cfg = preset(kind, name)
    assert type(model_cfg) is model_cls
    assert asdict(model_cfg) == model
    assert asdict(train_cfg) == train
    # Every field is compared: a field added to a config class must be added here too.
    assert {f.name for f in fields(model_cfg)} == set(model)
    assert {f.name for f in fields(train_cfg)} == set(train)
