"""One declaration per option group: every field of SamplerSettings and GuidanceConfig is a run-config key
and a ``generator sample`` flag with the field's default and help, travels to the Ray shard task and the
PGD loop as that dataclass, and a field added to a group reaches all of them with no other edit."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

import click
import pytest
import yaml

from rlsynth.generators.options import OptionError, OptionSpec, SamplerSettings, declared, option
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.pipeline import config as config_module
from rlsynth.pipeline.cli_generator import generator_sample_cmd
from rlsynth.pipeline.cli_options import flag_of, from_params, group_options
from rlsynth.pipeline.config import from_dict, load_config, to_dict

GROUPS: list[tuple[type, str]] = [(SamplerSettings, "sampler"), (GuidanceConfig, "guidance")]
"""Each group and its key in a run config's synthesize section."""
# --policy names the agent whichever way it steers samples (a world model's actor, or the guidance target).
SHARED_FLAGS = {(GuidanceConfig, "policy"): ("policy_spec", "--policy")}


def other_value(f: dataclasses.Field[Any], spec: OptionSpec, tp: Any) -> Any:
    """A value of the field's type that is not its default and that its declaration accepts."""
    if typing.get_origin(tp) is tuple:
        assert spec.choices is not None
        return (spec.choices[-1], spec.choices[0])
    if tp is bool:
        return not f.default
    if spec.choices is not None:
        return next(c for c in spec.choices if c != f.default)
    if tp is str:
        return "some/file"
    low = spec.low or 0
    if tp is int:
        return int(low) + 3 if f.default != int(low) + 3 else int(low) + 4
    value = low + 0.25
    return value if spec.high is None else min(value, spec.high)


def every_field() -> list[tuple[type, str, dataclasses.Field[Any], OptionSpec, Any]]:
    return [(cls, key, f, spec, tp) for cls, key in GROUPS for f, spec, tp in declared(cls)]


FIELDS = every_field()
IDS = [f"{cls.__name__}.{f.name}" for cls, _, f, _, _ in FIELDS]


@pytest.mark.parametrize(("cls", "key", "f", "spec", "tp"), FIELDS, ids=IDS)
def test_every_field_is_a_run_config_key(
    cls: type, key: str, f: dataclasses.Field[Any], spec: OptionSpec, tp: Any
) -> None:
    value = other_value(f, spec, tp)
    as_yaml = list(value) if isinstance(value, tuple) else value
    cfg = from_dict({"source": {"recipe": "random"}, "synthesize": {key: {f.name: as_yaml}}})
    assert getattr(getattr(cfg.synthesize, key), f.name) == value


@pytest.mark.parametrize(("cls", "key", "f", "spec", "tp"), FIELDS, ids=IDS)
def test_every_field_is_a_sample_flag_with_its_default_and_help(
    cls: type, key: str, f: dataclasses.Field[Any], spec: OptionSpec, tp: Any
) -> None:
    params = {p.name: p for p in generator_sample_cmd.params}
    dest, flag = SHARED_FLAGS.get((cls, f.name), (f.name, flag_of(f.name, spec)))
    param = params[dest]
    assert isinstance(param, click.Option) and flag in param.opts
    if (cls, f.name) in SHARED_FLAGS:
        return
    assert param.default == f.default and param.help is not None and param.help.startswith(spec.doc)
    if isinstance(param.type, click.IntRange | click.FloatRange):
        assert (param.type.min, param.type.max, param.type.min_open) == (spec.low, spec.high, spec.low_open)


def test_the_sample_flags_parse_into_the_groups() -> None:
    """Every generated flag, given a non-default value, arrives in the group's field."""
    args = ["folder", "--n-transitions", "1", "--name", "x"]
    expected: dict[type, dict[str, Any]] = {cls: {} for cls, _ in GROUPS}
    for cls, _, f, spec, tp in FIELDS:
        if (cls, f.name) in SHARED_FLAGS:
            continue
        value = other_value(f, spec, tp)
        expected[cls][f.name] = value
        flag = spec.flag or "--" + f.name.replace("_", "-")
        if tp is bool:
            on, _, off = flag.partition("/")
            args.append(on if value else off or "--no-" + on.removeprefix("--"))
        else:
            args += [a for v in (value if isinstance(value, tuple) else (value,)) for a in (flag, str(v))]
    params = dict(generator_sample_cmd.make_context("sample", args).params)
    sampler = from_params(SamplerSettings, params)
    guidance = from_params(GuidanceConfig, params, policy=None)
    assert sampler == SamplerSettings(**expected[SamplerSettings])
    assert guidance == GuidanceConfig(**expected[GuidanceConfig])


def test_flags_and_keys_are_unique() -> None:
    names = [p.name for p in generator_sample_cmd.params]
    assert len(names) == len(set(names))
    flags = [o for p in generator_sample_cmd.params for o in p.opts + p.secondary_opts]
    assert len(flags) == len(set(flags))


