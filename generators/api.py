"""Train, load and sample generators by kind; what the CLI and the pipeline call.

A trained generator is a folder (see :mod:`generators.checkpoint`): ``config.json`` (kind, model and
training config, the source dataset and its lineage entry), ``normaliser.json``, ``model.safetensors``,
the resumable training state, ``train.json`` (loss history, timings) and ``loss.png``.

Every family samples in fixed chunks whose randomness depends on (seed, sample index) only, so a sample
does not depend on how a caller splits the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset, DatasetInfo, Episode, episodes_to_transitions
from rlsynth.datasets.validation import validate_episodes
from rlsynth.generators.autoregressive import AutoregressiveConfig, Drafter, DraftTilt
from rlsynth.generators.checkpoint import (
    CheckpointError,
    Normaliser,
    checkpoint_hash,
    read_json,
    read_tensors,
    specs_of,
    write_json,
    write_tensors,
)
from rlsynth.generators.diffusion import (
    TrajectoryConfig,
    TrajectoryDiffusion,
    TransitionConfig,
    TransitionDiffusion,
    decode_transitions,
    transition_features,
)
from rlsynth.generators.edm import Churn, Denoiser, EDMConfig, PerSampleNoise, Polish, generate, schedule
from rlsynth.generators.options import SamplerSettings
from rlsynth.generators.tokens import (
    TokenCodec,
    TokenLayout,
    WindowStore,
    decode_windows,
    flat_tokens,
    start_tokens,
    step_scales,
    window_normaliser,
)
from rlsynth.generators.training import (
    STATE_JSON,
    Data,
    TrainConfig,
    TrainResult,
    check_resumable,
    resolve_device,
    rows_of,
    split,
    train,
)
from rlsynth.generators.world_model import (
    ActionFn,
    WorldModel,
    WorldModelConfig,
    WorldModelNormalisers,
    check_elites,
    sample_world_model,
    training_tensors,
)

KINDS = ("trajectory", "transition", "autoregressive", "world-model")
# Samples per chunk of work, per family: big enough to keep the network busy. Fixed, so that a sample's
# randomness and its batch never depend on how a caller splits a request.
CHUNKS = {"trajectory": 256, "transition": 4096, "autoregressive": 1024}


@dataclass(frozen=True, kw_only=True)
class SampleOptions(SamplerSettings):
    """:class:`~generators.options.SamplerSettings` bound to one call: its seed and the objects a family may
    use (the settings are declared, with their defaults and docs, in :mod:`generators.options`)."""

    seed: int = 0
    policy: ActionFn | None = None
    """World model: actions from this policy instead of the data's."""
    refiner: LoadedGenerator | None = None
    """Autoregressive: the trajectory-diffusion model that refines drafts."""
    guidance: Guide | None = None
    """Diffusion families: guidance bound to the sample space; it wraps the denoiser, the sampler is
    unchanged. Autoregressive: tilts every drafted token (``Guide.bind_draft``) and guides the refinement
    steps as it guides diffusion (under the pgd schedule a single refinement step has weight 0)."""

    @classmethod
    def of(
        cls,
        settings: SamplerSettings,
        *,
        seed: int = 0,
        policy: ActionFn | None = None,
        refiner: LoadedGenerator | None = None,
        guidance: Guide | None = None,
    ) -> SampleOptions:
        """``settings`` with a call's seed and bound objects."""
        values = asdict(settings.settings())
        return cls(**values, seed=seed, policy=policy, refiner=refiner, guidance=guidance)


class Guide(Protocol):
    """What :class:`guidance.terms.Guidance` offers: a denoiser wrapper for one sample space and σ
    schedule (generators never import guidance)."""

    def bind(self, codec: TokenCodec) -> Callable[[Denoiser, torch.Tensor], Denoiser]: ...

    def bind_draft(self, codec: TokenCodec) -> DraftTilt: ...


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


@dataclass
class LoadedGenerator:
    kind: str
    folder: Path
    config: dict[str, Any]
    model: nn.Module
    norms: dict[str, Normaliser]
    info: DatasetInfo

    @property
    def checkpoint_hash(self) -> str:
        return checkpoint_hash(self.folder)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.for_spaces(self.info.observation_space, self.info.action_space)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


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


