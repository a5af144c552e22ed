"""The four generator families, each beside its model: how to prepare its training data, build the model
and sample from it. A new family subclasses :class:`Family` and joins :data:`FAMILIES`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset, DatasetInfo, Episode
from rlsynth.generators.autoregressive import AutoregressiveConfig, Drafter
from rlsynth.generators.checkpoint import Normaliser, write_tensors
from rlsynth.generators.diffusion import (
    TrajectoryConfig,
    TrajectoryDiffusion,
    TransitionConfig,
    TransitionDiffusion,
    decode_transitions,
    transition_features,
)
from rlsynth.generators.edm import PerSampleNoise
from rlsynth.generators.sampling import (
    CHUNKS,
    LoadedGenerator,
    SampleOptions,
    codec,
    collect,
    diffuse,
    inpaint_first,
    used_settings,
)
from rlsynth.generators.seeds import sample_seeds
from rlsynth.generators.tokens import (
    TokenLayout,
    WindowStore,
    decode_windows,
    flat_tokens,
    start_tokens,
    step_scales,
    window_normaliser,
)
from rlsynth.generators.training import Data, TrainConfig, rows_of, split
from rlsynth.generators.world_model import (
    WorldModel,
    WorldModelConfig,
    WorldModelNormalisers,
    sample_world_model,
    training_tensors,
)

KINDS = ("trajectory", "transition", "autoregressive", "world-model")


class Family:
    """One generator family: how to prepare data, build the model and sample from it."""

    kind: ClassVar[str]
    config_cls: ClassVar[Any]

    def config_from_dict(self, d: dict[str, Any]) -> Any:
        return self.config_cls.from_dict(d) if hasattr(self.config_cls, "from_dict") else self.config_cls(**d)

    def build(self, info: DatasetInfo, cfg: Any) -> nn.Module:
        raise NotImplementedError

    def prepare(self, ds: Dataset, cfg: Any) -> tuple[dict[str, Normaliser], Data]:
        raise NotImplementedError

    def finish(self, model: nn.Module, data: Data, train_cfg: TrainConfig, out: Path) -> None:
        """Work after training (the world model picks its elites here)."""

    def sample(self, gen: LoadedGenerator, source: Dataset, n: int, opts: SampleOptions) -> list[Episode]:
        raise NotImplementedError


def layout_of(info: DatasetInfo) -> TokenLayout:
    return TokenLayout.for_spaces(info.observation_space, info.action_space)


def window_data(
    ds: Dataset, horizon: int, stride: int, step_scale: float = 0.0
) -> tuple[dict[str, Normaliser], Data]:
    """Normalised H-step windows as a :class:`WindowStore`: each token held once, so memory grows with
    the transitions, not with H times them; the statistics are those of all windows' tokens."""
    layout = layout_of(ds.info)
    flat = flat_tokens(layout, ds.transitions, horizon, stride)
    if len(flat.starts) < 2:
        raise RlsynthError(f"{ds.source} has fewer than 2 windows of {horizon} steps; lower the horizon")
    norm = window_normaliser(flat)
    if step_scale:
        norm = replace(norm, std=step_scales(layout, norm.std, ds.transitions, step_scale))
    return {"tokens": norm}, {"x": WindowStore.normalised(flat, norm)}


class TrajectoryFamily(Family):
    kind = "trajectory"
    config_cls = TrajectoryConfig

    def build(self, info: DatasetInfo, cfg: TrajectoryConfig) -> nn.Module:
        return TrajectoryDiffusion(layout_of(info), cfg)

    def prepare(self, ds: Dataset, cfg: TrajectoryConfig) -> tuple[dict[str, Normaliser], Data]:
        return window_data(ds, cfg.horizon, cfg.stride, cfg.step_scale)

    def sample(self, gen: LoadedGenerator, source: Dataset, n: int, opts: SampleOptions) -> list[Episode]:
        cfg: TrajectoryConfig = gen.model.cfg  # type: ignore[assignment]
        layout, norm = gen.layout, gen.norms["tokens"]
        used = used_settings(gen, opts)

        def chunk(first: int) -> list[Episode]:
            x = diffuse(
                gen,
                (CHUNKS[self.kind], cfg.horizon, layout.dim),
                first,
                opts,
                used["steps"],
                cfg.edm,
                used["churn"],
                polish=used["polish"],
            )
            raw = norm.denormalise(x).cpu().numpy()
            return decode_windows(layout, raw)

        return collect(n, CHUNKS[self.kind], chunk)


class TransitionFamily(Family):
    kind = "transition"
    config_cls = TransitionConfig

    def build(self, info: DatasetInfo, cfg: TransitionConfig) -> nn.Module:
        return TransitionDiffusion(layout_of(info), cfg)

    def prepare(
        self, ds: Dataset, cfg: TransitionConfig
    ) -> tuple[dict[str, Normaliser], dict[str, torch.Tensor]]:
        f = transition_features(layout_of(ds.info), ds.transitions)
        norm = Normaliser.fit(f)
        # In place (the raw features are not needed again): the same float32 operations as normalise().
        x = torch.from_numpy(f).sub_(torch.as_tensor(norm.mean)).div_(torch.as_tensor(norm.std))
        return {"features": norm}, {"x": x}

    def sample(self, gen: LoadedGenerator, source: Dataset, n: int, opts: SampleOptions) -> list[Episode]:
        cfg: TransitionConfig = gen.model.cfg  # type: ignore[assignment]
        model: TransitionDiffusion = gen.model  # type: ignore[assignment]
        norm = gen.norms["features"]
        used = used_settings(gen, opts)

        def chunk(first: int) -> list[Episode]:
            x = diffuse(
                gen,
                (CHUNKS[self.kind], model.dim),
                first,
                opts,
                used["steps"],
                cfg.edm,
                used["churn"],
                polish=used["polish"],
            )
            return decode_transitions(gen.layout, norm.denormalise(x).cpu().numpy())

        return collect(n, CHUNKS[self.kind], chunk)