def test_defaults_agree_everywhere() -> None:
    """The one default of each field is the one every consumer sees."""
    from rlsynth.generators.api import SampleOptions
    from rlsynth.guidance.policies import DETERMINISTIC_STD
    from rlsynth.guidance.terms import TermOptions
    from rlsynth.offline_rl.compare import PGDSpec
    from rlsynth.offline_rl.pgd import PGDConfig
    from rlsynth.pipeline.run import pgd_guidance

    assert SampleOptions().settings() == SamplerSettings()
    assert PGDConfig().sampler == SamplerSettings() == PGDSpec("g", "r", "n").sampler
    assert config_module.SynthesizeConfig().sampler == SamplerSettings()
    g = GuidanceConfig()
    assert g.deterministic_std == DETERMINISTIC_STD
    term = TermOptions(scale=g.scale)
    assert (term.schedule, term.at, term.normalise) == (g.schedule, g.at, g.normalise)
    # A run and the PGD loop guide by the policy term, every other field as declared.
    policy_only = dataclasses.replace(g, terms=("policy",))
    assert config_module.SynthesizeConfig().guidance == policy_only == PGDConfig().guidance
    assert pgd_guidance(config_module.SynthesizeConfig().guidance) == policy_only


def test_the_groups_travel_as_themselves() -> None:
    """The run config, the Ray shard task and the PGD loop hold the groups, not copies of their fields."""
    from rlsynth.offline_rl.compare import PGDSpec
    from rlsynth.offline_rl.pgd import PGDConfig
    from rlsynth.pipeline.run import SynthesisTask

    for holder in (config_module.SynthesizeConfig, PGDConfig, PGDSpec, SynthesisTask):
        hints = typing.get_type_hints(holder)
        assert hints["sampler"] is SamplerSettings, holder
        assert GuidanceConfig in (hints["guidance"], *typing.get_args(hints["guidance"])), holder
    # PGDConfig.steps counts the agent's gradient steps, not the sampler's.
    group_fields = {f.name for cls, _ in GROUPS for f in dataclasses.fields(cls)} - {"steps"}
    for holder in (config_module.SynthesizeConfig, PGDConfig, PGDSpec, SynthesisTask):
        assert not group_fields & {f.name for f in dataclasses.fields(holder)}, holder


def test_adding_an_option_is_one_field() -> None:
    """A group with one more declared field: validated, a config key and a flag, with no other edit."""

    @dataclass(frozen=True, kw_only=True)
    class Wider(SamplerSettings):
        jitter: float = option(0.5, "A new sampler option.", low=0, high=1)

    assert Wider().jitter == 0.5
    with pytest.raises(OptionError, match=r"jitter must be in \[0, 1\], got 2"):
        Wider(jitter=2.0)
    section = config_module._build(Wider, {"jitter": 0.25, "polish": 2}, "synthesize.sampler")
    assert (section.jitter, section.polish) == (0.25, 2)
    with pytest.raises(config_module.ConfigError, match=r"synthesize.sampler.jitter: must be in \[0, 1\]"):
        config_module._build(Wider, {"jitter": 1.5}, "synthesize.sampler")

    @click.command()
    @group_options(Wider)
    def cmd(**options: Any) -> None:
        click.echo(repr(from_params(Wider, options)))

    assert "--jitter" in {o for p in cmd.params for o in p.opts}
    assert from_params(Wider, dict(cmd.make_context("cmd", ["--jitter", "0.75"]).params)).jitter == 0.75


def test_groups_refuse_bad_values_with_one_line() -> None:
    with pytest.raises(OptionError, match="scale must be finite, got nan"):
        GuidanceConfig(scale=math.nan)
    with pytest.raises(OptionError, match="terms must be one of policy, dynamics, return, got 'vibes'"):
        GuidanceConfig(terms=("vibes",))
    with pytest.raises(OptionError, match="terms has 'policy' given twice"):
        GuidanceConfig(terms=("policy", "policy"))
    with pytest.raises(OptionError, match=r"deterministic_std must be in \(0, 100\], got 0"):
        GuidanceConfig(deterministic_std=0.0)
    with pytest.raises(OptionError, match="polish must be a non-negative number of iterations, got -1"):
        SamplerSettings(polish=-1)
    with pytest.raises(OptionError, match="steps must be a positive number of steps, got 0"):
        SamplerSettings(steps=0)
    with pytest.raises(OptionError, match="horizon must be at most 2147483647"):
        SamplerSettings(horizon=2**40)


def test_a_config_with_every_field_set_round_trips(tmp_path: Any) -> None:
    synthesize: dict[str, Any] = {key: {} for _, key in GROUPS}
    for _, key, f, spec, tp in FIELDS:
        value = other_value(f, spec, tp)
        synthesize[key][f.name] = list(value) if isinstance(value, tuple) else value
    cfg = from_dict({"source": {"recipe": "random"}, "synthesize": synthesize})
    p = tmp_path / "resolved.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(p) == cfg


def test_the_run_fills_in_the_guidance_files_the_config_leaves_open() -> None:
    from rlsynth.pipeline.run import synthesis_guidance

    run = GuidanceConfig(terms=("policy", "dynamics"), scale=0.2)
    filled = synthesis_guidance(run, "target.d3", "wm")
    assert filled == dataclasses.replace(run, policy="target.d3", world_model="wm")
    named = dataclasses.replace(run, policy="mine.d3", world_model="my-wm")
    assert synthesis_guidance(named, "target.d3", None) == named
    assert synthesis_guidance(GuidanceConfig(terms=("dynamics",)), "target.d3", "wm") == GuidanceConfig(
        terms=("dynamics",), world_model="wm"
    )
    assert synthesis_guidance(GuidanceConfig(), "target.d3", "wm") is None