def _layout(info: DatasetInfo) -> TokenLayout:
    return TokenLayout.for_spaces(info.observation_space, info.action_space)


def _window_data(
    ds: Dataset, horizon: int, stride: int, step_scale: float = 0.0
) -> tuple[dict[str, Normaliser], Data]:
    """Normalised H-step windows as a :class:`WindowStore`: each token held once, so memory grows with
    the transitions, not with H times them; the statistics are those of all windows' tokens."""
    layout = _layout(ds.info)
    flat = flat_tokens(layout, ds.transitions, horizon, stride)
    if len(flat.starts) < 2:
        raise RlsynthError(f"{ds.source} has fewer than 2 windows of {horizon} steps; lower the horizon")
    norm = window_normaliser(flat)
    if step_scale:
        norm = replace(norm, std=step_scales(layout, norm.std, ds.transitions, step_scale))
    return {"tokens": norm}, {"x": WindowStore.normalised(flat, norm)}


def codec(gen: LoadedGenerator) -> TokenCodec:
    """How guidance reads this generator's normalised samples."""
    if gen.kind == "transition":
        n = gen.norms["features"]
        return TokenCodec(gen.layout, n.mean, n.std, "transition")
    if gen.kind in ("trajectory", "autoregressive"):
        n = gen.norms["tokens"]
        return TokenCodec(gen.layout, n.mean, n.std, "window")
    raise RlsynthError(
        f"{gen.kind} rollouts are not diffused, so they cannot be guided (steer them by a policy)"
    )


def _diffuse(
    gen: LoadedGenerator,
    shape: tuple[int, ...],
    first: int,
    opts: SampleOptions,
    steps: int,
    edm: EDMConfig,
    s_churn: float,
    x_init: torch.Tensor | None = None,
    sigma_start: float | None = None,
    condition: Callable[[Denoiser], Denoiser] | None = None,
    polish: int = 0,
) -> torch.Tensor:
    """Run the EDM sampler for samples first..first+B-1 (normalised space).

    ``condition`` wraps the raw denoiser first (inpainting); guidance wraps the result.
    """
    noise = PerSampleNoise(sample_seeds(opts.seed, first, shape[0]).tolist(), gen.device)
    denoiser: Denoiser = gen.model.denoiser  # type: ignore[assignment]
    if condition is not None:
        denoiser = condition(denoiser)
    if opts.guidance is not None:
        sigmas = schedule(steps, edm, sigma_start if x_init is not None else None)
        denoiser = opts.guidance.bind(codec(gen))(denoiser, sigmas)
    with torch.no_grad():
        return generate(
            denoiser,
            shape,
            steps,
            edm,
            noise,
            x_init=x_init,
            sigma_start=sigma_start,
            churn=Churn(s_churn=s_churn),
            polishing=Polish(polish),
        )


def _collect(n: int, chunk: int, make_chunk: Callable[[int], list[Episode]]) -> list[Episode]:
    """Call ``make_chunk(first_index)`` for consecutive chunks of ``chunk`` samples until n transitions."""
    episodes: list[Episode] = []
    total, first, empty = 0, 0, 0
    while total < n:
        got = make_chunk(first)
        empty = 0 if got else empty + 1
        if empty >= 10:
            raise RlsynthError("the generator produces no usable transitions (10 chunks in a row)")
        episodes.extend(got)
        total += sum(e.length for e in got)
        first += chunk
    return episodes


def _inpaint_first(known: torch.Tensor) -> Callable[[Denoiser], Denoiser]:
    """Condition on the first token: the denoiser's estimate of it is replaced by the known value."""

    def wrap(denoiser: Denoiser) -> Denoiser:
        def inpainted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            x0 = denoiser(x, sigma).clone()
            x0[:, 0] = known
            return x0

        return inpainted

    return wrap


