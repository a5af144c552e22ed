"""Option groups: frozen dataclasses whose fields each declare one default, one help line and their bounds.

A field declared with :func:`option` is read by everything that exposes it: its own ``__post_init__``
checks (:func:`check_options`), the run config's YAML loader (``pipeline.config``: every field is a key)
and the CLI (``pipeline.cli_options``: every field is a flag). Adding an option to a group is therefore
one field. This module and the groups built on it import no torch, so a run config loads in well under a
second. The groups: :class:`SamplerSettings` here, ``guidance.options.GuidanceConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from rlsynth.datasets.errors import RlsynthError

# Counts go to numpy and torch as int32-sized values; a larger one is a typo.
MAX_INT = 2**31 - 1


class OptionError(RlsynthError):
    """An option outside its declared range or vocabulary. ``key`` is the field, ``problem`` reads after
    it ("polish must be ..."); the run config reports it under the key's path instead."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key} {problem}")


@dataclass(frozen=True)
class OptionSpec:
    """What a field declares beyond its type and default."""

    doc: str
    """One help line (the CLI's help, the config's documentation)."""
    flag: str | None = None
    """The CLI spelling when it is not ``--`` + the name with dashes (``--a/--b`` for a boolean pair)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """The lower bound itself is refused (a standard deviation must be positive)."""
    choices: tuple[str, ...] | None = None
    """The vocabulary of a str field, or of every item of a tuple field (whose items are also distinct)."""
    unit: str = ""
    """What an int counts, for messages ("iterations")."""
    folder: bool = False
    """A path to a folder (the CLI checks it is not a file)."""


def option(default: Any, doc: str, **spec: Any) -> Any:
    """A dataclass field with ``default`` and an :class:`OptionSpec` of ``doc`` and ``spec``."""
    return dataclasses.field(default=default, metadata={"option": OptionSpec(doc, **spec)})


def spec_of(f: dataclasses.Field[Any]) -> OptionSpec | None:
    spec = f.metadata.get("option")
    return spec if isinstance(spec, OptionSpec) else None


def declared(cls: type) -> list[tuple[dataclasses.Field[Any], OptionSpec, Any]]:
    """The option fields of a group: (field, its spec, its type with ``None`` removed)."""
    hints = _hints(cls)
    return [(f, s, hints[f.name]) for f in dataclasses.fields(cls) if (s := spec_of(f)) is not None]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return {k: _strip_none(v) for k, v in typing.get_type_hints(cls).items()}


def _strip_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def check_options(obj: object) -> None:
    """Raise :class:`OptionError` for the first option field of ``obj`` (a group, or a subclass that
    declares more) outside its declaration; ``None`` passes (where it is the default: "the model's")."""
    for f, spec, tp in declared(type(obj)):
        value = getattr(obj, f.name)
        if value is None:
            continue
        problem = _problem(value, spec, tp)
        if problem is not None:
            raise OptionError(f.name, problem)


def _problem(value: Any, spec: OptionSpec, tp: Any) -> str | None:
    if typing.get_origin(tp) is tuple:
        return _items_problem(tuple(value), spec)
    if tp is str:
        return _choice_problem(value, spec)
    if tp in (int, float):
        return _number_problem(value, spec, is_float=tp is float)
    return None


def _choice_problem(value: str, spec: OptionSpec) -> str | None:
    if spec.choices is None or value in spec.choices:
        return None
    return f"must be one of {', '.join(spec.choices)}, got {shown(value)}"


def _items_problem(values: tuple[Any, ...], spec: OptionSpec) -> str | None:
    for i, v in enumerate(values):
        problem = _choice_problem(v, spec)
        if problem is not None:
            return problem
        if v in values[:i]:
            return f"has {shown(v)} given twice"
    return None


def _number_problem(value: float, spec: OptionSpec, *, is_float: bool) -> str | None:
    low, high = spec.low, spec.high
    finite = math.isfinite(value)
    below = low is not None and (value < low or (spec.low_open and value == low))
    if high is not None:
        if not finite:
            return f"must be finite, got {value}"
        if below or value > high:
            return f"must be in {'(' if spec.low_open else '['}{low:g}, {high:g}], got {value:g}"
        return None
    if below or (not finite and low is not None):
        return f"must be {_lower_bound(spec, is_float)}, got {value}"
    if not finite:
        return f"must be finite, got {value}"
    if not is_float and abs(value) > MAX_INT:
        return f"must be at most {MAX_INT}, got {value}"
    return None


def _lower_bound(spec: OptionSpec, is_float: bool) -> str:
    """The bound as a phrase: a finite non-negative number, a positive number of steps, ≥ 2."""
    what = f"number of {spec.unit}" if spec.unit else ("number" if is_float else "integer")
    finite = "finite " if is_float else ""
    if spec.low == 0:
        return f"a {finite}{'positive' if spec.low_open else 'non-negative'} {what}"
    if spec.low == 1 and not is_float and not spec.low_open:
        return f"a positive {what}"
    return f"{'>' if spec.low_open else '≥'} {spec.low:g}"


@dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """How a generator samples, as a user sets it (CLI flags, ``synthesize.sampler`` in a run config, the
    PGD loop); a family ignores the settings it does not use. ``None``: the model's own setting."""

    steps: int | None = option(
        None,
        "Diffusion sampler steps (autoregressive: refinement steps K); default: the model's.",
        low=1,
        unit="steps",
    )
    sigma_start: float | None = option(
        None, "autoregressive: refinement noise level (0: raw drafts); default: the model's.", low=0
    )
    temperature: float | None = option(
        None,
        "autoregressive: scale of the drafter's predictive std (below 1: sharper, less diverse drafts); "
        "default: the model's.",
        low=0,
    )
    # Per-step noise is capped at γ = √2 − 1, reached when churn ≥ 0.41 × steps.
    churn: float | None = option(
        None,
        "Diffusion kinds: EDM S_churn, noise re-injected per Heun step (0: deterministic); default: the "
        "model's (autoregressive: 0, for the refinement).",
        low=0,
    )
    # generators.edm.Polish; its effect on the one-step dynamics error is measured in BENCHMARKS.md.
    polish: int | None = option(
        None,
        "Diffusion kinds (autoregressive: the refinement): denoise-renoise iterations after sampling, "
        "σ 0.5 → 0.05, at about half the sampling rate (0: off); default: the model's.",
        low=0,
        unit="iterations",
    )
    horizon: int = option(32, "world-model: steps per rollout.", low=1, unit="steps")

    def __post_init__(self) -> None:
        check_options(self)

    def settings(self) -> SamplerSettings:
        """Just these settings (a subclass that binds more, such as ``generators.api.SampleOptions``,
        without its extra fields)."""
        return SamplerSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerSettings)})


