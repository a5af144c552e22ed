"""The run config: typed dataclasses, one doc line per field, loaded from YAML with strict checking.

Unknown keys and values of the wrong type are errors naming the key path (``synthesize.shards: expected
int, got 'two'``). The resolved config (every default filled in) is saved with every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from datasets.errors import RlsynthError


class ConfigError(RlsynthError):
    """A run config that cannot be used as written."""


@dataclass(frozen=True)
class SourceConfig:
    ref: str | None = None
    """Use this dataset (catalog NAME@N, D4RL-layout HDF5 path or minari:<id>) ..."""
    recipe: str | None = None
    """... or build one: random, sac-medium-replay or sac-medium."""
    env: str = "Hopper-v5"
    """Recipe environment (any MuJoCo locomotion task)."""
    steps: int = 3000
    """Recipe SAC environment steps."""
    transitions: int = 3000
    """Recipe transitions (random, sac-medium)."""
    name: str = "run/source"
    """Catalog name of the built dataset."""


@dataclass(frozen=True)
class TargetConfig:
    algo: str = "iql"
    """Target agent for policy guidance, trained on the source: iql, td3bc, cql or bc."""
    steps: int = 2000
    """Its gradient steps."""


@dataclass(frozen=True)
class GeneratorConfig:
    kind: str = "trajectory"
    """trajectory, transition or autoregressive (the families that can be guided; a drafter's stage also
    trains the trajectory model that refines its drafts)."""
    preset: str = "cpu-small"
    """cpu-small or gpu-paper."""
    steps: int | None = None
    """Training steps (default: the preset's; for a drafter, also its refiner's)."""


@dataclass(frozen=True)
class GuidanceSection:
    terms: tuple[str, ...] = ("policy",)
    """Guidance terms: policy (target agent), dynamics and/or return (needs world_model_steps > 0)."""
    scale: float = 0.05
    """Policy guidance scale."""
    dynamics_scale: float = 0.01
    """Dynamics guidance scale (0.02 and above diverged on some HalfCheetah windows; see BENCHMARKS.md)."""
    deterministic_std: float = 0.1
    """A deterministic target actor (TD3+BC) is read as N(μ(s), std²): smaller pulls actions harder.
    (guidance.policies.DETERMINISTIC_STD; a literal here keeps config loading free of torch.)"""
    world_model_steps: int = 0
    """Train a world model for dynamics / return guidance for this many steps (0: none)."""


@dataclass(frozen=True)
class SynthesizeConfig:
    transitions: int = 4000
    """Synthetic transitions in the committed version."""
    shards: int = 2
    """Ray tasks, each sampling and writing its own Parquet part."""
    name: str = "run/synthetic"
    """Catalog name of the synthetic versions."""
    guidance: GuidanceSection = field(default_factory=GuidanceSection)
    """Guidance for the synthetic data (terms: [] for unguided)."""
    polish: int = 0
    """Denoise–renoise iterations after sampling (``generator sample --polish``; 0: off). 30 cut the
    cpu-small trajectory model's one-step dynamics error from 0.187 to 0.082 on HalfCheetah medium-replay."""


@dataclass(frozen=True)
class FidelityConfig:
    sample: int = 1000
    """Rows of the synthetic data judged against the simulator."""
    horizons: tuple[int, ...] = (1, 8)
    """Open-loop horizons."""


@dataclass(frozen=True)
class AgentsConfig:
    algos: tuple[str, ...] = ("td3bc",)
    """d3rlpy algorithms trained on each data condition."""
    seeds: tuple[int, ...] = (0,)
    """Seeds per (condition, algorithm)."""
    steps: int = 1000
    """Gradient steps per run."""
    conditions: tuple[str, ...] = ("real", "synthetic", "mixed", "pgd")
    """Data conditions: real, synthetic, mixed (240 synthetic + 16 real), pgd (the PGD loop)."""
    eval_every: int = 500
    """Steps between learning-curve evaluations."""
    eval_episodes: int = 2
    """Episodes per learning-curve point."""
    final_episodes: int = 3
    """Episodes of the final evaluation."""
    pgd_regenerate_every: int = 500
    """PGD: agent steps between regenerations."""
    pgd_transitions: int = 2000
    """PGD: transitions per regenerated synthetic set."""
    pgd_warm_start: bool = False
    """PGD: guide round 0 with the run's target agent instead of sampling it unguided as the paper does.
    Helps when agents trained on unguided synthetic data stand still (small generators)."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    """Run name (used in the run folder's name)."""
    seed: int = 0
    """Seed of every stage."""
    source: SourceConfig = field(default_factory=SourceConfig)
    """Where the real data comes from."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """The policy-guidance target agent."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """The generator trained on the source."""
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    """Sharded, guided synthesis into the catalog."""
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    """Judging the synthetic data against MuJoCo."""
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    """Downstream agents on real / synthetic / mixed data and the PGD loop."""

    def __post_init__(self) -> None:
        if (self.source.ref is None) == (self.source.recipe is None):
            raise ConfigError("source: give exactly one of ref or recipe")
        if self.generator.kind not in ("trajectory", "transition", "autoregressive"):
            raise ConfigError(
                f"generator.kind: {self.generator.kind!r} cannot be guided "
                "(trajectory, transition, autoregressive)"
            )
        unknown = set(self.agents.conditions) - {"real", "synthetic", "mixed", "pgd"}
        if unknown:
            raise ConfigError(f"agents.conditions: unknown {sorted(unknown)} (real, synthetic, mixed, pgd)")
        if self.agents.pgd_warm_start and "pgd" not in self.agents.conditions:
            raise ConfigError("agents.pgd_warm_start: needs the pgd condition in agents.conditions")
        if self.synthesize.shards < 1 or self.synthesize.transitions < self.synthesize.shards:
            raise ConfigError("synthesize: need shards ≥ 1 and at least one transition per shard")
        if self.synthesize.polish < 0:
            raise ConfigError(f"synthesize.polish: need ≥ 0 iterations, got {self.synthesize.polish}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (dataclasses, tuples, optionals, scalars), or a ConfigError at ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item, _) = typing.get_args(tp)
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def from_dict(data: dict[str, Any]) -> RunConfig:
    result: RunConfig = _build(RunConfig, data, "")
    return result


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping")
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (tuples as lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))