class TrajectoryFamily(Family):
    kind = "trajectory"
    config_cls = TrajectoryConfig

    def build(self, info: DatasetInfo, cfg: TrajectoryConfig) -> nn.Module:
        return TrajectoryDiffusion(_layout(info), cfg)

    def prepare(self, ds: Dataset, cfg: TrajectoryConfig) -> tuple[dict[str, Normaliser], Data]:
        return _window_data(ds, cfg.horizon, cfg.stride, cfg.step_scale)

    def sample(self, gen: LoadedGenerator, source: Dataset, n: int, opts: SampleOptions) -> list[Episode]:
        cfg: TrajectoryConfig = gen.model.cfg  # type: ignore[assignment]
        layout, norm = gen.layout, gen.norms["tokens"]
        used = used_settings(gen, opts)

        def chunk(first: int) -> list[Episode]:
            x = _diffuse(
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

        return _collect(n, CHUNKS[self.kind], chunk)


class TransitionFamily(Family):
    kind = "transition"
    config_cls = TransitionConfig

    def build(self, info: DatasetInfo, cfg: TransitionConfig) -> nn.Module:
        return TransitionDiffusion(_layout(info), cfg)

    def prepare(
        self, ds: Dataset, cfg: TransitionConfig
    ) -> tuple[dict[str, Normaliser], dict[str, torch.Tensor]]:
        f = transition_features(_layout(ds.info), ds.transitions)
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
            x = _diffuse(
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

        return _collect(n, CHUNKS[self.kind], chunk)


class AutoregressiveFamily(Family):
    kind = "autoregressive"
    config_cls = AutoregressiveConfig

    def build(self, info: DatasetInfo, cfg: AutoregressiveConfig) -> nn.Module:
        return Drafter(_layout(info), cfg)

    def prepare(self, ds: Dataset, cfg: AutoregressiveConfig) -> tuple[dict[str, Normaliser], Data]:
        return _window_data(ds, cfg.horizon, cfg.stride)

    def sample(self, gen: LoadedGenerator, source: Dataset, n: int, opts: SampleOptions) -> list[Episode]:
        cfg: AutoregressiveConfig = gen.model.cfg  # type: ignore[assignment]
        drafter: Drafter = gen.model  # type: ignore[assignment]
        layout, norm = gen.layout, gen.norms["tokens"]
        used = used_settings(gen, opts)
        sigma_start, temperature, steps = used["sigma_start"], used["temperature"], used["steps"]
        refiner = refiner_for(gen, opts) if sigma_start > 0 else opts.refiner
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
                x = _diffuse(
                    refiner,
                    tuple(raw.shape),
                    first,
                    replace(opts, seed=opts.seed + 1),
                    steps,
                    rcfg.edm,
                    used["churn"],
                    x_init=rnorm.normalise(raw),
                    sigma_start=sigma_start,
                    condition=_inpaint_first(rnorm.normalise(start_raw)),
                    polish=used["polish"],
                )
                raw = rnorm.denormalise(x)
                raw[:, 0] = start_raw
            return decode_windows(layout, raw.cpu().numpy())

        return _collect(n, CHUNKS[self.kind], chunk)


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

PRESETS: dict[str, dict[str, tuple[Any, TrainConfig]]] = {
    "trajectory": {
        # A fixed step count, so the same seed gives the same weights on every machine. Sized to ≤ 15 min
        # on the slower 2-core machines: 0.19 s per step there (planned by a 14-minute budget run), so
        # 4,000 steps take about 13 min with data preparation and validation. The model is under-trained
        # at this count (BENCHMARKS.md); ``--steps N`` or ``--budget-minutes M`` trains longer.
        "cpu-small": (
            TrajectoryConfig(channels=(32, 64), emb=64, stride=1),
            TrainConfig(
                steps=4_000,
                batch_size=128,
                lr=1e-3,
                weight_decay=1e-4,
                warmup_steps=500,
                ema_decay=0.999,
                eval_every=1000,
                checkpoint_every=1000,
            ),
        ),
        # Janner et al.'s temporal U-Net widths (dim 128, mults 1-2-4), trained as policy-guided diffusion.
        "gpu-paper": (
            TrajectoryConfig(channels=(128, 256, 512), emb=128),
            TrainConfig(
                steps=250_000,
                batch_size=256,
                lr=2e-4,
                weight_decay=1e-4,
                warmup_steps=2000,
                ema_decay=0.9995,
                eval_every=5000,
                checkpoint_every=10_000,
            ),
        ),
    },
    "transition": {
        "cpu-small": (
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
        ),
        # SynthER: residual MLP width 1024, depth 6, 100k steps of batch 256 at lr 3e-4.
        "gpu-paper": (
            TransitionConfig(width=1024, depth=6, emb=128),
            TrainConfig(
                steps=100_000,
                batch_size=256,
                lr=3e-4,
                weight_decay=0.0,
                warmup_steps=1000,
                ema_decay=0.999,
                eval_every=5000,
                checkpoint_every=10_000,
            ),
        ),
    },
    "autoregressive": {
        "cpu-small": (
            # Drafting speed is the point of the drafter, so the arithmetic per drafted token is cut where
            # the error allowed it (HalfCheetah medium-replay, BENCHMARKS.md): one key/value head
            # (multi-query attention, 1.28× faster than 4 at the same refined error) and MLPs of
            # twice the width, not four (the MLP was three quarters of a step), in 2 blocks, not 3. Like
            # the trajectory preset it is a fixed step count sized to ≤ 15 min on the slower 2-core
            # machines (0.074 s per step there, planned by a 14-minute budget run).
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
        ),
        "gpu-paper": (
            AutoregressiveConfig(width=256, depth=6, heads=8),
            TrainConfig(
                steps=100_000,
                batch_size=256,
                lr=3e-4,
                weight_decay=1e-4,
                warmup_steps=2000,
                ema_decay=0.999,
                eval_every=5000,
                checkpoint_every=10_000,
            ),
        ),
    },
    "world-model": {
        # A usable model of a 100k-transition dataset in a few minutes on 2 CPU cores.
        "cpu-small": (
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
        ),
        # MOPO's sizes: 7 members, 5 elites, 4 hidden layers of 200.
        "gpu-paper": (
            WorldModelConfig(ensemble=7, elites=5, hidden=200, layers=4),
            TrainConfig(
                steps=100_000,
                batch_size=256,
                lr=1e-3,
                weight_decay=5e-5,
                warmup_steps=1000,
                ema_decay=0.0,
                eval_every=2000,
                checkpoint_every=5000,
            ),
        ),
    },
}


BUDGET_CAP_FACTOR = 10
"""A budgeted run plans at most this many times its preset's fixed steps unless given a cap."""


def preset(kind: str, name: str) -> tuple[Any, TrainConfig]:
    if kind not in PRESETS:
        raise RlsynthError(f"unknown generator kind '{kind}' (kinds: {', '.join(KINDS)})")
    if name not in PRESETS[kind]:
        raise RlsynthError(f"unknown preset '{name}' for {kind} (presets: {', '.join(PRESETS[kind])})")
    return PRESETS[kind][name]


def train_generator(
    kind: str,
    dataset: Dataset,
    out: Path,
    *,
    preset_name: str = "cpu-small",
    steps: int | None = None,
    budget_s: float | None = None,
    seed: int | None = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    refiner: Path | None = None,
) -> TrainResult:
    """Train ``kind`` on ``dataset`` into ``out`` (resuming if ``out`` holds a run of the same config);
    ``refiner`` is recorded as the drafter's default refiner. A failed run leaves no ``out`` behind
    (:func:`training_folder`).

    A preset trains its fixed step count (``steps`` replaces it). ``budget_s`` instead plans the steps that
    fit that many wall-clock seconds on this machine, with ``steps`` (default: ``BUDGET_CAP_FACTOR`` × the
    preset's) as the cap: more training where the machine allows, at the price of machine-dependent weights.
    """
    model_cfg, train_cfg = preset(kind, preset_name)
    family = FAMILIES[kind]
    model_cfg = replace(model_cfg, **(model_overrides or {}))
    train_cfg = replace(train_cfg, progress=progress, **(train_overrides or {}))
    if budget_s is not None:
        train_cfg = replace(train_cfg, steps=steps or BUDGET_CAP_FACTOR * train_cfg.steps, budget_s=budget_s)
    elif steps is not None:
        train_cfg = replace(train_cfg, steps=steps, budget_s=None)
    if seed is not None:
        train_cfg = replace(train_cfg, seed=seed)
    out = Path(out)
    # Data is prepared before anything is written: data the family cannot use leaves no folder behind.
    norms, data = family.prepare(dataset, model_cfg)
    config = {
        "kind": kind,
        "preset": preset_name,
        "model": asdict(model_cfg),
        "train": asdict(train_cfg),
        "data": {
            "info": dataset.info.to_json(),
            "source": source or {"source": dataset.source},
            "transitions": dataset.n_transitions,
        },
    }
    fingerprint = {"kind": kind, "model": asdict(model_cfg), "data": config["data"]}
    with training_folder(out) as work:
        existing = work / "config.json"
        if existing.exists() and read_json(existing).get("data") != config["data"]:
            raise CheckpointError(f"{work}: holds a generator trained on other data; use a new --out folder")
        # Refuse a resume of another configuration before config.json is rewritten (train() checks too late).
        check_resumable(work, train_cfg, fingerprint)
        write_json(work / "config.json", config)
        write_json(work / "normaliser.json", {k: v.to_json() for k, v in norms.items()})
        torch.manual_seed(train_cfg.seed)
        model = family.build(dataset.info, model_cfg)
        result = train(model, data, train_cfg, work, fingerprint=fingerprint, desc=f"train {kind}")
        family.finish(model, data, train_cfg, work)
        if refiner is not None:
            record_refiner(work, refiner)
        write_json(work / "train.json", asdict(result))
        _plot_history(result, work / "loss.png", kind)
    return result


STAGING_SUFFIX = ".partial"


def staging_folder(out: Path) -> Path:
    """Where a fresh run into ``out`` trains until it succeeds: a hidden sibling, so the rename into
    place stays on one file system."""
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


@contextlib.contextmanager
def training_folder(out: Path) -> Iterator[Path]:
    """The folder a training run writes into, so that a failed run leaves no half-made ``out``.

    ``out`` holding files is a run to resume (or refuse): written in place, as before. Otherwise the run
    writes into :func:`staging_folder` and renames it to ``out`` on success. Ctrl-C (or SIGTERM, handled
    as Ctrl-C) saves a resumable state; that folder is renamed into place too, so the same command
    resumes. Any other failure removes what this run created; a staging folder left by a killed process
    is resumed from by the next run into the same ``out``.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        yield out
        return
    staging = staging_folder(out)
    made = _make_folders(staging)
    try:
        yield staging
    except KeyboardInterrupt:
        if (staging / STATE_JSON).exists():
            _move_into_place(staging, out)
        else:
            _remove_made(made)
        raise
    except BaseException:
        _remove_made(made)
        raise
    _move_into_place(staging, out)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones created, innermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_made(made: list[Path]) -> None:
    if made:
        shutil.rmtree(made[0], ignore_errors=True)
    for p in made[1:]:
        with contextlib.suppress(OSError):
            p.rmdir()  # only if still empty: another process may have written beside us


def _move_into_place(staging: Path, out: Path) -> None:
    try:
        os.rename(staging, out)  # replaces an empty ``out`` folder; a non-empty one is an error
    except OSError as e:
        raise CheckpointError(
            f"{out}: cannot move the trained generator into place ({e.strerror}); it is in {staging}"
        ) from None


def _plot_history(result: TrainResult, path: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result.history:
        return
    steps = [h["step"] for h in result.history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in result.history], label="train loss")
    ax.plot(steps, [h["val_loss"] for h in result.history], label="validation loss")
    ax.set_xlabel("step")
    ax.set_title(f"{kind} training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Upper bounds on a checkpoint's architecture sizes, far above any preset (gpu-paper's largest width is
# 1024): a config.json is untrusted, and these keep even building a meta-device skeleton cheap.
SIZE_LIMITS = {
    "horizon": 1024, "width": 8192, "depth": 64, "emb": 4096, "heads": 64, "kv_heads": 64,
    "mlp_ratio": 16, "stride": 1024, "sample_steps": 10_000, "refine_steps": 1000, "ensemble": 100,
    "elites": 100, "hidden": 8192, "layers": 64, "channels": 8192, "polish": 10_000,
}  # fmt: skip
# Settings where 0 means "none" (no refinement steps, no polishing) rather than an empty model.
MAY_BE_ZERO = frozenset({"refine_steps", "polish"})
MAX_CHANNEL_LEVELS = 8
SIGNED_FLOATS = frozenset({"p_mean"})
"""Float settings that may be negative (log σ's mean); every other one is a non-negative scale."""


def _check_number(name: str, v: Any, hint: Any, where: Path) -> None:
    """One model-config value against its declared type and bound."""
    bad = f"{where}: model setting {name}={str(v)[:40]}"
    name = name.rsplit(".", 1)[-1]
    if hint is float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise CheckpointError(f"{bad} is not a finite number")
        if v < 0 and name not in SIGNED_FLOATS:
            raise CheckpointError(f"{bad} must not be negative")
        return
    if v is None and hint == (int | None):
        return
    limit = SIZE_LIMITS.get(name, 1_000_000)
    lowest = 0 if name in MAY_BE_ZERO else 1
    if type(v) is not int or not lowest <= v <= limit:
        raise CheckpointError(f"{bad} must be an integer in [{lowest}, {limit}]")


def _check_fields(cls: Any, d: Any, where: Path, prefix: str = "") -> None:
    """Every field of ``d`` is one of ``cls``'s, of its type and within :data:`SIZE_LIMITS` (nested
    dataclasses are checked the same way), before anything is built from it."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: model config {prefix or 'model'} is not a JSON object")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise CheckpointError(f"{where}: unknown model setting {prefix}{unknown[0][:40]}")
    for name, v in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            _check_fields(hint, v, where, f"{prefix}{name}.")
        elif typing.get_origin(hint) is tuple:
            if not isinstance(v, list) or not 1 <= len(v) <= MAX_CHANNEL_LEVELS:
                raise CheckpointError(
                    f"{where}: model setting {name} must be a list of 1-{MAX_CHANNEL_LEVELS} sizes"
                )
            for x in v:
                _check_number(name, x, int, where)
        else:
            _check_number(f"{prefix}{name}", v, hint, where)


def _model_config(family: Family, d: Any, where: Path) -> Any:
    _check_fields(family.config_cls, d, where)
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


def _checkpoint_info(config: Any, where: Path) -> DatasetInfo:
    """The data description a checkpoint records (its env id checked: gymnasium would import a
    ``module:Name`` id); each failure is one line naming the file."""
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("info"), dict):
        raise CheckpointError(f"{where}: no data.info (not an rlsynth generator config)")
    if not isinstance(data.get("source", {}), dict):
        raise CheckpointError(f"{where}: data.source is not a JSON object")
    try:
        return DatasetInfo.from_json(data["info"])
    except RlsynthError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: data.info is malformed ({type(e).__name__}: {e})") from None


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
    return {"tokens": _layout(info).dim}


def _read_norms(path: Path, dims: dict[str, int]) -> dict[str, Normaliser]:
    stats = read_json(path)
    if not isinstance(stats, dict) or set(stats) != set(dims):
        raise CheckpointError(f"{path}: expected normalisers {sorted(dims)}")
    return {k: Normaliser.from_json(stats[k], dims[k], f"{path} [{k}]") for k in dims}


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
    info = _checkpoint_info(config, where)
    cfg = _model_config(family, config.get("model"), where)
    skeleton = _skeleton(family, info, cfg, where)
    norms = _read_norms(f / "normaliser.json", _norm_dims(kind, info, skeleton))
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


def training_lineage(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """How long the model trained: its step count, and the wall-clock budget that planned it if any (a
    budgeted run's steps depend on the machine it ran on, so a version made from it says so)."""
    train = config.get("train", {})
    state = folder / STATE_JSON
    trained = read_json(state).get("step") if state.is_file() else None
    return {
        "steps": trained if trained is not None else train.get("steps"),
        "budget_s": train.get("budget_s"),
    }


def generator_lineage(gen: LoadedGenerator, refiner: LoadedGenerator | None = None) -> dict[str, Any]:
    """What a sampled version records about the model(s) it came from."""
    out: dict[str, Any] = {
        "kind": gen.kind,
        "folder": str(gen.folder.resolve()),
        "checkpoint_hash": gen.checkpoint_hash,
        "preset": gen.config.get("preset"),
        "training": training_lineage(gen.folder, gen.config),
    }
    if refiner is not None:
        out["refiner"] = {"folder": str(refiner.folder.resolve()), "checkpoint_hash": refiner.checkpoint_hash}
    return out


def _finite_non_negative(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise RlsynthError(f"{name} must be a finite non-negative number, got {value}")
    return value


def _polish_steps(opts: SampleOptions, default: int) -> int:
    n = default if opts.polish is None else opts.polish
    if n < 0:
        raise RlsynthError(f"polish must be a non-negative number of iterations, got {n}")
    return n


def used_settings(gen: LoadedGenerator, opts: SampleOptions) -> dict[str, Any]:
    """The sampler settings ``sample`` uses for ``gen`` with ``opts``, defaults resolved from the model's
    config (the one place they are resolved: the families sample with these and lineage records them)."""
    cfg = gen.model.cfg
    if isinstance(cfg, TrajectoryConfig | TransitionConfig):
        churn = cfg.s_churn if opts.churn is None else opts.churn
        return {
            "steps": opts.steps or cfg.sample_steps,
            "churn": _finite_non_negative("churn", churn),
            "polish": _polish_steps(opts, cfg.polish),
        }
    if isinstance(cfg, AutoregressiveConfig):
        temperature = cfg.temperature if opts.temperature is None else opts.temperature
        sigma_start = cfg.sigma_start if opts.sigma_start is None else opts.sigma_start
        if opts.polish and sigma_start == 0:
            raise RlsynthError("polish applies to refined drafts; raw drafts (sigma_start 0) are not refined")
        return {
            "steps": opts.steps or cfg.refine_steps,
            "sigma_start": _finite_non_negative("sigma_start", sigma_start),
            "temperature": _finite_non_negative("temperature", temperature),
            "churn": _finite_non_negative("churn", opts.churn or 0.0),
            "polish": _polish_steps(opts, cfg.polish if sigma_start else 0),
        }
    return {"horizon": opts.horizon}


def sample(
    gen: LoadedGenerator, source: Dataset, n_transitions: int, opts: SampleOptions | None = None
) -> Dataset:
    """Exactly ``n_transitions`` validated transitions from ``gen`` (``source`` gives start states)."""
    o = opts or SampleOptions()
    if n_transitions < 1:
        raise RlsynthError(f"n_transitions must be positive, got {n_transitions}")
    if (
        source.info.observation_space != gen.info.observation_space
        or source.info.action_space != gen.info.action_space
    ):
        raise RlsynthError(f"{source.source} has other spaces than the generator's training data")
    if o.guidance is not None and gen.kind == "world-model":
        raise RlsynthError("world-model rollouts are steered by --policy (the agent acts), not by guidance")
    episodes = trim(FAMILIES[gen.kind].sample(gen, source, n_transitions, o), n_transitions)
    validate_episodes(episodes, gen.info, f"{gen.kind} samples")
    return Dataset(info=gen.info, transitions=episodes_to_transitions(episodes), source=f"{gen.kind} samples")


def trim(episodes: list[Episode], n: int) -> list[Episode]:
    """The first episodes holding exactly n transitions; the last one cut short ends truncated."""
    out, total = [], 0
    for e in episodes:
        if total + e.length <= n:
            out.append(e)
            total += e.length
        else:
            k = n - total
            out.append(
                Episode.ending(e.observations[: k + 1], e.actions[:k], e.rewards[:k], terminated=False)
            )
            total = n
        if total == n:
            break
    return out