REGENERATION_MODES = ("cold", "warm")


@dataclass(frozen=True, kw_only=True)
class Regeneration:
    """How the PGD loop makes each round after the first (:mod:`generators.warm`): from noise, as
    policy-guided diffusion does, or from the last round's samples raised to a noise level σ_start."""

    regenerate: str = option(
        "cold",
        "PGD rounds after the first: cold (from noise) or warm (from the last round's samples).",
        choices=REGENERATION_MODES,
    )
    warm_sigma: float | None = option(
        None,
        "warm: the noise level σ_start the last round's samples are raised to; default: chosen with the "
        "polish by pilot rounds in the first warm round (see warm_z).",
        low=0,
        low_open=True,
    )
    warm_steps: int | None = option(
        None,
        "warm: sampler steps from σ_start; default: as many as the cold schedule spends below it.",
        low=1,
        unit="steps",
    )
    warm_polish: int | None = option(
        None,
        "warm: polish iterations of warm rounds; default: chosen with σ_start (0, 10 or the cold rounds'; "
        "the cold rounds' when warm_sigma is given).",
        low=0,
        unit="iterations",
    )
    warm_z: float = option(
        2.0,
        "warm: σ_start is the smallest at which a pilot warm round matches a pilot cold round within this "
        "many standard errors on every measure (spread within 5%).",
        low=0,
        low_open=True,
        high=10,
    )
    warm_pilot: int = option(
        128,
        "warm: samples in each pilot round that σ_start is chosen from.",
        low=8,
        high=4096,
        unit="samples",
    )
    warm_reseed: float = option(
        0.1,
        "warm: share of each warm round sampled from noise instead (keeps the spread from narrowing).",
        low=0,
        high=1,
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.regenerate == "cold" and (
            self.warm_sigma is not None or self.warm_steps is not None or self.warm_polish is not None
        ):
            raise OptionError("regenerate", "is cold: warm_sigma, warm_steps and warm_polish need warm")

    @property
    def warm(self) -> bool:
        return self.regenerate == "warm"
