"""The run config: typed dataclasses, one doc line per field, loaded from YAML with strict checking.

Everything a stage would later refuse is refused here, at load, in well under a second and before Ray
starts or anything trains: unknown or duplicate keys, values of the wrong type, names outside their
grammar (run name, dataset names, source ref, env id), unknown algorithms, presets, recipes and guidance
terms, counts out of range and scales that are not finite. Every error is one line naming the file and
the key path (``configs/x.yaml: synthesize.guidance.scale: must be finite, got nan``). The resolved config
(every default filled in) is saved with every run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from rlsynth.datasets.errors import RlsynthError, read_bounded
from rlsynth.generators.options import OptionError, Regeneration, SamplerSettings
from rlsynth.guidance.options import GuidanceConfig


class ConfigError(RlsynthError):
    """A run config that cannot be used as written."""


class FieldError(ConfigError):
    """A ConfigError at a key path relative to the section that raised it; ``_build`` prefixes the path
    of that section, so each section checks its own fields without knowing where it sits."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)

    def under(self, where: str) -> FieldError:
        return FieldError(_join(where, self.key), self.problem)


# The vocabularies, as literals: importing the registries (offline_rl.train, generators.api,
# datasets.recipes) pulls in torch and takes seconds, and loading a config must not. Tests check each
# literal against its registry. (The sampler and guidance sections are the torch-free option groups
# themselves, generators.options and guidance.options, which declare their own vocabularies and bounds.)
RECIPES = ("random", "sac-medium-replay", "sac-medium")
ALGOS = ("iql", "td3bc", "cql", "bc")
GUIDED_KINDS = ("trajectory", "transition", "autoregressive")
PRESETS = ("cpu-small", "gpu-paper")
CONDITIONS = ("real", "synthetic", "mixed", "pgd")

# The run name becomes part of a folder name under --runs: one path component, never '.' or '..'
# (the first character cannot be a dot), no separators, no control characters; matched with fullmatch
# so a trailing newline is refused too.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Counts go to numpy, torch and d3rlpy as int32-sized values; a larger one is a typo or an attack.
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1  # numpy's seed range
# A config is a page of YAML; this stops a huge or endless file (a FIFO, /dev/zero) before it is parsed.
MAX_CONFIG_BYTES = 1 << 20


def _join(where: str, key: str) -> str:
    if not where:
        return key
    if not key:
        return where
    return f"{where}{key}" if key.startswith("[") else f"{where}.{key}"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


# --- field checks: each raises FieldError(key, ...) ----------------------------------------------------


def _count(key: str, value: int, minimum: int = 1) -> None:
    if not minimum <= value <= MAX_COUNT:
        raise FieldError(key, f"must be between {minimum} and {MAX_COUNT}, got {value}")


