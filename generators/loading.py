"""Loading a trained generator folder, every file checked against the code before memory is committed to
it, and the refiner a drafter's samples are refined by (the files are described in
:mod:`generators.checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import DatasetInfo
from rlsynth.generators.checkpoint import (
    CheckpointError,
    check_model_fields,
    checkpoint_info,
    read_json,
    read_norms,
    read_tensors,
    specs_of,
    write_json,
)
from rlsynth.generators.diffusion import TrajectoryConfig, TransitionDiffusion
from rlsynth.generators.families import FAMILIES, Family, layout_of
from rlsynth.generators.sampling import LoadedGenerator, SampleOptions
from rlsynth.generators.training import resolve_device
from rlsynth.generators.world_model import WorldModel, check_elites


def _model_config(family: Family, d: Any, where: Path) -> Any:
    """The model config recorded in ``where``, checked field by field before it is built."""
    check_model_fields(family.config_cls, d, where)
    try:
        cfg = family.config_from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: model config cannot be used ({e})") from None
    if isinstance(cfg, TrajectoryConfig) and cfg.horizon % 2 ** (len(cfg.channels) - 1):
        raise CheckpointError(
            f"{where}: horizon {cfg.horizon} is not divisible by 2^{len(cfg.channels) - 1} "
            f"({len(cfg.channels)} U-Net levels)"
        )
    return cfg


def _skeleton(family: Family, info: DatasetInfo, cfg: Any, where: Path) -> nn.Module:
    """The model built on the ``meta`` device: its parameter shapes, with no memory behind them."""
    try:
        with torch.device("meta"):
            return family.build(info, cfg)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{where}: the model config cannot be built ({e})") from None


def _norm_dims(kind: str, info: DatasetInfo, skeleton: nn.Module) -> dict[str, int]:
    """The normalisers a generator of ``kind`` needs and the length of each."""
    if kind == "transition":
        assert isinstance(skeleton, TransitionDiffusion)
        return {"features": skeleton.dim}
    if kind == "world-model":
        obs, act = info.observation_space.dim, info.action_space.dim
        return {"obs": obs, "act": act, "delta": obs, "reward": 1}
    return {"tokens": layout_of(info).dim}


def load_generator(folder: str | Path, device: str = "auto") -> LoadedGenerator:
    """A trained generator, every file checked before memory is committed to it: config values against
    type and size bounds, the model's parameter shapes (computed on the ``meta`` device) against the
    safetensors header, the header against the file's size, and the normalisers against the spaces."""
    f = Path(folder)
    if not f.is_dir():
        raise CheckpointError(f"{f}: no such generator folder")
    where = f / "config.json"
    config = read_json(where)
    kind = config.get("kind") if isinstance(config, dict) else None
    if not isinstance(kind, str) or kind not in FAMILIES:
        raise CheckpointError(f"{where}: unknown generator kind {str(kind)[:40]!r}")
    if not isinstance(config.get("refiner", ""), str):
        raise CheckpointError(f"{where}: refiner must be a folder path")
    family = FAMILIES[kind]
    info = checkpoint_info(config, where)
    cfg = _model_config(family, config.get("model"), where)
    skeleton = _skeleton(family, info, cfg, where)
    norms = read_norms(f / "normaliser.json", _norm_dims(kind, info, skeleton))
    weights = f / "model.safetensors"
    tensors = read_tensors(weights, specs_of(skeleton.state_dict()))
    try:
        model = family.build(info, cfg)
        model.load_state_dict(tensors)
    except (TypeError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{f}: weights do not match the config ({e})") from None
    if isinstance(model, WorldModel):
        check_elites(model, weights)
    model.to(resolve_device(device)).eval()
    return LoadedGenerator(kind=kind, folder=f, config=config, model=model, norms=norms, info=info)


def record_refiner(folder: Path, refiner: Path) -> None:
    """Record in a trained drafter's config the trajectory model that refines its drafts by default."""
    config = read_json(folder / "config.json")
    config["refiner"] = str(refiner.resolve())
    write_json(folder / "config.json", config)


def refiner_for(gen: LoadedGenerator, opts: SampleOptions) -> LoadedGenerator | None:
    """The trajectory model refining ``gen``'s drafts: ``opts.refiner``, else the one recorded when it was
    trained (``--refiner``); None for other kinds or when there is neither."""
    if gen.kind != "autoregressive":
        return None
    if opts.refiner is not None:
        return opts.refiner
    path = gen.config.get("refiner")
    if path is None:
        return None
    if not Path(path).is_dir():
        raise RlsynthError(
            f"{gen.folder}: its recorded refiner {path} is gone: pass --refiner DIR (or --sigma-start 0)"
        )
    return load_generator(path, device=str(gen.device))
