"""What a family samples with: the loaded generator, one call's options, the guidance protocol, and the
shared steps of diffusion sampling (the EDM sampler over per-sample noise, chunked collection, trimming)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import DatasetInfo, Transitions
from rlsynth.generators.autoregressive import AutoregressiveConfig, DraftTilt
from rlsynth.generators.checkpoint import Normaliser, checkpoint_hash
from rlsynth.generators.diffusion import TrajectoryConfig, TransitionConfig
from rlsynth.generators.edm import Churn, Denoiser, EDMConfig, PerSampleNoise, Polish, generate, schedule
from rlsynth.generators.options import SamplerSettings
from rlsynth.generators.seeds import sample_seeds
from rlsynth.generators.tokens import TokenCodec, TokenLayout
from rlsynth.generators.world_model import ActionFn

# Samples per chunk of work, per family: big enough to keep the network busy. Fixed, so that a sample's
# randomness and its batch never depend on how a caller splits a request: the trajectory U-Net's CPU
# convolutions give last-bit differences with the batch size, so a chunk sized to the request would make a
# small request's samples differ from the same samples in a larger or split one.
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


@dataclass
class LoadedGenerator:
    """A trained generator in memory (:func:`generators.loading.load_generator`): its kind and folder, the
    recorded config, the model in eval mode, its normalisers and the data description it was trained on."""

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


def diffuse(
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


@dataclass(frozen=True)
class Drawn:
    """A family's samples: their episodes as one columnar block (ids 0..K−1 in order, each episode's rows
    contiguous and in step order: what ``episodes_to_transitions`` makes of a list), and (when kept) the raw
    sample each episode was decoded from, row i of ``samples`` for episode i (windows (M, H, D) or
    transition features (M, F))."""

    transitions: Transitions
    samples: np.ndarray | None = None


MakeChunk = Callable[[int, int, "np.ndarray | None"], np.ndarray]
"""``make(first, size, starts)`` -> raw samples first..first+size−1: warm-started from ``starts`` (raw,
(size, ...)) or, when None, from noise."""

Decode = Callable[[np.ndarray], tuple[Transitions, np.ndarray]]
"""Raw samples -> their episodes as a columnar block (ids 0..k−1) and the indices of the samples that gave
them (episode j from sample j of the indices). Columnar, not one Python object per episode: a million
one-step episodes took a minute to build."""


def episode_count(t: Transitions) -> int:
    """Episodes in a block numbered 0..k−1 (its last row's id + 1)."""
    return int(t.episode_id[-1]) + 1 if len(t) else 0


def stack_blocks(blocks: Sequence[Transitions]) -> Transitions:
    """Blocks each numbered from 0, one after the other, as one block numbered on from block to block."""
    if not blocks:
        raise ValueError("no blocks to stack")
    offsets = np.cumsum([0, *(episode_count(b) for b in blocks[:-1])])

    def column(name: str) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in blocks])

    return Transitions(
        episode_id=np.concatenate([b.episode_id + off for b, off in zip(blocks, offsets, strict=True)]),
        **{c: column(c) for c in Transitions.columns() if c != "episode_id"},
    )


def chunks(
    n: int,
    chunk: int,
    make: MakeChunk,
    decode: Decode,
    *,
    warm: np.ndarray | None = None,
    steps_per_sample: int = 1,
    keep: bool = False,
) -> Iterator[Drawn]:
    """Samples in consecutive chunks, each chunk's episodes as it is made (numbered from 0 in each), until
    they hold exactly n (≥ 1) transitions (the last chunk :func:`trim`-med to what is still missing).

    Cold: chunks of ``chunk`` samples, fixed, so a sample's batch never depends on how a caller splits a
    request. Warm: the rows of ``warm`` first (in chunks of at most ``chunk``), then samples from noise
    sized to what is still missing (``steps_per_sample`` transitions each), not rounded up to a chunk.
    """
    if n < 1:
        raise ValueError(f"chunks needs a positive transition count, got {n}")
    total, first, empty = 0, 0, 0
    m = 0 if warm is None else len(warm)
    while total < n:
        if first < m:
            assert warm is not None
            size = min(chunk, m - first)
            raw = make(first, size, warm[first : first + size])
        else:
            size = chunk if warm is None else min(chunk, -(-(n - total) // steps_per_sample))
            raw = make(first, size, None)
        got, idx = decode(raw)
        empty = 0 if len(got) else empty + 1
        if empty >= 10:
            raise RlsynthError("the generator produces no usable transitions (10 chunks in a row)")
        first += size
        if len(got):
            block = trim(Drawn(got, raw[idx] if keep else None), n - total)
            total += len(block.transitions)
            yield block


def inpaint_first(known: torch.Tensor) -> Callable[[Denoiser], Denoiser]:
    """Condition on the first token: the denoiser's estimate of it is replaced by the known value."""

    def wrap(denoiser: Denoiser) -> Denoiser:
        def inpainted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            x0 = denoiser(x, sigma).clone()
            x0[:, 0] = known
            return x0

        return inpainted

    return wrap


def _or(given: Any, model: Any) -> Any:
    """An option as given, else the model's setting. Neither needs checking here: options are checked
    against their declaration when ``SampleOptions`` is built, model settings when the checkpoint loads."""
    return model if given is None else given


def used_settings(gen: LoadedGenerator, opts: SampleOptions) -> dict[str, Any]:
    """The sampler settings ``sample`` uses for ``gen`` with ``opts``, defaults resolved from the model's
    config (the one place they are resolved: the families sample with these and lineage records them)."""
    cfg = gen.model.cfg
    if isinstance(cfg, TrajectoryConfig | TransitionConfig):
        return {
            "steps": opts.steps or cfg.sample_steps,
            "churn": _or(opts.churn, cfg.s_churn),
            "polish": _or(opts.polish, cfg.polish),
        }
    if isinstance(cfg, AutoregressiveConfig):
        sigma_start = _or(opts.sigma_start, cfg.sigma_start)
        if opts.polish and sigma_start == 0:
            raise RlsynthError("polish applies to refined drafts; raw drafts (sigma_start 0) are not refined")
        return {
            "steps": opts.steps or cfg.refine_steps,
            "sigma_start": sigma_start,
            "temperature": _or(opts.temperature, cfg.temperature),
            "churn": opts.churn or 0.0,
            "polish": _or(opts.polish, cfg.polish if sigma_start else 0),
        }
    return {"horizon": opts.horizon}


def trim(drawn: Drawn, n: int) -> Drawn:
    """The first episodes holding exactly n transitions (the last one cut short ends truncated), and the
    samples they came from (a cut episode's sample is kept whole)."""
    t = drawn.transitions
    n = min(n, len(t))
    head = {c: getattr(t, c)[:n] for c in Transitions.columns()}
    if 0 < n < len(t) and t.episode_id[n] == t.episode_id[n - 1]:
        # Row n−1 is no longer its episode's last: only a truncation may end the cut episode there.
        head["terminals"], head["timeouts"] = head["terminals"].copy(), head["timeouts"].copy()
        head["terminals"][-1], head["timeouts"][-1] = False, True
    out = Transitions(**head)
    return Drawn(out, None if drawn.samples is None else drawn.samples[: episode_count(out)])
