"""The four generator families, each beside its model: how to prepare its training data, build the model
and sample from it. A new family subclasses :class:`Family` and joins :data:`FAMILIES`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import (
    Dataset,
    DatasetInfo,
    Episode,
    Transitions,
    episodes_to_transitions,
    transitions_to_episodes,
)
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
from rlsynth.generators.edm import EDMConfig, PerSampleNoise
from rlsynth.generators.sampling import (
    CHUNKS,
    Drawn,
    LoadedGenerator,
    MakeChunk,
    SampleOptions,
    chunks,
    codec,
    diffuse,
    inpaint_first,
    trim,
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
from rlsynth.generators.warm import Candidate, Resample, WarmStart
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

    def chunks(
        self,
        gen: LoadedGenerator,
        source: Dataset,
        n: int,
        opts: SampleOptions,
        warm: WarmStart | None = None,
        keep: bool = False,
    ) -> Iterator[Drawn]:
        """Exactly ``n`` transitions, chunk by chunk as they are made (each chunk's episodes numbered from
        0), warm-started from ``warm`` when given; with their raw samples when ``keep``."""
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


class DiffusedFamily(Family):
    """A family whose samples are diffused tensors (windows or transition features): one sampling loop
    (:func:`generators.sampling.chunks`), cold or warm-started; each family says how to make a chunk."""

    def sample_shape(self, gen: LoadedGenerator) -> tuple[int, ...]:
        """The shape of one raw sample (what :attr:`WarmStart.samples` rows must have)."""
        raise NotImplementedError

    def steps_per_sample(self, gen: LoadedGenerator) -> int:
        raise NotImplementedError

    def maker(
        self, gen: LoadedGenerator, source: Dataset, opts: SampleOptions, warm: WarmStart | None
    ) -> MakeChunk:
        """``make(first, size, starts)``: cold samples with ``opts``' settings, or samples warm-started
        from ``starts`` with ``warm``'s noise level, steps and polish."""
        raise NotImplementedError

    def decode_block(self, gen: LoadedGenerator, raw: np.ndarray) -> tuple[Transitions, np.ndarray]:
        """Raw samples -> their episodes as one columnar block and the indices of the samples that gave
        them (:data:`generators.sampling.Decode`): what sampling uses."""
        raise NotImplementedError

    def decode(self, gen: LoadedGenerator, raw: np.ndarray) -> tuple[list[Episode], np.ndarray]:
        """The same as :meth:`decode_block`, as one ``Episode`` per sample (for per-sample measures of a
        small pilot; at a Python object per episode it is kept off the sampling path)."""
        block, idx = self.decode_block(gen, raw)
        return list(transitions_to_episodes(block)), idx

    def warm_schedule(self, gen: LoadedGenerator, opts: SampleOptions) -> tuple[EDMConfig, int]:
        """The σ schedule warm starts run on and the cold step count whose density they keep."""
        raise NotImplementedError

    def chunks(
        self,
        gen: LoadedGenerator,
        source: Dataset,
        n: int,
        opts: SampleOptions,
        warm: WarmStart | None = None,
        keep: bool = False,
    ) -> Iterator[Drawn]:
        if warm is not None:
            self.check_rows(gen, warm.samples, warm.origin or "samples")
        return chunks(
            n,
            CHUNKS[self.kind],
            self.maker(gen, source, opts, warm),
            lambda raw: self.decode_block(gen, raw),
            warm=None if warm is None else warm.samples,
            steps_per_sample=self.steps_per_sample(gen),
            keep=keep,
        )

    def check_rows(self, gen: LoadedGenerator, samples: np.ndarray, origin: str) -> None:
        """Refuse warm-start rows that are not this generator's samples, in one line."""
        if tuple(samples.shape[1:]) != self.sample_shape(gen):
            raise RlsynthError(
                f"warm start from {origin}: rows of shape {tuple(samples.shape[1:])}, this {gen.kind} "
                f"generator samples {self.sample_shape(gen)}"
            )

    def resampler(self, gen: LoadedGenerator, source: Dataset, opts: SampleOptions) -> Resample:
        """``resample(starts, candidate)``: samples warm-started from ``starts`` as ``candidate`` says
        (what :func:`generators.warm.choose` tries)."""

        def resample(starts: np.ndarray, how: Candidate) -> np.ndarray:
            w = WarmStart(starts, how.sigma_start, how.steps, how.polish)
            return self.maker(gen, source, opts, w)(0, len(starts), starts)

        return resample

    def cold_cost(self, gen: LoadedGenerator, opts: SampleOptions) -> int:
        """Denoiser evaluations per sample of a cold round (a drafter's: its refinement's, drafting aside)."""
        used = used_settings(gen, opts)
        return 2 * int(used["steps"]) - 1 + int(used["polish"])


