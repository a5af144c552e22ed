"""One synthesis path: ``generator sample``, a run's shard task and the PGD loop sample through
``offline_rl.synthesis.synthesize`` and record one lineage schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import random_hopper, tiny_agent, tiny_generator

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.sources import file_sha256, source_lineage
from rlsynth.generators.api import LoadedGenerator
from rlsynth.generators.options import SamplerSettings
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.offline_rl.synthesis import LINEAGE_KEYS, Shard, combine_shards, plan_synthesis, synthesize

SETTINGS = SamplerSettings(steps=2)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A catalog holding hop@1, a tiny trajectory generator and world model, and a BC agent file."""
    from rlsynth.datasets.d3rlpy_setup import import_d3rlpy

    root = tmp_path_factory.mktemp("synthesis")
    cat = Catalog(str(root / "cat"))
    cat.write("hop", random_hopper())
    agent = root / "bc.d3"
    tiny_agent(import_d3rlpy().algos.BCConfig(batch_size=16), random_hopper(), steps=5, save_to=agent)
    return {
        "root": root,
        "catalog": cat,
        "traj": tiny_generator("trajectory", root / "traj", steps=3),
        "wm": tiny_generator("world-model", root / "wm", steps=3),
        "agent": agent,
    }


def cli_sample(made: dict[str, Any], name: str, *args: str) -> dict[str, Any]:
    """``generator sample`` in-process (this checkout's code, whatever the installed one is)."""
    from rlsynth.pipeline.cli import cli

    folder = str(made["traj"].folder)
    argv = ["generator", "sample", folder, "--name", name, "--data", "hop@1", *args, "--json"]
    res = CliRunner().invoke(cli, ["--catalog", str(made["catalog"].root), *argv])
    assert res.exit_code == 0, res.output
    return dict(json.loads(res.output))


