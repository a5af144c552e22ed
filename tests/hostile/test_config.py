"""Hostile run configs, through the real CLI (``rlsynth run CONFIG --runs DIR``).

Each case is one valid config with one thing wrong that a stage would only have tripped over after Ray
started and models trained (or never: a run name leaving ``--runs``, a duplicated key silently taking the
last value, an env id gymnasium imports as code). Each must be refused at load, in one line naming the
config file and the key path, with nothing written under the runs folder or the catalog; the time bound
(interpreter start-up included) shows that nothing started.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile_harness import EVIL_ENV_ID, assert_refused

MAX_SECONDS = 10.0
"""Interpreter and CLI start-up plus the check; a Ray start or any training takes longer."""

VALID = """\
name: tiny
seed: 0
source:
  recipe: random
  env: Hopper-v5
  transitions: 400
  name: tiny/src
target:
  algo: bc
  steps: 20
generator:
  kind: transition
  preset: cpu-small
  steps: 30
synthesize:
  transitions: 300
  shards: 3
  name: tiny/syn
  guidance:
    terms: [policy]
    scale: 0.05
fidelity:
  sample: 100
  horizons: [1]
agents:
  algos: [bc]
  seeds: [0]
  steps: 20
  conditions: [real]
"""


def edit(old: str, new: str) -> Callable[[], str]:
    def make() -> str:
        assert old in VALID, old
        return VALID.replace(old, new, 1)

    return make


# (id, the hostile config's text, texts the refusal must contain besides the file name)
CASES: list[tuple[str, Callable[[], str], tuple[str, ...]]] = [
    ("guidance-term", edit("terms: [policy]", "terms: [policy, telepathy]"), ("synthesize.guidance.terms",)),
    ("scale-nan", edit("scale: 0.05", "scale: .nan"), ("synthesize.guidance.scale", "finite")),
    ("scale-inf", edit("scale: 0.05", "scale: .inf"), ("synthesize.guidance.scale", "finite")),
    ("scale-negative", edit("scale: 0.05", "scale: -3.0"), ("synthesize.guidance.scale",)),
    ("preset", edit("preset: cpu-small", "preset: cpu-enormous"), ("generator.preset",)),
    ("target-algo", edit("algo: bc", "algo: ppo"), ("target.algo",)),
    ("agents-algo", edit("algos: [bc]", "algos: [bc, dqn]"), ("agents.algos",)),
    ("name-traversal", edit("name: tiny\n", "name: x/../../elsewhere\n"), ("name:", "invalid run name")),
    ("name-newline", edit("name: tiny\n", 'name: "tiny\\n"\n'), ("name:", "invalid run name")),
    ("name-absolute", edit("name: tiny\n", "name: /etc/cron.d/x\n"), ("name:", "invalid run name")),
    ("duplicate-top", lambda: VALID + "seed: 7\n", ("seed", "given twice")),
    (
        "duplicate-nested",
        edit("    scale: 0.05\n", "    scale: 0.05\n    scale: 50.0\n"),
        ("synthesize.guidance.scale", "given twice"),
    ),
    ("unknown-key", edit("  shards: 3\n", "  shards: 3\n  shard_count: 9\n"), ("synthesize.shard_count",)),
    ("evil-env", edit("env: Hopper-v5", f"env: '{EVIL_ENV_ID}'"), ("source.env", "not a registered id")),
    ("recipe", edit("recipe: random", "recipe: sac-expert"), ("source.recipe",)),
    ("negative-transitions", edit("transitions: 300", "transitions: -300"), ("synthesize.transitions",)),
    ("zero-shards", edit("shards: 3", "shards: 0"), ("synthesize.shards",)),
    ("negative-steps", edit("  steps: 20\n  conditions", "  steps: -1\n  conditions"), ("agents.steps",)),
    ("seed-float", edit("seed: 0", "seed: 0.5"), ("seed", "expected int")),
    ("seed-list-dup", edit("seeds: [0]", "seeds: [0, 0]"), ("agents.seeds[1]", "given twice")),
    ("dataset-name", edit("name: tiny/syn", "name: ../../outside"), ("synthesize.name",)),
    ("source-ref-minari", edit("recipe: random", "ref: 'minari:../../etc/x-v0'"), ("source",)),
    ("source-ref-version", edit("recipe: random", "ref: 'tiny/src@0'"), ("source.ref", "version")),
    ("kind", edit("kind: transition", "kind: world-model"), ("generator.kind", "cannot be guided")),
    ("horizon-zero", edit("horizons: [1]", "horizons: [1, 0]"), ("fidelity.horizons[1]",)),
    ("python-tag", edit("seed: 0", "seed: !!python/object/apply:os.system ['true']"), ("not valid yaml",)),
]


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    runs, catalog = tmp_path / "runs", tmp_path / "catalog"
    runs.mkdir()
    catalog.mkdir()
    return runs, catalog


@pytest.mark.parametrize(("case", "make", "expect"), CASES, ids=[c[0] for c in CASES])
def test_a_hostile_config_is_refused_at_load(
    case: str,
    make: Callable[[], str],
    expect: tuple[str, ...],
    tmp_path: Path,
    folders: tuple[Path, Path],
) -> None:
    runs, catalog = folders
    config = tmp_path / f"{case}.yaml"
    config.write_text(make())
    args = ["run", str(config), "--runs", str(runs), "--catalog", str(catalog)]
    outcome = assert_refused(args, cwd=tmp_path, watch=[runs, catalog], expect=(config.name, *expect))
    assert outcome.seconds < MAX_SECONDS, f"{outcome.seconds:.1f} s: something started"
    assert not (tmp_path / "elsewhere").exists()


def test_the_valid_base_config_loads(tmp_path: Path) -> None:
    """The cases above fail for the one thing each changes, not for something in the base."""
    from rlsynth.pipeline.config import load_config

    p = tmp_path / "valid.yaml"
    p.write_text(VALID)
    assert load_config(p).name == "tiny"


def test_an_address_with_nothing_listening_fails_in_seconds(
    tmp_path: Path, folders: tuple[Path, Path]
) -> None:
    runs, catalog = folders
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    config = tmp_path / "valid.yaml"
    config.write_text(VALID)
    args = [
        "run",
        str(config),
        "--runs",
        str(runs),
        "--catalog",
        str(catalog),
        "--address",
        f"127.0.0.1:{port}",
    ]
    outcome = assert_refused(args, cwd=tmp_path, watch=[runs, catalog], expect=f"127.0.0.1:{port}")
    assert "no ray cluster answers" in outcome.output.lower()
    assert outcome.seconds < MAX_SECONDS