def _seed(key: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise FieldError(key, f"seeds are integers from 0 to {MAX_SEED}, got {value}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise FieldError(key, f"unknown {_shown(value)} (known: {', '.join(options)})")


def _choices(key: str, values: tuple[str, ...], options: tuple[str, ...]) -> None:
    unknown = sorted({v for v in values if v not in options})
    if unknown:
        raise FieldError(key, f"unknown {[v[:40] for v in unknown]} ({', '.join(options)})")


def _distinct(key: str, values: Iterable[object], *, non_empty: bool = True) -> None:
    items = list(values)
    if non_empty and not items:
        raise FieldError(key, "needs at least one entry")
    for i, v in enumerate(items):
        if v in items[:i]:
            raise FieldError(f"{key}[{i}]", f"{_shown(v)} is given twice")


def _dataset_name(key: str, value: str) -> None:
    from rlsynth.datasets.catalog import NAME_RE, check_name

    try:
        check_name(value)
    except RlsynthError as e:
        raise FieldError(key, str(e)) from None
    # The catalog's own grammar, matched in full (its check may use `match`, which lets "\n" end a name).
    if not NAME_RE.fullmatch(value):
        raise FieldError(key, f"invalid dataset name {_shown(value)}")


def _source_ref(key: str, value: str) -> None:
    """A ref has one of the forms ``load_source`` reads; each is checked against its own grammar."""
    if value.startswith("minari:"):
        from rlsynth.datasets.minari_io import check_minari_id

        try:
            check_minari_id(value.removeprefix("minari:"))
        except RlsynthError as e:
            raise FieldError(key, str(e)) from None
    elif value.startswith("hdf5:") or value.endswith((".hdf5", ".h5")):
        path = value.removeprefix("hdf5:")
        if not path or any(ord(c) < 32 or ord(c) == 127 for c in path):
            raise FieldError(key, f"invalid HDF5 path {_shown(value)}")
    else:
        name, sep, version = value.partition("@")
        _dataset_name(key, name)
        if sep and not (version.isascii() and version.isdigit() and int(version) >= 1):
            raise FieldError(key, f"invalid version in {_shown(value)}: expected NAME@N with N = 1, 2, ...")


def _env_id(key: str, value: str) -> None:
    from rlsynth.datasets.types import check_env_id

    try:
        check_env_id(value)
    except RlsynthError as e:
        raise FieldError(key, str(e)) from None


# --- the sections ---------------------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        if self.ref is not None:
            _source_ref("ref", self.ref)
        if self.recipe is not None:
            _choice("recipe", self.recipe, RECIPES)
        _env_id("env", self.env)
        _count("steps", self.steps)
        _count("transitions", self.transitions)
        _dataset_name("name", self.name)


@dataclass(frozen=True)
class TargetConfig:
    algo: str = "iql"
    """Target agent for policy guidance, trained on the source: iql, td3bc, cql or bc."""
    steps: int = 2000
    """Its gradient steps."""

    def __post_init__(self) -> None:
        _choice("algo", self.algo, ALGOS)
        _count("steps", self.steps)


@dataclass(frozen=True)
class GeneratorConfig:
    kind: str = "trajectory"
    """trajectory, transition or autoregressive (the families that can be guided; a drafter's stage also
    trains the trajectory model that refines its drafts)."""
    preset: str = "cpu-small"
    """cpu-small or gpu-paper."""
    steps: int | None = None
    """Training steps (default: the preset's; for a drafter, also its refiner's)."""

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise FieldError("kind", f"{_shown(self.kind)} cannot be guided ({', '.join(GUIDED_KINDS)})")
        _choice("preset", self.preset, PRESETS)
        if self.steps is not None:
            _count("steps", self.steps)


def _run_guidance() -> GuidanceConfig:
    # A run synthesises for its target agent unless told otherwise (terms: [] for unguided); a mapping
    # in the YAML overrides fields of this default, so `guidance: {scale: 0.1}` keeps the policy term.
    return GuidanceConfig(terms=("policy",))


@dataclass(frozen=True)
class SynthesizeConfig:
    transitions: int = 4000
    """Synthetic transitions in the committed version."""
    shards: int = 2
    """Ray tasks, each sampling and writing its own Parquet part."""
    name: str = "run/synthetic"
    """Catalog name of the synthetic versions."""
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    """How the generator samples (every field of generators.options.SamplerSettings); also the PGD loop's."""
    guidance: GuidanceConfig = field(default_factory=_run_guidance)
    """Guidance for the synthetic data (every field of guidance.options.GuidanceConfig). policy and
    world_model default to the run's target agent and trained world model."""
    world_model_steps: int = 0
    """Train a world model for dynamics / return guidance for this many steps (0: its preset's); unused
    when the guidance names a world_model."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "polish": "sampler.polish",
        "guidance.world_model_steps": "world_model_steps",
    }
    """Keys of earlier configs, still read, and where they live now."""

    def __post_init__(self) -> None:
        _count("transitions", self.transitions)
        _count("shards", self.shards)
        if self.transitions < self.shards:
            raise FieldError("", "need shards ≥ 1 and at least one transition per shard")
        _dataset_name("name", self.name)
        _count("world_model_steps", self.world_model_steps, minimum=0)
        if self.world_model_steps and self.guidance.world_model is not None:
            raise FieldError("world_model_steps", "the guidance names a world_model; give one or the other")


@dataclass(frozen=True)
class FidelityConfig:
    sample: int = 1000
    """Rows of the synthetic data judged against the simulator."""
    horizons: tuple[int, ...] = (1, 8)
    """Open-loop horizons."""

    def __post_init__(self) -> None:
        _count("sample", self.sample)
        _distinct("horizons", self.horizons)
        for i, h in enumerate(self.horizons):
            _count(f"horizons[{i}]", h)


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
    pgd_regeneration: Regeneration = field(default_factory=Regeneration)
    """PGD: rounds after the first from noise (cold) or warm-started from the last round's samples (every
    field of generators.options.Regeneration)."""

    def __post_init__(self) -> None:
        _choices("algos", self.algos, ALGOS)
        _distinct("algos", self.algos)
        _distinct("seeds", self.seeds)
        for i, s in enumerate(self.seeds):
            _seed(f"seeds[{i}]", s)
        _choices("conditions", self.conditions, CONDITIONS)
        _distinct("conditions", self.conditions)
        for name in ("steps", "eval_every", "eval_episodes", "final_episodes", "pgd_regenerate_every",
                     "pgd_transitions"):  # fmt: skip
            _count(name, getattr(self, name))
        if self.pgd_warm_start and "pgd" not in self.conditions:
            raise FieldError("pgd_warm_start", "needs the pgd condition in agents.conditions")
        if self.pgd_regeneration.warm and "pgd" not in self.conditions:
            raise FieldError("pgd_regeneration", "warm needs the pgd condition in agents.conditions")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    """Run name (one component of the run folder's name): up to 64 letters, digits, '.', '-' or '_'."""
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
        check_run_name(self.name)
        _seed("seed", self.seed)
        if (self.source.ref is None) == (self.source.recipe is None):
            raise FieldError("source", "give exactly one of ref or recipe")


def check_run_name(name: str) -> str:
    """``name`` if it can name a run folder (one path component under --runs), else a FieldError."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise FieldError(
            "name",
            f"invalid run name {_shown(name)}: 1-64 letters, digits, '.', '-', '_', first a letter or digit",
        )
    return name


# --- YAML to dataclasses --------------------------------------------------------------------------------


def _convert(tp: Any, value: Any, where: str, base: Any = None) -> Any:
    """``value`` as type ``tp`` (dataclasses, tuples, optionals, scalars), or a ConfigError at ``where``.
    A mapping for a dataclass overrides the fields of ``base`` (the field's default) when there is one."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
        return _build(tp, value, where, base)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {_shown(value)}")
        (item, _) = typing.get_args(tp)
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(
                f"{where}: must be finite, got an integer of {len(str(value))} digits"
            ) from None
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {_shown(value)}")
    return value


def _nested_base(base: Any, f: dataclasses.Field[Any]) -> Any:
    """What a mapping given for field ``f`` overrides: the parent's value, else the field's default."""
    if base is not None:
        return getattr(base, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _moved(data: dict[Any, Any], moved: dict[str, str], where: str) -> dict[Any, Any]:
    """``data`` with the keys of earlier configs (``moved``: paths at most one level deep) at their
    current places; a value given at both is refused."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in moved.items():
        head, _, leaf = old.rpartition(".")
        holder = out.get(head) if head else out
        if not isinstance(holder, dict) or leaf not in holder:
            continue
        value = holder.pop(leaf)
        new_head, _, new_leaf = new.rpartition(".")
        target = out.setdefault(new_head, {}) if new_head else out
        if not isinstance(target, dict):
            raise ConfigError(f"{_join(where, new_head)}: expected a mapping, got {_shown(target)}")
        if new_leaf in target:
            raise ConfigError(f"{_join(where, old)}: also given as {_join(where, new)}; give it once")
        target[new_leaf] = value
    return out


def _build(cls: type, data: dict[Any, Any], where: str, base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{_join(where, _shown(key))}: keys are names, not {type(key).__name__}")
    data = _moved(data, getattr(cls, "MOVED_KEYS", {}), where)
    by_name = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        known = ", ".join(sorted(by_name))
        raise ConfigError(f"{_join(where, unknown[0][:60])}: unknown key (known: {known})")
    kwargs = {
        k: _convert(hints[k], v, _join(where, k), _nested_base(base, by_name[k])) for k, v in data.items()
    }
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except OptionError as e:
        raise FieldError(e.key, e.problem).under(where) from None
    except FieldError as e:
        raise e.under(where) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping, at any depth, is an error
    (SafeLoader silently keeps the last one, so a pasted section could override a reviewed one)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, where: str, seen: set[int]) -> None:
    # Aliases make the node graph a DAG: each node is walked once, or an alias bomb would take forever.
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "<complex key>"
            path = _join(where, key[:60])
            if key != "<<" and key in first_line:
                line = key_node.start_mark.line + 1
                raise FieldError(path, f"given twice (lines {first_line[key]} and {line})")
            first_line[key] = key_node.start_mark.line + 1
            _refuse_duplicate_keys(value_node, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{where}[{i}]", seen)


def from_dict(data: dict[str, Any]) -> RunConfig:
    result: RunConfig = _build(RunConfig, data, "")
    return result


def _read_yaml(p: Path) -> Any:
    if not p.exists():
        raise ConfigError(f"{p}: no such config file")
    raw = read_bounded(p, MAX_CONFIG_BYTES, "run config (a page of YAML)", ConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.load(
            text, Loader=StrictLoader
        )  # StrictLoader is a SafeLoader: no tags that build objects
    except FieldError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a run config") from None
    except ValueError as e:  # e.g. an integer literal longer than Python converts
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0][:100]})") from None


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    data = _read_yaml(p)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping")
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a run config") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (tuples as lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))