def shape(value: Any) -> Any:
    """The key structure of a lineage: dicts as their keys (recursively), lists item by item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return None


def source_of(cat: Catalog) -> dict[str, Any]:
    return source_lineage("hop@1", cat.read("hop@1"), cat)


def test_the_cli_and_the_library_call_make_the_same_version(made: dict[str, Any]) -> None:
    cat, gen = made["catalog"], made["traj"]
    by_cli = cli_sample(made, "same/cli", "--n-transitions", "40", "--seed", "3", "--steps", "2")
    source = cat.read("hop@1")
    lib = synthesize(gen, source, 40, SETTINGS, seed=3, source_ref=source_of(cat))
    ref = cat.write("same/lib", lib.dataset, lineage=lib.lineage)
    assert cat.manifest(ref)["content_hash"] == by_cli["content_hash"]
    cli_lineage = cat.manifest(by_cli["ref"])["lineage"]
    assert cli_lineage["producer"] == {"name": "generator sample"}
    assert {**cli_lineage, "producer": None} == {**cat.manifest(ref)["lineage"], "producer": None}
    other = synthesize(gen, source, 40, SETTINGS, seed=4)
    assert cat.manifest(cat.write("same/other", other.dataset))["content_hash"] != by_cli["content_hash"]


def test_every_producer_records_the_same_lineage_schema(made: dict[str, Any]) -> None:
    from rlsynth.offline_rl.pgd import PGDConfig, run_pgd
    from rlsynth.pipeline.run import SynthesisTask, _task_shard

    cat, gen, agent = made["catalog"], made["traj"], made["agent"]
    by_cli = cli_sample(made, "schema/cli", "--n-transitions", "30", "--steps", "2", "--guidance", "policy",
                        "--policy", str(agent))  # fmt: skip
    cli_lineage = cat.manifest(by_cli["ref"])["lineage"]

    guidance = GuidanceConfig(terms=("policy",), policy=str(agent))
    task = SynthesisTask(str(cat.root), str(gen.folder), "hop@1", 0, SETTINGS, guidance, shards=2,
                         source=source_of(cat))  # fmt: skip
    txn = cat.begin("schema/shards", cat.read("hop@1").info)
    results = [_task_shard(task, txn, i, 15, 1000 * i) for i in range(2)]
    assert [r["lineage"]["shards"] for r in results] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    ref = txn.commit(lineage=combine_shards([r["lineage"] for r in results]), expected_parts=2)
    shard_lineage = cat.manifest(ref)["lineage"]
    assert shard_lineage["shards"] == {"count": 2, "sizes": [15, 15]} and cat.read(ref).n_transitions == 30

    cfg = PGDConfig(algo="bc", steps=2, regenerate_every=1, synthetic_transitions=30, synthetic_rows=8,
                    real_rows=0, guidance=GuidanceConfig(terms=("policy",)), sampler=SETTINGS)  # fmt: skip
    res = run_pgd(cfg, gen, cat.read("hop@1"), cat, "schema/pgd", made["root"] / "pgd", progress=False,
                  real_lineage=source_of(cat))  # fmt: skip
    pgd_lineage = cat.manifest(res.rounds[1].version)["lineage"]  # round 1: guided by the loop's agent

    lineages = {"cli": cli_lineage, "shards": shard_lineage, "pgd": pgd_lineage}
    for who, lin in lineages.items():
        assert set(lin) - {"code_version"} == set(LINEAGE_KEYS), who  # the catalog adds code_version
        assert lin["agent"]["sha256"] == file_sha256(Path(lin["agent"]["path"])), who
        assert lin["sampling"]["steps"] == 2 and lin["sampling"]["n_transitions"] == 30, who
    # Byte-identical structure for the same settings: everything but the shard layout and the producer.
    trees = {who: shape({**lin, "shards": None, "producer": None}) for who, lin in lineages.items()}
    assert trees["cli"] == trees["shards"] == trees["pgd"]
    assert {lin["producer"]["name"] for lin in lineages.values()} == {"generator sample", "run", "pgd"}


def test_world_model_rollouts_record_the_acting_agent(made: dict[str, Any]) -> None:
    wm, agent = made["wm"], made["agent"]
    out = synthesize(wm, made["catalog"].read("hop@1"), 20, actor=agent)
    assert out.lineage["agent"] == {
        "role": "actor",
        "path": str(agent.resolve()),
        "sha256": file_sha256(agent),
    }
    assert out.lineage["guidance"] is None and out.lineage["sampling"] == {
        "n_transitions": 20,
        "horizon": 32,
        "warm_start": None,
    }


def bad_requests(gen: LoadedGenerator, wm: LoadedGenerator, agent: Path) -> list[tuple[dict[str, Any], str]]:
    return [
        ({"generator": gen, "n_transitions": 0}, "n_transitions must be a positive integer, got 0"),
        ({"generator": gen, "seed": "1"}, "seed must be an integer"),
        ({"generator": gen, "settings": {"steps": 2}}, "settings must be a SamplerSettings, got dict"),
        ({"generator": gen, "guidance": ("policy",)}, "guidance must be a GuidanceConfig, got tuple"),
        ({"generator": gen, "guidance": GuidanceConfig(terms=("policy",))}, "policy guidance needs a target"),
        ({"generator": gen, "actor": agent}, "an acting agent applies to world-model rollouts"),
        ({"generator": wm, "actor": agent.with_name("gone.d3")}, "no such agent file"),
        ({"generator": wm, "guidance": GuidanceConfig(terms=("dynamics",))}, "not by guidance"),
        ({"generator": gen, "refiner": gen}, "only autoregressive drafts take a refiner"),
        ({"generator": gen, "shard": "0/2"}, "shard must be a Shard"),
        ({"generator": "gen"}, "needs a loaded generator"),
    ]


def test_bad_requests_are_refused_in_one_line(made: dict[str, Any]) -> None:
    source = made["catalog"].read("hop@1")
    for request, message in bad_requests(made["traj"], made["wm"], made["agent"]):
        kw = {"n_transitions": 10, **request}
        gen = kw.pop("generator")
        with pytest.raises(RlsynthError) as e:
            synthesize(gen, source, kw.pop("n_transitions"), **kw)
        assert message in str(e.value) and "\n" not in str(e.value), (request, str(e.value))
    with pytest.raises(RlsynthError, match=r"^shard 2 of 2: need 0 ≤ index < count$"):
        Shard(2, 2)
    with pytest.raises(RlsynthError, match="sampled with other settings"):
        lin = synthesize(made["traj"], source, 10, SETTINGS, shard=Shard(0, 2)).lineage
        combine_shards([lin, {**lin, "shards": {"index": 1, "count": 2}, "seeds": {"sample": 9}}])


def test_a_plan_written_as_it_is_sampled_is_the_version_of_its_drawn_set(
    made: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlsynth.datasets import catalog as C

    cat, gen = made["catalog"], made["traj"]
    source = cat.read("hop@1")
    monkeypatch.setattr(C, "ROWS_PER_PART", 50)  # several parts, cut while chunks still come
    monkeypatch.setattr("rlsynth.generators.families.CHUNKS", {"trajectory": 4})
    plan = plan_synthesis(gen, source, 300, SETTINGS, seed=5)
    streamed = cat.manifest(plan.write(cat, "plan/streamed", tags={"t": 1}))
    drawn = plan.draw()
    whole = cat.manifest(cat.write("plan/whole", drawn.dataset, lineage=drawn.lineage, rows_per_part=50))
    assert len(streamed["parts"]) > 2 and streamed["parts"] == whole["parts"]
    assert streamed["content_hash"] == whole["content_hash"] and streamed["tags"] == {"t": 1}
    assert {**streamed["lineage"], "code_version": None} == {**whole["lineage"], "code_version": None}


def test_a_sampler_failing_midway_leaves_no_version(
    made: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlsynth.datasets import catalog as C
    from rlsynth.generators import families

    cat, gen = made["catalog"], made["traj"]
    monkeypatch.setattr(C, "ROWS_PER_PART", 20)
    monkeypatch.setattr(C, "cores", lambda: 1)  # parts written inline: on disk before the next chunk
    monkeypatch.setattr(families, "CHUNKS", {"trajectory": 4})
    plan = plan_synthesis(gen, cat.read("hop@1"), 300, SETTINGS)
    real = families.TrajectoryFamily.decode_block
    calls: list[int] = []

    staged: list[int] = []

    def dies_midway(self: Any, g: LoadedGenerator, raw: Any) -> Any:
        calls.append(1)
        if len(calls) == 8:
            # Parts were already written: the failure must take them away too.
            staged.append(len(list((Path(cat.root) / "plan" / "dies").rglob("part-*.parquet"))))
            raise RuntimeError("sampler died (injected)")
        return real(self, g, raw)

    monkeypatch.setattr(families.TrajectoryFamily, "decode_block", dies_midway)
    with pytest.raises(RuntimeError, match="injected"):
        plan.write(cat, "plan/dies")
    assert staged and staged[0] >= 1
    assert cat.versions("plan/dies") == []
    assert not list((Path(cat.root) / "plan" / "dies").rglob("part-*"))
