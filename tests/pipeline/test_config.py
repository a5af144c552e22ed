"""Run configs: YAML to typed dataclasses, strict about unknown and duplicate keys, types, names, ranges
and vocabularies, all at load; shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlsynth.pipeline import config as config_module
from rlsynth.pipeline.config import ConfigError, RunConfig, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "name", ["quickstart.yaml", "halfcheetah-pgd.yaml", "hopper-pgd.yaml", "halfcheetah-drafter-pgd.yaml"]
)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig) and cfg.name == name.removesuffix(".yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "quickstart.yaml")
    p = tmp_path / "resolved.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(p) == cfg
    assert cfg.agents.conditions == ("real", "synthetic", "mixed", "pgd")
    warm = tmp_path / "warm.yaml"
    warm.write_text(
        yaml.safe_dump(to_dict(cfg) | {"agents": to_dict(cfg)["agents"] | {"pgd_warm_start": True}})
    )
    assert load_config(warm).agents.pgd_warm_start is True
    regen = {"regenerate": "warm", "warm_z": 3.0, "warm_reseed": 0.2}
    warm.write_text(
        yaml.safe_dump(to_dict(cfg) | {"agents": to_dict(cfg)["agents"] | {"pgd_regeneration": regen}})
    )
    loaded = load_config(warm).agents.pgd_regeneration
    assert loaded.warm and loaded.warm_z == 3.0 and loaded.warm_reseed == 0.2 and loaded.warm_sigma is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nsource: {recipe: random}\nbogus: 1\n", "bogus: unknown key"),
        ("source: {recipe: random, colour: red}\n", "source.colour: unknown key"),
        (
            "source: {recipe: random}\nsynthesize: {shards: two}\n",
            "synthesize.shards: expected int, got 'two'",
        ),
        ("source: {recipe: random}\nagents: {seeds: 3}\n", "agents.seeds: expected a list"),
        ("source: {recipe: random}\nagents: {conditions: [real, dreams]}\n", "unknown ['dreams']"),
        (
            "source: {recipe: random}\nagents: {conditions: [real], pgd_warm_start: true}\n",
            "needs the pgd condition",
        ),
        ("source: {recipe: random}\nagents: {pgd_warm_start: 3}\n", "agents.pgd_warm_start: expected bool"),
        ("source: {recipe: random, ref: a@1}\n", "exactly one of ref or recipe"),
        ("source: {recipe: random}\ngenerator: {kind: world-model}\n", "cannot be guided"),
        (
            "source: {recipe: random}\nsynthesize: {polish: -2}\n",
            "synthesize.sampler.polish: must be a non-negative number of iterations",
        ),
        (
            "source: {recipe: random}\nsynthesize: {polish: 2, sampler: {polish: 3}}\n",
            "synthesize.polish: also given as synthesize.sampler.polish",
        ),
        (
            "source: {recipe: random}\nsynthesize: {sampler: {churn: -1}}\n",
            "synthesize.sampler.churn: must be a finite non-negative number",
        ),
        (
            "source: {recipe: random}\nsynthesize: {sampler: {steps: 0}}\n",
            "synthesize.sampler.steps: must be",
        ),
        (
            "source: {recipe: random}\nagents: {pgd_regeneration: {regenerate: tepid}}\n",
            "agents.pgd_regeneration.regenerate: must be one of cold, warm",
        ),
        (
            "source: {recipe: random}\nagents: {pgd_regeneration: {warm_sigma: 1.0}}\n",
            "agents.pgd_regeneration.regenerate: is cold: warm_sigma",
        ),
        (
            "source: {recipe: random}\nagents: {conditions: [real], pgd_regeneration: {regenerate: warm}}\n",
            "agents.pgd_regeneration: warm needs the pgd condition",
        ),
        (
            "source: {recipe: random}\nsynthesize: {sampler: {seed: 3}}\n",
            "synthesize.sampler.seed: unknown key",
        ),
        ("source: [1, 2]\n", "source: expected a mapping"),
        ("- just\n- a list\n", "must be a mapping"),
        ("source: {recipe: random\n", "not valid YAML"),
        ("name: x\nname: y\nsource: {recipe: random}\n", "name: given twice (lines 1 and 2)"),
        (
            "source: {recipe: random}\nsynthesize:\n  guidance:\n    scale: 0.1\n    scale: 9\n",
            "synthesize.guidance.scale: given twice",
        ),
        ("source: {recipe: random}\nagents: [{a: 1, a: 2}]\n", "agents[0].a: given twice"),
        ("name: x/../../elsewhere\nsource: {recipe: random}\n", "name: invalid run name"),
        ('name: "x\\n"\nsource: {recipe: random}\n', "name: invalid run name"),
        ("name: ..\nsource: {recipe: random}\n", "name: invalid run name"),
        ("source: {recipe: random}\nseed: 1.5\n", "seed: expected int"),
        ("source: {recipe: random}\nseed: -1\n", "seed: seeds are integers"),
        ("source: {recipe: bogus}\n", "source.recipe: unknown 'bogus'"),
        ("source: {recipe: random, env: 'mod:Evil-v0'}\n", "source.env: environment id"),
        ("source: {recipe: random, transitions: 0}\n", "source.transitions: must be between 1"),
        ("source: {recipe: random, name: ../up}\n", "source.name: invalid dataset name"),
        ("source: {ref: 'a@0'}\n", "source.ref: invalid version"),
        ("source: {ref: 'minari:../../x-v0'}\n", "source.ref: invalid Minari dataset id"),
        ("source: {recipe: random}\ntarget: {algo: ppo}\n", "target.algo: unknown 'ppo'"),
        ("source: {recipe: random}\ngenerator: {preset: huge}\n", "generator.preset: unknown 'huge'"),
        ("source: {recipe: random}\ngenerator: {steps: 0}\n", "generator.steps: must be between 1"),
        (
            "source: {recipe: random}\nsynthesize: {guidance: {terms: [vibes]}}\n",
            "guidance.terms: must be one of policy, dynamics, return, got 'vibes'",
        ),
        ("source: {recipe: random}\nsynthesize: {guidance: {schedule: cosine}}\n", "guidance.schedule: must"),
        ("source: {recipe: random}\nsynthesize: {guidance: {at: there}}\n", "guidance.at: must be one of"),
        ("source: {recipe: random}\nsynthesize: {guidance: {normalise: 1}}\n", "normalise: expected bool"),
        ("source: {recipe: random}\nsynthesize: {guidance: {return_scale: 2000}}\n", "must be in [0, 1000]"),
        ("source: {recipe: random}\nsynthesize: {guidance: {colour: red}}\n", "guidance.colour: unknown key"),
        (
            "source: {recipe: random}\nsynthesize: {world_model_steps: 5, guidance: {world_model: wm}}\n",
            "synthesize.world_model_steps: the guidance names a world_model",
        ),
        ("source: {recipe: random}\nsynthesize: {guidance: {terms: [policy, policy]}}\n", "given twice"),
        (
            "source: {recipe: random}\nsynthesize: {guidance: {scale: .nan}}\n",
            "scale: must be finite, got nan",
        ),
        (
            "source: {recipe: random}\nsynthesize: {guidance: {scale: .inf}}\n",
            "scale: must be finite, got inf",
        ),
        ("source: {recipe: random}\nsynthesize: {guidance: {scale: -0.1}}\n", "scale: must be in [0, 1000]"),
        ("source: {recipe: random}\nsynthesize: {guidance: {dynamics_scale: -1}}\n", "dynamics_scale: must"),
        ("source: {recipe: random}\nsynthesize: {guidance: {deterministic_std: 0}}\n", "must be in (0, 100]"),
        ("source: {recipe: random}\nsynthesize: {name: 'Up/Case'}\n", "synthesize.name: invalid dataset"),
        ("source: {recipe: random}\nsynthesize: {shards: 0}\n", "synthesize.shards: must be between 1"),
        ("source: {recipe: random}\nsynthesize: {transitions: 3, shards: 4}\n", "one transition per shard"),
        (
            "source: {recipe: random}\nfidelity: {horizons: [1, 0]}\n",
            "fidelity.horizons[1]: must be between 1",
        ),
        ("source: {recipe: random}\nagents: {algos: []}\n", "agents.algos: needs at least one entry"),
        ("source: {recipe: random}\nagents: {seeds: [0, 0]}\n", "agents.seeds[1]: 0 is given twice"),
        ("source: {recipe: random}\nagents: {steps: -5}\n", "agents.steps: must be between 1"),
        ("source: {recipe: random}\nagents: {eval_episodes: 0}\n", "agents.eval_episodes: must be between"),
        ("source: {recipe: random}\nagents: {pgd_transitions: 4294967296}\n", "agents.pgd_transitions: must"),
        ("source: {recipe: random}\n1: x\n", "keys are names"),
        ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        load_config(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_earlier_keys_are_read_where_they_live_now() -> None:
    from rlsynth.pipeline.config import from_dict

    synthesize = {"polish": 3, "guidance": {"world_model_steps": 7, "scale": 0.2}}
    old = from_dict({"source": {"recipe": "random"}, "synthesize": synthesize})
    assert old.synthesize.sampler.polish == 3 and old.synthesize.world_model_steps == 7
    assert old.synthesize.guidance.scale == 0.2 and old.synthesize.guidance.terms == ("policy",)
    assert "polish" not in to_dict(old)["synthesize"]  # the resolved config has the current keys


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """Aliases nest shared nodes; the duplicate-key walk visits each node once, not once per path."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]" for i in range(1, 12)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nsource: {recipe: random}\n")
    with pytest.raises(ConfigError, match="a0: unknown key"):
        load_config(p)


