"""Run configs: YAML to typed dataclasses, strict about unknown keys and types; shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, GuidanceSection, RunConfig, load_config, to_dict

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
        ("source: {recipe: random}\nsynthesize: {polish: -2}\n", "synthesize.polish: need ≥ 0 iterations"),
        ("source: [1, 2]\n", "source: expected a mapping"),
        ("- just\n- a list\n", "must be a mapping"),
        ("source: {recipe: random\n", "not valid YAML"),
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


def test_guidance_defaults_match_the_guidance_package() -> None:
    from guidance.policies import DETERMINISTIC_STD

    assert GuidanceSection().deterministic_std == DETERMINISTIC_STD