class AutoregressiveFamily(Family):
    kind = "autoregressive"
    config_cls = AutoregressiveConfig

    def build(self, info: DatasetInfo, cfg: AutoregressiveConfig) -> nn.Module:
        return Drafter(layout_of(info), cfg)

    def prepare(self, ds: Dataset, cfg: AutoregressiveConfig) -> tuple[dict[str, Normaliser], Data]:
        return window_data(ds, cfg.horizon, cfg.stride)

    def sample(self, gen: LoadedGenerator, source: Dataset, n: int, opts: SampleOptions) -> list[Episode]:
        cfg: AutoregressiveConfig = gen.model.cfg  # type: ignore[assignment]
        drafter: Drafter = gen.model  # type: ignore[assignment]
        layout, norm = gen.layout, gen.norms["tokens"]
        used = used_settings(gen, opts)
        sigma_start, temperature, steps = used["sigma_start"], used["temperature"], used["steps"]
        # Resolved by the caller (:func:`generators.api.sample`): a family samples, it does not load models.
        refiner = opts.refiner
        if sigma_start > 0 and refiner is None:
            raise RlsynthError(
                "refinement needs a trajectory-diffusion model: pass --refiner DIR "
                "(or --sigma-start 0 for raw drafts)"
            )
        if refiner is not None:
            rcfg: TrajectoryConfig = refiner.model.cfg  # type: ignore[assignment]
            if refiner.kind != "trajectory" or rcfg.horizon != cfg.horizon or refiner.info != gen.info:
                raise RlsynthError(
                    f"refiner {refiner.folder} is not a trajectory model of the same spaces and "
                    f"horizon {cfg.horizon}"
                )
        t = source.transitions
        tilt = opts.guidance.bind_draft(codec(gen)) if opts.guidance is not None else None

        def chunk(first: int) -> list[Episode]:
            seeds = sample_seeds(opts.seed, first, CHUNKS[self.kind])
            # Sample i's start row and its draft noise both come from its own seed (split-independent).
            rows = (seeds % np.uint64(len(t))).astype(np.int64)
            start_raw = torch.from_numpy(start_tokens(layout, t, rows)).to(gen.device)
            noise = PerSampleNoise(seeds.tolist(), gen.device)
            raw = norm.denormalise(drafter.draft(norm.normalise(start_raw), noise, temperature, tilt))
            raw[:, 0] = start_raw  # exactly the real start, not its normalised round trip
            if sigma_start > 0 and refiner is not None:
                rnorm = refiner.norms["tokens"]
                x = diffuse(
                    refiner,
                    tuple(raw.shape),
                    first,
                    replace(opts, seed=opts.seed + 1),
                    steps,
                    rcfg.edm,
                    used["churn"],
                    x_init=rnorm.normalise(raw),
                    sigma_start=sigma_start,
                    condition=inpaint_first(rnorm.normalise(start_raw)),
                    polish=used["polish"],
                )
                raw = rnorm.denormalise(x)
                raw[:, 0] = start_raw
            return decode_windows(layout, raw.cpu().numpy())

        return collect(n, CHUNKS[self.kind], chunk)


class WorldModelFamily(Family):
    kind = "world-model"
    config_cls = WorldModelConfig

    def build(self, info: DatasetInfo, cfg: WorldModelConfig) -> nn.Module:
        return WorldModel(info.observation_space.dim, info.action_space.dim, cfg)

    def prepare(
        self, ds: Dataset, cfg: WorldModelConfig
    ) -> tuple[dict[str, Normaliser], dict[str, torch.Tensor]]:
        norms = WorldModelNormalisers.fit(ds.transitions)
        return norms.as_map(), training_tensors(ds.transitions, norms)

    def finish(self, model: nn.Module, data: Data, train_cfg: TrainConfig, out: Path) -> None:
        assert isinstance(model, WorldModel)
        _, val_idx = split(len(data["x"]), train_cfg.val_fraction, train_cfg.seed)
        device = next(model.parameters()).device
        x, y = rows_of(data["x"], val_idx), rows_of(data["y"], val_idx)
        model.select_elites(x.to(device), y.to(device))
        write_tensors(out / "model.safetensors", model.state_dict())

    def sample(self, gen: LoadedGenerator, source: Dataset, n: int, opts: SampleOptions) -> list[Episode]:
        norms = WorldModelNormalisers.from_map(gen.norms)
        assert isinstance(gen.model, WorldModel)
        return sample_world_model(
            gen.model,
            norms,
            source,
            n,
            seed=opts.seed,
            horizon=opts.horizon,
            policy=opts.policy,
        )


FAMILIES: dict[str, Family] = {
    f.kind: f for f in (TrajectoryFamily(), TransitionFamily(), AutoregressiveFamily(), WorldModelFamily())
}