def test_odd_files_are_refused_with_one_line(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (config_module.MAX_CONFIG_BYTES + 10) + "\n")
    with pytest.raises(ConfigError, match=r"more than a run config \(a page of YAML\) may hold"):
        load_config(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)


def test_vocabularies_match_their_registries() -> None:
    """The config's literal vocabularies (kept so loading stays free of torch) are the registries'."""
    from rlsynth.datasets.recipes import RECIPES
    from rlsynth.generators.api import PRESETS
    from rlsynth.guidance import options, terms
    from rlsynth.offline_rl.train import ALGOS

    assert config_module.RECIPES == RECIPES and config_module.ALGOS == ALGOS
    assert options.SCHEDULES == terms.SCHEDULES and options.POINTS == terms.POINTS
    for kind in config_module.GUIDED_KINDS:
        assert tuple(PRESETS[kind]) == config_module.PRESETS


def test_every_check_runs_without_torch(tmp_path: Path) -> None:
    """Loading a config never imports torch (the registries do): it stays well under a second."""
    import subprocess
    import sys

    code = (
        "import sys, time; t = time.perf_counter(); from rlsynth.pipeline.config import load_config; "
        f"load_config({str(CONFIGS / 'quickstart.yaml')!r}); "
        "print('torch' in sys.modules, time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    torch_loaded, seconds = out.split()
    assert torch_loaded == "False" and float(seconds) < 1.0
