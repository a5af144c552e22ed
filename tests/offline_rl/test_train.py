"""Agent training on single datasets, unions and exact per-batch mixes; evaluation; the PGD loop."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import SharedGenerator, make_dataset, random_hopper, tiny_generator

from rlsynth.datasets.agents import AgentError, load_agent
from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.errors import RlsynthError
from rlsynth.datasets.types import Dataset, Transitions
from rlsynth.generators.options import SamplerSettings
from rlsynth.offline_rl.evaluate import D4RL_REFERENCES, Reference, evaluate_agent, reference_for, summarise
from rlsynth.offline_rl.mixture import Mixture
from rlsynth.offline_rl.pgd import PGDConfig, run_pgd
from rlsynth.offline_rl.train import ALGOS, build_algo, train_agent


def with_rewards(ds: Dataset, value: float, source: str) -> Dataset:
    """``ds`` with every reward set to ``value`` (marks where batch rows came from)."""
    t = ds.transitions
    cols = {c: np.array(getattr(t, c)) for c in Transitions.columns()}
    cols["rewards"] = np.full_like(cols["rewards"], value)
    return Dataset(info=ds.info, transitions=Transitions(**cols), source=source)


def test_mix_draws_exact_rows_per_component_in_every_batch() -> None:
    real, synth = with_rewards(make_dataset(0), 1.0, "real"), with_rewards(make_dataset(1), -1.0, "synth")
    mix = Mixture.of([(synth, 240), (real, 16)])
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch, origin = mix.sample(rng)
        assert batch.observations.shape == (256, 11)
        assert (batch.rewards[:, 0] == -1).sum() == 240 and (batch.rewards[:, 0] == 1).sum() == 16
        assert (origin == 0).sum() == 240 and (origin == 1).sum() == 16


def test_union_is_uniform_over_all_rows() -> None:
    a, b = with_rewards(make_dataset(0), 1.0, "a"), with_rewards(make_dataset(1, (30, 30)), -1.0, "b")
    mix = Mixture.union([a, b], 64)
    assert mix.transitions == a.n_transitions + b.n_transitions and mix.batch_size == 64
    rng = np.random.default_rng(0)
    share = np.mean([(mix.sample(rng)[0].rewards == 1).mean() for _ in range(300)])
    assert share == pytest.approx(a.n_transitions / mix.transitions, abs=0.02)


def test_batches_keep_true_next_observations_and_next_actions() -> None:
    ds = make_dataset()
    mix = Mixture.of([(ds, 8)])
    c = mix.components[0]
    t = ds.transitions
    np.testing.assert_array_equal(c.next_observations, t.next_observations)
    last = np.flatnonzero(np.append(t.episode_id[1:] != t.episode_id[:-1], True))
    assert (c.next_actions[last] == 0).all()
    np.testing.assert_array_equal(c.next_actions[0], t.actions[1])


def test_observation_stats_weight_components_by_rows() -> None:
    a, b = make_dataset(0), make_dataset(1)
    mean, std = Mixture.of([(a, 3), (b, 1)]).observation_stats()
    oa, ob = a.transitions.observations.astype(np.float64), b.transitions.observations.astype(np.float64)
    m = 0.75 * oa.mean(0) + 0.25 * ob.mean(0)
    v = 0.75 * (oa**2).mean(0) + 0.25 * (ob**2).mean(0) - m**2
    np.testing.assert_allclose(mean, m, rtol=1e-5)
    np.testing.assert_allclose(std, np.sqrt(v), rtol=1e-5)


def test_bad_mixes_are_clear() -> None:
    with pytest.raises(RlsynthError, match="at least one"):
        Mixture.of([])
    with pytest.raises(RlsynthError, match="rows per batch must be positive"):
        Mixture.of([(make_dataset(), 0)])
    cheetah = random_hopper()  # same spaces: fine; a different env is not
    from rlsynth.datasets.envs import env_info

    other = Dataset(info=env_info("HalfCheetah-v5"), transitions=cheetah.transitions, source="x")
    with pytest.raises(RlsynthError, match="other observation/action spaces"):
        Mixture.of([(cheetah, 4), (other, 4)])
    with pytest.raises(RlsynthError, match="mix rows add up to 8; the data needs one of the 8 rows"):
        Mixture.filled([cheetah], [(cheetah, 8)], 8)
    with pytest.raises(RlsynthError, match="other observation/action spaces"):
        Mixture.filled([cheetah], [(other, 4)], 8)
    filled = Mixture.filled([cheetah, cheetah], [(cheetah, 3)], 8)
    assert [c.rows for c in filled.components] == [5, 3]
    assert filled.components[0].size == 2 * cheetah.n_transitions
    with pytest.raises(RlsynthError, match="not the batch size"):
        build_algo("iql", Mixture.of([(cheetah, 4)]), 8, 0)


@pytest.mark.parametrize("algo", ALGOS)
def test_each_algorithm_trains_saves_and_loads(tmp_path: Path, algo: str) -> None:
    out = tmp_path / f"{algo}.d3"
    seen: list[int] = []
    run = train_agent(
        algo, random_hopper(), out, steps=6, batch_size=32, progress=False, every=3,
        callback=lambda step, _a: seen.append(step),
    )  # fmt: skip
    assert seen == [3, 6] and run.log.steps == [3, 6] and out.is_file()
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["algo"] == algo and meta["steps"] == 6 and meta["mixture"][0]["rows_per_batch"] == 32
    loaded = load_agent(out)
    obs = random_hopper().transitions.observations[:4]
    assert loaded.predict(obs).shape == (4, 3)
    with pytest.raises(RlsynthError, match="never overwritten"):
        train_agent(algo, random_hopper(), out, steps=1, batch_size=32, progress=False)


def test_training_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    obs = random_hopper().transitions.observations[:5]
    preds = []
    for i in range(2):
        train_agent("td3bc", random_hopper(), tmp_path / f"{i}.d3", steps=5, batch_size=32, progress=False)
        preds.append(load_agent(tmp_path / f"{i}.d3").predict(obs))
    np.testing.assert_array_equal(preds[0], preds[1])


def test_corrupt_and_incompatible_agent_files_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.d3"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(AgentError, match="not a d3rlpy agent file"):
        load_agent(bad)
    good = tmp_path / "good.d3"
    train_agent("bc", random_hopper(), good, steps=2, batch_size=16, progress=False)
    data = bytearray(good.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\0" * 64
    broken = tmp_path / "broken.d3"
    broken.write_bytes(bytes(data))
    (tmp_path / "broken.d3.json").write_bytes((tmp_path / "good.d3.json").read_bytes())
    with pytest.raises(AgentError, match="does not match the SHA-256"):
        load_agent(broken)
    from rlsynth.datasets.envs import env_info
    from rlsynth.guidance.spec import GuidanceConfig, build_guidance

    cheetah = env_info("HalfCheetah-v5")
    with pytest.raises(AgentError, match=r"agent expects observations \[11\] and 3 actions"):
        build_guidance(GuidanceConfig(terms=("policy",), policy=str(good)), cheetah)


def test_scores_against_hand_computed_values() -> None:
    ref = reference_for("HalfCheetah-v5")
    assert ref is not None and (ref.random, ref.expert) == D4RL_REFERENCES["HalfCheetah"]
    r = summarise("HalfCheetah-v5", 0, [1000.0, 3000.0], [1000, 1000], ref)
    assert r.return_mean == 2000 and r.return_std == 1000
    span = 12135.0 + 280.178953
    assert r.score_mean == pytest.approx(100 * (2000 + 280.178953) / span)
    assert r.score_std == pytest.approx(100 * 1000 / span)
    assert reference_for("Pusher-v5") is None
    info = replace(random_hopper().info, ref_min_score=0.0, ref_max_score=50.0)
    own = reference_for("Hopper-v5", info)
    assert own is not None and own.normalise(25.0) == 50.0 and own.source.startswith("dataset")


class ConstantAgent:
    """Acts with a fixed action: its Hopper return can be recomputed by hand with the simulator."""

    def __init__(self, action: np.ndarray) -> None:
        self.action = action

    def predict(self, obs: np.ndarray) -> np.ndarray:
        return np.repeat(self.action[None], len(obs), 0)


def test_evaluation_returns_match_a_hand_rollout() -> None:
    from rlsynth.datasets.envs import make_env

    agent = ConstantAgent(np.array([0.2, -0.1, 0.3], np.float32))
    res = evaluate_agent(agent, "Hopper-v5", episodes=2, seed=7, reference=Reference(0.0, 100.0, "test"))
    env = make_env("Hopper-v5")
    expected = []
    for i in range(2):
        env.reset(seed=7 + i)
        total, done = 0.0, False
        while not done:
            _, rew, term, trunc, _ = env.step(agent.action)
            total += float(rew)
            done = term or trunc
        expected.append(total)
    assert res.returns == pytest.approx(tuple(expected))
    assert res.score_mean == pytest.approx(np.mean(expected))  # reference 0..100: score = return


def test_pgd_loop_regenerates_at_the_right_steps_with_lineage(
    tmp_path: Path, shared_generator: SharedGenerator
) -> None:
    gen = shared_generator("trajectory", steps=5)
    cat = Catalog(str(tmp_path / "cat"))
    steps_seen: list[int] = []
    cfg = PGDConfig(algo="td3bc", steps=10, regenerate_every=4, synthetic_transitions=60, synthetic_rows=12,
                    real_rows=4)  # fmt: skip
    res = run_pgd(
        cfg, gen, random_hopper(), cat, "pgd/synth", tmp_path / "run", every=2, progress=False,
        callback=lambda s, _a: steps_seen.append(s),
    )  # fmt: skip
    assert [r.start_step for r in res.rounds] == [0, 4, 8]
    assert [r.version for r in res.rounds] == ["pgd/synth@1", "pgd/synth@2", "pgd/synth@3"]
    assert steps_seen == [2, 4, 6, 8, 10] and res.agent.is_file()
    first, second, third = (cat.manifest(r.version)["lineage"] for r in res.rounds)
    assert first["agent"] is None and first["guidance"] is None and first["producer"]["previous"] is None
    assert second["producer"]["previous"] == "pgd/synth@1" and third["producer"]["previous"] == "pgd/synth@2"
    target: dict[str, Any] = third["agent"]
    assert target["path"].endswith("step-8.d3")
    assert third["guidance"]["terms"][0]["target"]["sha256"] == target["sha256"]
    assert cat.read("pgd/synth@2").n_transitions == 60
    with pytest.raises(RlsynthError, match="exists"):
        run_pgd(cfg, gen, random_hopper(), cat, "pgd/synth", tmp_path / "run", progress=False)


def test_pgd_loop_drafts_with_an_autoregressive_generator_and_records_its_refiner(tmp_path: Path) -> None:
    traj = tiny_generator("trajectory", tmp_path / "traj", steps=5)
    ar = tiny_generator("autoregressive", tmp_path / "ar", steps=5, sigma_start=0.5)
    ar = replace(ar, config={**ar.config, "refiner": str(traj.folder)})  # as `--refiner` records it
    cat = Catalog(str(tmp_path / "cat"))
    cfg = PGDConfig(algo="td3bc", steps=6, regenerate_every=4, synthetic_transitions=60, synthetic_rows=12,
                    real_rows=4, sampler=SamplerSettings(polish=2))  # fmt: skip
    res = run_pgd(cfg, ar, random_hopper(), cat, "pgd/ar", tmp_path / "run", progress=False)
    first, second = (cat.manifest(r.version)["lineage"] for r in res.rounds)
    assert first["generator"]["kind"] == "autoregressive" and first["guidance"] is None
    assert first["producer"]["config"]["sampler"]["polish"] == 2 and first["sampling"]["polish"] == 2
    with pytest.raises(RlsynthError, match="polish must be a non-negative number of iterations, got -1"):
        replace(cfg, sampler=SamplerSettings(polish=-1))
    assert second["generator"]["refiner"]["checkpoint_hash"] == traj.checkpoint_hash
    assert second["guidance"]["terms"][0]["term"] == "policy" and cat.read("pgd/ar@2").n_transitions == 60


def test_pgd_initial_target_guides_round_zero(tmp_path: Path, shared_generator: SharedGenerator) -> None:
    from helpers import tiny_agent

    from rlsynth.datasets.d3rlpy_setup import import_d3rlpy
    from rlsynth.datasets.sources import file_sha256
    from rlsynth.guidance.spec import GuidanceConfig

    gen = shared_generator("trajectory", steps=5)
    cat = Catalog(str(tmp_path / "cat"))
    first_agent = tmp_path / "iql.d3"
    tiny_agent(import_d3rlpy().algos.IQLConfig(batch_size=16), random_hopper(), steps=5, save_to=first_agent)
    cfg = PGDConfig(algo="td3bc", steps=6, regenerate_every=4, synthetic_transitions=60, synthetic_rows=12,
                    real_rows=4, initial_target=str(first_agent))  # fmt: skip
    res = run_pgd(cfg, gen, random_hopper(), cat, "pgd/warm", tmp_path / "run", progress=False)
    first, second = (cat.manifest(r.version)["lineage"] for r in res.rounds)
    path, sha256 = str(first_agent.resolve()), file_sha256(first_agent)
    assert first["agent"] == {"role": "guidance target", "path": path, "sha256": sha256}
    assert first["guidance"]["terms"][0]["target"]["sha256"] == file_sha256(first_agent)
    assert second["agent"]["path"].endswith("step-4.d3")
    # A missing agent file is refused before anything is written; so is a target without policy guidance.
    with pytest.raises(RlsynthError, match="no such agent file"):
        run_pgd(replace(cfg, initial_target=str(tmp_path / "none.d3")), gen, random_hopper(), cat, "pgd/x",
                tmp_path / "run2", progress=False)  # fmt: skip
    assert not (tmp_path / "run2").exists() and cat.versions("pgd/x") == []
    with pytest.raises(RlsynthError, match="needs policy guidance"):
        replace(cfg, guidance=GuidanceConfig(terms=()))


def test_comparison_refuses_a_missing_warm_start_agent_before_any_job(tmp_path: Path) -> None:
    from rlsynth.guidance.spec import GuidanceConfig
    from rlsynth.offline_rl.compare import CompareConfig, Condition, PGDSpec, compare

    spec = PGDSpec(
        generator=str(tmp_path / "gen"), real="hop@1", name="cmp", initial_target=str(tmp_path / "x.d3")
    )
    cfg = CompareConfig(algos=("bc",), seeds=(0,), steps=2, catalog=str(tmp_path / "cat"))
    with pytest.raises(RlsynthError, match="no such agent file"):
        compare([Condition("real", data=("hop@1",)), Condition("pgd", pgd=spec)], cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RlsynthError, match="needs policy guidance"):
        replace(spec, guidance=GuidanceConfig(terms=()))


def test_comparison_runner_writes_table_json_and_curves(
    tmp_path: Path, shared_generator: SharedGenerator
) -> None:
    from rlsynth.offline_rl.compare import CompareConfig, Condition, PGDSpec, compare

    cat = Catalog(str(tmp_path / "cat"))
    cat.write("hop", random_hopper())
    cat.write("other", with_rewards(random_hopper(), 0.5, "other"))
    gen = shared_generator("trajectory", steps=5)
    pgd = PGDSpec(generator=str(gen.folder), real="hop@1", name="cmp", regenerate_every=2,
                  synthetic_transitions=40, synthetic_rows=12, real_rows=4)  # fmt: skip
    conditions = [
        Condition("real", data=("hop@1",)),
        Condition("mixed", data=("other@1",), mix=(("hop@1", 4),)),
        Condition("pgd", pgd=pgd),
    ]
    cfg = CompareConfig(algos=("bc",), seeds=(0, 1), steps=4, batch_size=16, eval_every=2, eval_episodes=1,
                        final_episodes=2, catalog=str(tmp_path / "cat"))  # fmt: skip
    report = compare(conditions, cfg, tmp_path / "out")
    assert len(report["runs"]) == 6
    assert all([p["step"] for p in r["curve"]] == [2, 4] for r in report["runs"])
    for row in report["aggregate"]:
        runs = [r for r in report["runs"] if r["condition"] == row["condition"]]
        assert row["metric"] == "normalised score" and row["seeds"] == 2
        assert row["mean"] == pytest.approx(np.mean([r["final"]["score_mean"] for r in runs]))
    assert cat.manifest("cmp/bc-s1@2")["lineage"]["producer"]["previous"] == "cmp/bc-s1@1"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| pgd |" in md and "| mixed |" in md and (tmp_path / "out" / "curves.png").stat().st_size > 0
    with pytest.raises(RlsynthError, match="not both or none"):
        Condition("bad")