def model_cfg(gen: LoadedGenerator) -> Any:
    """The model's config (each family knows which dataclass it is)."""
    return gen.model.cfg


def _tensor(gen: LoadedGenerator, a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(gen.device)


class WindowFamily(DiffusedFamily):
    """A family that samples H-token windows (trajectory diffusion, refined drafts): H − 1 steps each."""

    def sample_shape(self, gen: LoadedGenerator) -> tuple[int, ...]:
        return (model_cfg(gen).horizon, gen.layout.dim)

    def steps_per_sample(self, gen: LoadedGenerator) -> int:
        return int(model_cfg(gen).horizon) - 1

    def decode_block(self, gen: LoadedGenerator, raw: np.ndarray) -> tuple[Transitions, np.ndarray]:
        return decode_windows(gen.layout, raw)


class TrajectoryFamily(WindowFamily):
    kind = "trajectory"
    config_cls = TrajectoryConfig

    def build(self, info: DatasetInfo, cfg: TrajectoryConfig) -> nn.Module:
        return TrajectoryDiffusion(layout_of(info), cfg)

    def prepare(self, ds: Dataset, cfg: TrajectoryConfig) -> tuple[dict[str, Normaliser], Data]:
        return window_data(ds, cfg.horizon, cfg.stride, cfg.step_scale)

    def warm_schedule(self, gen: LoadedGenerator, opts: SampleOptions) -> tuple[EDMConfig, int]:
        return model_cfg(gen).edm, used_settings(gen, opts)["steps"]

    def maker(
        self, gen: LoadedGenerator, source: Dataset, opts: SampleOptions, warm: WarmStart | None
    ) -> MakeChunk:
        return _diffusion_maker(gen, gen.norms["tokens"], self.sample_shape(gen), opts, warm)


class TransitionFamily(DiffusedFamily):
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

    def sample_shape(self, gen: LoadedGenerator) -> tuple[int, ...]:
        return (int(gen.model.dim),)  # type: ignore[arg-type]

    def steps_per_sample(self, gen: LoadedGenerator) -> int:
        return 1

    def decode_block(self, gen: LoadedGenerator, raw: np.ndarray) -> tuple[Transitions, np.ndarray]:
        return decode_transitions(gen.layout, raw)

    def warm_schedule(self, gen: LoadedGenerator, opts: SampleOptions) -> tuple[EDMConfig, int]:
        return model_cfg(gen).edm, used_settings(gen, opts)["steps"]

    def maker(
        self, gen: LoadedGenerator, source: Dataset, opts: SampleOptions, warm: WarmStart | None
    ) -> MakeChunk:
        return _diffusion_maker(gen, gen.norms["features"], self.sample_shape(gen), opts, warm)


def _diffusion_maker(
    gen: LoadedGenerator,
    norm: Normaliser,
    shape: tuple[int, ...],
    opts: SampleOptions,
    warm: WarmStart | None,
) -> MakeChunk:
    """Chunks of a diffusion model: from noise with the resolved settings, or from ``starts`` noised to
    the warm start's σ with its steps and polish (churn as configured)."""
    cfg: Any = gen.model.cfg
    used = used_settings(gen, opts)

    def make(first: int, size: int, starts: np.ndarray | None) -> np.ndarray:
        x_init = None if starts is None else norm.normalise(_tensor(gen, starts))
        w = warm if starts is not None else None
        x = diffuse(
            gen,
            (size, *shape),
            first,
            opts,
            used["steps"] if w is None else w.steps,
            cfg.edm,
            used["churn"],
            x_init=x_init,
            sigma_start=None if w is None else w.sigma_start,
            polish=used["polish"] if w is None or w.polish is None else w.polish,
        )
        return norm.denormalise(x).cpu().numpy()

    return make


class AutoregressiveFamily(WindowFamily):
    kind = "autoregressive"
    config_cls = AutoregressiveConfig

    def build(self, info: DatasetInfo, cfg: AutoregressiveConfig) -> nn.Module:
        return Drafter(layout_of(info), cfg)

    def prepare(self, ds: Dataset, cfg: AutoregressiveConfig) -> tuple[dict[str, Normaliser], Data]:
        return window_data(ds, cfg.horizon, cfg.stride)

    def warm_schedule(self, gen: LoadedGenerator, opts: SampleOptions) -> tuple[EDMConfig, int]:
        # Warm rounds of drafts are refinements: the refiner's schedule at its own cold density.
        refiner = self._refiner(gen, opts, needed=True)
        assert refiner is not None
        return model_cfg(refiner).edm, int(model_cfg(refiner).sample_steps)

    @staticmethod
    def _refiner(gen: LoadedGenerator, opts: SampleOptions, *, needed: bool) -> LoadedGenerator | None:
        """The refiner, resolved by the caller (:func:`generators.api.sample`): a family samples, it does
        not load models."""
        cfg: AutoregressiveConfig = gen.model.cfg  # type: ignore[assignment]
        refiner = opts.refiner
        if needed and refiner is None:
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
        return refiner

    def maker(
        self, gen: LoadedGenerator, source: Dataset, opts: SampleOptions, warm: WarmStart | None
    ) -> MakeChunk:
        drafter: Drafter = gen.model  # type: ignore[assignment]
        layout, norm = gen.layout, gen.norms["tokens"]
        used = used_settings(gen, opts)
        sigma_start, temperature, steps = used["sigma_start"], used["temperature"], used["steps"]
        refiner = self._refiner(gen, opts, needed=sigma_start > 0 or warm is not None)
        t = source.transitions
        tilt = opts.guidance.bind_draft(codec(gen)) if opts.guidance is not None else None

        def refine(raw: torch.Tensor, first: int, sigma: float, k: int, polish: int) -> torch.Tensor:
            """Noise windows to σ and run the refiner k steps from there, the first (real) token kept."""
            assert refiner is not None
            rnorm, start_raw = refiner.norms["tokens"], raw[:, 0].clone()
            x = diffuse(
                refiner,
                tuple(raw.shape),
                first,
                replace(opts, seed=opts.seed + 1),
                k,
                model_cfg(refiner).edm,
                used["churn"],
                x_init=rnorm.normalise(raw),
                sigma_start=sigma,
                condition=inpaint_first(rnorm.normalise(start_raw)),
                polish=polish,
            )
            out = rnorm.denormalise(x)
            out[:, 0] = start_raw
            return out

        def make(first: int, size: int, starts: np.ndarray | None) -> np.ndarray:
            if starts is not None and warm is not None:
                polish = used["polish"] if warm.polish is None else warm.polish
                return refine(_tensor(gen, starts), first, warm.sigma_start, warm.steps, polish).cpu().numpy()
            seeds = sample_seeds(opts.seed, first, size)
            # Sample i's start row and its draft noise both come from its own seed (split-independent).
            rows = (seeds % np.uint64(len(t))).astype(np.int64)
            start_raw = torch.from_numpy(start_tokens(layout, t, rows)).to(gen.device)
            noise = PerSampleNoise(seeds.tolist(), gen.device)
            raw = norm.denormalise(drafter.draft(norm.normalise(start_raw), noise, temperature, tilt))
            raw[:, 0] = start_raw  # exactly the real start, not its normalised round trip
            if sigma_start > 0:
                raw = refine(raw, first, sigma_start, steps, used["polish"])
            return raw.cpu().numpy()

        return make


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

    def chunks(
        self,
        gen: LoadedGenerator,
        source: Dataset,
        n: int,
        opts: SampleOptions,
        warm: WarmStart | None = None,
        keep: bool = False,
    ) -> Iterator[Drawn]:
        if warm is not None or keep:
            raise RlsynthError("world-model rollouts are not diffused: they cannot be warm-started or kept")
        norms = WorldModelNormalisers.from_map(gen.norms)
        assert isinstance(gen.model, WorldModel)
        episodes = sample_world_model(
            gen.model,
            norms,
            source,
            n,
            seed=opts.seed,
            horizon=opts.horizon,
            policy=opts.policy,
        )
        # Rollouts are made all at once (one batch of start states): one chunk, cut to n.
        return iter([trim(Drawn(episodes_to_transitions(episodes)), n)])


FAMILIES: dict[str, Family] = {
    f.kind: f for f in (TrajectoryFamily(), TransitionFamily(), AutoregressiveFamily(), WorldModelFamily())
}
