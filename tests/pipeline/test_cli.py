"""The real ``rlsynth`` command in a subprocess, tiny budgets: the DESIGN.md contracts and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from processes import run_cli

SHOW_KEYS = {"name", "version", "episodes", "transitions", "content_hash", "env_id", "lineage", "stats"}


def rlsynth(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = run_cli(*args, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "RLSYNTH_CATALOG": str(tmp_path / "cat"),
        "MINARI_DATASETS_PATH": str(tmp_path / "m"),
    }


def test_make_list_show_verify_export_import(tmp_path: Path, env: dict[str, str]) -> None:
    made = as_json(
        rlsynth(
            "datasets",
            "make",
            "random",
            "--env",
            "Hopper-v5",
            "--name",
            "hop/rand",
            "--transitions",
            "300",
            "--seed",
            "1",
            "--quiet",
            "--json",
            env=env,
        )
    )
    assert made.keys() >= SHOW_KEYS and made["transitions"] == 300 and made["version"] == 1
    assert made["minari_id"] == "rlsynth/hop/rand-v1"
    assert made["lineage"]["recipe"]["recipe"] == "random" and made["lineage"]["recipe"]["seed"] == 1

    listed = as_json(rlsynth("datasets", "list", "--json", env=env))
    assert [r["ref"] for r in listed] == ["hop/rand@1"] and listed[0].keys() >= SHOW_KEYS
    shown = as_json(rlsynth("datasets", "show", "hop/rand", "--json", env=env))
    assert shown["content_hash"] == made["content_hash"] and shown["env_id"] == "Hopper-v5"
    verified = as_json(rlsynth("datasets", "verify", "hop/rand@1", "--json", env=env))
    assert verified["ok"] is True and verified["content_hash"] == made["content_hash"]

    h5 = tmp_path / "out.hdf5"
    rlsynth("datasets", "export", "hop/rand@1", "--format", "hdf5", "--out", str(h5), env=env)
    rlsynth("datasets", "export", "hop/rand@1", "--format", "minari", "--out", "mine/rand-v3", env=env)
    from_h5 = as_json(rlsynth("datasets", "import", str(h5), "--name", "from-h5", "--json", env=env))
    from_minari = as_json(
        rlsynth(
            "datasets",
            "import",
            "minari:mine/rand-v3",
            "--name",
            "from-minari",
            "--tag",
            "origin=minari",
            "--json",
            env=env,
        )
    )
    assert from_h5["content_hash"] == from_minari["content_hash"] == made["content_hash"]
    assert from_minari["tags"] == {"origin": "minari"}
    src = from_h5["lineage"]["sources"][0]
    assert src["kind"] == "hdf5" and len(src["sha256"]) == 64 and src["content_hash"] == made["content_hash"]
    again = as_json(rlsynth("datasets", "import", "hop/rand@1", "--name", "hop/rand", "--json", env=env))
    assert again["version"] == 2 and again["lineage"]["sources"][0]["ref"] == "hop/rand@1"

    human = rlsynth("datasets", "show", "hop/rand@1", env=env).stdout
    assert "300 transitions" in human and "content hash sha256:" in human


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    return lines[-1]


def test_errors_are_one_line_and_non_zero(tmp_path: Path, env: dict[str, str]) -> None:
    assert "no dataset named 'nope'" in _error_line(rlsynth("datasets", "show", "nope", env=env, check=False))
    assert "invalid dataset name" in _error_line(
        rlsynth("datasets", "import", "x.hdf5", "--name", "../up", env=env, check=False)
    )
    assert "no such file" in _error_line(
        rlsynth("datasets", "import", str(tmp_path / "none.hdf5"), "--name", "x", env=env, check=False)
    )
    assert "cannot be made" in _error_line(
        rlsynth(
            "datasets", "make", "random", "--env", "Nope-v0", "--name", "x", "--quiet", env=env, check=False
        )
    )
    usage = rlsynth("datasets", "make", "expert", "--env", "Hopper-v5", "--name", "x", env=env, check=False)
    assert (
        usage.returncode == 2 and "Invalid value for '{random|sac-medium-replay|sac-medium}'" in usage.stderr
    )
    assert not (tmp_path / "cat").exists() or not any(p.is_file() for p in (tmp_path / "cat").rglob("*"))


def test_export_never_overwrites_and_verify_fails_on_damage(tmp_path: Path, env: dict[str, str]) -> None:
    rlsynth(
        "datasets",
        "make",
        "random",
        "--env",
        "Hopper-v5",
        "--name",
        "t",
        "--transitions",
        "50",
        "--quiet",
        "--no-minari",
        env=env,
    )
    target = tmp_path / "exists.hdf5"
    target.write_bytes(b"keep")
    proc = rlsynth("datasets", "export", "t", "--format", "hdf5", "--out", str(target), env=env, check=False)
    assert "already exists" in _error_line(proc) and target.read_bytes() == b"keep"
    bad_id = rlsynth(
        "datasets", "export", "t", "--format", "minari", "--out", "noversion", env=env, check=False
    )
    assert "invalid Minari dataset id" in _error_line(bad_id)
    part = next((tmp_path / "cat").rglob("part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = rlsynth("datasets", "verify", "t", "--json", env=env, check=False)
    assert proc.returncode == 1 and as_json(proc)["ok"] is False
    # The first export cached the (checked) decoded version; without the cache the damage stops the read.
    no_cache = {**env, "RLSYNTH_CACHE": "off"}
    assert "checksum mismatch" in _error_line(
        rlsynth(
            "datasets",
            "export",
            "t",
            "--format",
            "hdf5",
            "--out",
            str(tmp_path / "new.hdf5"),
            env=no_cache,
            check=False,
        )
    )
    assert not (tmp_path / "new.hdf5").exists()


def test_sac_recipe_stores_its_agent(tmp_path: Path, env: dict[str, str]) -> None:
    made = as_json(
        rlsynth(
            "datasets",
            "make",
            "sac-medium",
            "--env",
            "Hopper-v5",
            "--name",
            "med",
            "--steps",
            "150",
            "--warmup-steps",
            "50",
            "--transitions",
            "60",
            "--quiet",
            "--json",
            env=env,
        )
    )
    assert "agent.d3" in made["files"] and made["transitions"] == 60
    out = tmp_path / "agent.d3"
    rlsynth("datasets", "export-file", "med", "agent.d3", "--out", str(out), env=env)
    from rlsynth.datasets.d3rlpy_setup import import_d3rlpy

    agent = import_d3rlpy().load_learnable(str(out))
    assert agent.predict(__import__("numpy").zeros((1, 11), "float32")).shape == (1, 3)


def test_evaluate_records_fidelity_without_touching_the_data(tmp_path: Path, env: dict[str, str]) -> None:
    made = as_json(
        rlsynth(
            "datasets",
            "make",
            "random",
            "--env",
            "HalfCheetah-v5",
            "--name",
            "hc",
            "--transitions",
            "120",
            "--quiet",
            "--no-minari",
            "--json",
            env=env,
        )
    )
    png = tmp_path / "fid.png"
    res = as_json(
        rlsynth(
            "datasets",
            "evaluate",
            "hc",
            "--horizons",
            "1,4",
            "--windows",
            "8",
            "--plot",
            str(png),
            "--reference",
            "hc@1",
            "--json",
            env=env,
        )
    )
    one = res["one_step"]
    assert {
        "obs_mse",
        "obs_mse_normalised",
        "reward_mae",
        "terminal_agreement",
        "rows",
        "unrecoverable_rows",
        "obs_mse_normalised_all_rows",
        "penetration_over_1cm",
    } <= one.keys()
    assert one["obs_mse_normalised"] <= 1e-8 and one["terminal_agreement"] == 1.0
    text = rlsynth("datasets", "evaluate", "hc", "--horizons", "1", "--windows", "4", "--plot", str(png),
                   "--no-store", env=env).stdout  # fmt: skip
    pct = f"{one['penetration_over_1cm']:.1%}"
    assert f"states into contact by > 1 cm: {pct}" in text
    assert set(res["horizons"]) == {"1", "4"} and "policy_log_likelihood" in res and "novelty" in res
    assert png.read_bytes()[:4] == b"\x89PNG"
    shown = as_json(rlsynth("datasets", "show", "hc", "--json", env=env))
    assert shown["fidelity"]["one_step"] == one
    verified = as_json(rlsynth("datasets", "verify", "hc", "--json", env=env))
    assert verified["ok"] and verified["content_hash"] == made["content_hash"]
    bad = rlsynth("datasets", "evaluate", "hc", "--horizons", "x", env=env, check=False)
    assert bad.returncode == 2 and "--horizons" in bad.stderr
    no_oracle = rlsynth("datasets", "evaluate", "hc", "--env", "Reacher-v5", env=env, check=False)
    assert "no simulator oracle for 'Reacher-v5'" in _error_line(no_oracle)


def test_world_model_train_sample_evaluate(tmp_path: Path, env: dict[str, str]) -> None:
    rlsynth(
        "datasets",
        "make",
        "random",
        "--env",
        "HalfCheetah-v5",
        "--name",
        "hc",
        "--transitions",
        "400",
        "--quiet",
        "--no-minari",
        env=env,
    )
    out = tmp_path / "wm"
    trained = as_json(
        rlsynth(
            "generator",
            "train",
            "--data",
            "hc@1",
            "--kind",
            "world-model",
            "--out",
            str(out),
            "--steps",
            "60",
            "--quiet",
            "--json",
            env=env,
        )
    )
    assert trained["steps"] == 60 and trained["resumed_from"] == 0
    again = as_json(
        rlsynth(
            "generator",
            "train",
            "--data",
            "hc@1",
            "--kind",
            "world-model",
            "--out",
            str(out),
            "--steps",
            "60",
            "--quiet",
            "--json",
            env=env,
        )
    )
    assert again["resumed_from"] == 60  # finished runs are not redone
    made = as_json(
        rlsynth(
            "generator",
            "sample",
            str(out),
            "--n-transitions",
            "150",
            "--name",
            "hc/wm",
            "--horizon",
            "8",
            "--seed",
            "5",
            "--json",
            env=env,
        )
    )
    assert made["transitions"] == 150
    lin = made["lineage"]
    assert lin["generator"]["kind"] == "world-model" and lin["generator"]["checkpoint_hash"].startswith(
        "sha256:"
    )
    assert lin["seeds"] == {"sample": 5} and lin["sources"][0]["ref"] == "hc@1"
    assert lin["sampling"]["horizon"] == 8
    twin = as_json(
        rlsynth(
            "generator",
            "sample",
            str(out),
            "--n-transitions",
            "150",
            "--name",
            "hc/wm",
            "--horizon",
            "8",
            "--seed",
            "5",
            "--json",
            env=env,
        )
    )
    assert twin["version"] == 2 and twin["content_hash"] == made["content_hash"]
    res = as_json(
        rlsynth(
            "datasets",
            "evaluate",
            "hc/wm",
            "--reference",
            "hc@1",
            "--horizons",
            "1",
            "--windows",
            "4",
            "--plot",
            str(tmp_path / "f.png"),
            "--json",
            env=env,
        )
    )
    assert res["one_step"]["obs_mse_normalised"] > 1e-6  # a learned model is not the simulator
    bad = rlsynth(
        "generator",
        "train",
        "--data",
        "hc@1",
        "--kind",
        "world-model",
        "--preset",
        "huge",
        "--out",
        str(tmp_path / "x"),
        env=env,
        check=False,
    )
    assert "unknown preset 'huge'" in _error_line(bad)
    missing = rlsynth(
        "generator",
        "sample",
        str(tmp_path / "nothing"),
        "--n-transitions",
        "5",
        "--name",
        "x",
        env=env,
        check=False,
    )
    assert "no such generator folder" in _error_line(missing)


def test_diffusion_and_autoregressive_generators_from_the_cli(tmp_path: Path, env: dict[str, str]) -> None:
    rlsynth(
        "datasets",
        "make",
        "random",
        "--env",
        "HalfCheetah-v5",
        "--name",
        "hc",
        "--transitions",
        "300",
        "--quiet",
        "--no-minari",
        env=env,
    )
    traj, ar = tmp_path / "traj", tmp_path / "ar"
    rlsynth(
        "generator",
        "train",
        "--data",
        "hc@1",
        "--kind",
        "trajectory",
        "--out",
        str(traj),
        "--steps",
        "3",
        "--quiet",
        env=env,
    )
    bad = rlsynth(
        "generator",
        "train",
        "--data",
        "hc@1",
        "--kind",
        "trajectory",
        "--out",
        str(tmp_path / "x"),
        "--refiner",
        str(traj),
        env=env,
        check=False,
    )
    assert bad.returncode == 2 and "only the autoregressive kind takes a refiner" in bad.stderr
    args = ["--kind", "trajectory", "--out", str(tmp_path / "y"), "--steps", "3", "--budget-minutes", "2"]
    capped = rlsynth("generator", "train", "--data", "hc@1", *args, "--json", "--quiet", env=env)
    assert json.loads(capped.stdout)["steps"] == 3  # a budget plans under --steps as the cap
    assert json.loads((tmp_path / "y" / "config.json").read_text())["train"]["budget_s"] == 120.0
    rlsynth(
        "generator",
        "train",
        "--data",
        "hc@1",
        "--kind",
        "autoregressive",
        "--out",
        str(ar),
        "--steps",
        "3",
        "--refiner",
        str(traj),
        "--quiet",
        env=env,
    )
    made = as_json(
        rlsynth(
            "generator",
            "sample",
            str(traj),
            "--n-transitions",
            "40",
            "--name",
            "hc/traj",
            "--steps",
            "2",
            "--json",
            env=env,
        )
    )
    assert made["transitions"] == 40 and made["lineage"]["generator"]["kind"] == "trajectory"
    assert made["lineage"]["sampling"]["steps"] == 2
    model_cfg = json.loads((traj / "config.json").read_text())["model"]
    assert made["lineage"]["sampling"]["churn"] == model_cfg["s_churn"]
    other = "0" if model_cfg["s_churn"] else "5"  # whichever differs from the model's setting
    churned = as_json(rlsynth("generator", "sample", str(traj), "--n-transitions", "40", "--name", "hc/traj",
                              "--steps", "2", "--churn", other, "--json", env=env))  # fmt: skip
    assert churned["lineage"]["sampling"]["churn"] == float(other)
    assert churned["content_hash"] != made["content_hash"]  # the option reaches the sampler
    assert made["lineage"]["sampling"]["polish"] == model_cfg["polish"]  # polished by default
    polished = as_json(rlsynth("generator", "sample", str(traj), "--n-transitions", "40", "--name", "hc/traj",
                               "--steps", "2", "--polish", "3", "--json", env=env))  # fmt: skip
    assert polished["lineage"]["sampling"]["polish"] == 3
    assert polished["content_hash"] != made["content_hash"]
    drafted = as_json(
        rlsynth(
            "generator",
            "sample",
            str(ar),
            "--n-transitions",
            "40",
            "--name",
            "hc/ar",
            "--sigma-start",
            "0.3",
            "--steps",
            "1",
            "--temperature",
            "0.7",
            "--json",
            env=env,
        )
    )
    assert drafted["lineage"]["sampling"]["temperature"] == 0.7
    default = as_json(rlsynth("generator", "sample", str(ar), "--n-transitions", "40", "--name", "hc/ar",
                              "--sigma-start", "0.3", "--steps", "1", "--json", env=env))  # fmt: skip
    assert default["lineage"]["sampling"]["temperature"] == 0.5  # the value used, not null
    assert default["content_hash"] != drafted["content_hash"]  # the option reaches the drafter
    not_ar = rlsynth("generator", "sample", str(traj), "--n-transitions", "5", "--name", "hc/t",
                     "--temperature", "0.5", env=env, check=False)  # fmt: skip
    assert not_ar.returncode == 2 and "applies to autoregressive generators only" in not_ar.stderr
    refined_polished = as_json(rlsynth("generator", "sample", str(ar), "--n-transitions", "40", "--name",
                                       "hc/ar", "--sigma-start", "0.3", "--steps", "1", "--polish", "2",
                                       "--json", env=env))  # fmt: skip
    assert refined_polished["lineage"]["sampling"]["polish"] == 2
    assert refined_polished["content_hash"] != default["content_hash"]  # it reaches the refinement
    versions = len(as_json(rlsynth("datasets", "list", "--json", env=env)))
    raw_polish = rlsynth("generator", "sample", str(ar), "--n-transitions", "40", "--name", "hc/ar",
                         "--sigma-start", "0", "--polish", "2", env=env, check=False)  # fmt: skip
    assert raw_polish.returncode == 1 and "raw drafts (sigma_start 0) are not refined" in raw_polish.stderr
    assert len(as_json(rlsynth("datasets", "list", "--json", env=env))) == versions  # nothing written
    refiner = drafted["lineage"]["generator"]["refiner"]
    assert refiner["checkpoint_hash"].startswith("sha256:") and refiner["folder"] == str(traj.resolve())
    assert drafted["transitions"] == 40


def test_cli_generator_kinds_match_the_registry() -> None:
    from rlsynth.generators.api import KINDS
    from rlsynth.pipeline.cli_common import GENERATOR_KINDS

    assert tuple(GENERATOR_KINDS) == tuple(KINDS)


def test_agent_train_and_guided_sampling(tmp_path: Path, env: dict[str, str]) -> None:
    from rlsynth.datasets.sources import file_sha256

    rlsynth("datasets", "make", "random", "--env", "Hopper-v5", "--name", "hop", "--transitions", "300",
            "--quiet", "--no-minari", env=env)  # fmt: skip
    agent = tmp_path / "a.d3"
    made = as_json(rlsynth("agent", "train", "--algo", "iql", "--data", "hop@1", "--steps", "20",
                           "--out", str(agent), "--quiet", "--json", env=env))  # fmt: skip
    assert made["algo"] == "iql" and agent.is_file()
    meta = json.loads(Path(str(agent) + ".json").read_text())
    assert (
        meta["data"]["data"][0]["ref"] == "hop@1"
        and meta["steps"] == 20
        and meta["d3rlpy_config"]["expectile"] == 0.7
    )
    before = agent.read_bytes()
    again = rlsynth("agent", "train", "--algo", "bc", "--data", "hop@1", "--steps", "5", "--out", str(agent),
                    env=env, check=False)  # fmt: skip
    assert again.returncode == 1 and "never overwritten" in again.stderr and agent.read_bytes() == before
    for bad, code, msg in [
        (["--algo", "ppo"], 2, "Invalid value for '--algo'"),
        (["--algo", "bc", "--data", "nope@1"], 1, "nope"),
        (["--algo", "bc", "--out", str(tmp_path / "x.pt")], 1, "agent files end in .d3"),
    ]:
        args = {"--algo": "bc", "--data": "hop@1", "--out": str(tmp_path / "b.d3")}
        args.update(dict(zip(bad[::2], bad[1::2], strict=True)))
        flat = [x for kv in args.items() for x in kv]
        proc = rlsynth("agent", "train", *flat, "--steps", "5", "--quiet", env=env, check=False)
        assert proc.returncode == code and msg in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "b.d3").exists() and not (tmp_path / "x.pt").exists()
    mixed = as_json(rlsynth("agent", "train", "--algo", "td3bc", "--data", "hop@1", "--mix", "hop@1:8",
                            "--batch-size", "32", "--steps", "4", "--out", str(tmp_path / "m.d3"), "--quiet",
                            "--json", env=env))  # fmt: skip
    assert [c["rows_per_batch"] for c in mixed["mixture"]] == [24, 8]
    for spec, msg in (("hop@1", "not NAME@N:ROWS"), ("hop@1:300", "--data needs at least one")):
        proc = rlsynth("agent", "train", "--algo", "bc", "--data", "hop@1", "--mix", spec, "--steps", "2",
                       "--out", str(tmp_path / "c.d3"), env=env, check=False)  # fmt: skip
        assert proc.returncode == 2 and msg in proc.stderr and not (tmp_path / "c.d3").exists()
    scored = as_json(rlsynth("agent", "eval", str(agent), "--episodes", "2", "--json", env=env))
    assert scored["env_id"] == "Hopper-v5" and len(scored["returns"]) == 2
    assert scored["reference"]["source"].startswith("D4RL Hopper") and scored["score_mean"] is not None
    wrong = rlsynth("agent", "eval", str(agent), "--env", "HalfCheetah-v5", env=env, check=False)
    assert wrong.returncode == 1 and "agent expects observations [11]" in wrong.stderr
    traj, wm = tmp_path / "traj", tmp_path / "wm"
    for kind, out in (("trajectory", traj), ("world-model", wm)):
        rlsynth("generator", "train", "--data", "hop@1", "--kind", kind, "--out", str(out), "--steps", "3",
                "--quiet", env=env)  # fmt: skip
    terms = ["--guidance", "policy", "--policy", str(agent), "--scale", "0.2",
             "--guidance", "dynamics", "--world-model", str(wm)]  # fmt: skip
    guided = as_json(rlsynth("generator", "sample", str(traj), "--n-transitions", "30", "--name", "hop/g",
                             "--steps", "3", *terms, "--json", env=env))  # fmt: skip
    spec = guided["lineage"]["guidance"]["terms"]
    assert [t["term"] for t in spec] == ["policy", "dynamics"] and spec[0]["scale"] == 0.2
    assert spec[0]["target"]["sha256"] == file_sha256(agent) and spec[0]["target"]["kind"] == "iql"
    assert spec[1]["world_model"]["checkpoint_hash"].startswith("sha256:")
    assert guided["transitions"] == 30
    failures = [
        (["--guidance", "policy"], 1, "policy guidance needs a target agent"),
        (["--policy", str(agent)], 2, "only through --guidance policy"),
        (["--guidance", "dynamics"], 1, "need a world model"),
        (["--guidance", "dynamics", "--world-model", str(traj)], 1, "not a world model"),
        (["--guidance", "policy", "--policy", str(tmp_path / "missing.d3")], 1, "no such agent file"),
    ]
    for args, code, msg in failures:
        proc = rlsynth("generator", "sample", str(traj), "--n-transitions", "10", "--name", "hop/bad", *args,
                       env=env, check=False)  # fmt: skip
        assert proc.returncode == code and msg in proc.stderr, proc.stderr
    listed = as_json(rlsynth("datasets", "list", "--json", env=env))
    assert "hop/bad" not in {d["name"] for d in listed}
    wm_guided = rlsynth("generator", "sample", str(wm), "--n-transitions", "10", "--name", "hop/w",
                        "--guidance", "policy", "--policy", str(agent), env=env, check=False)  # fmt: skip
    assert wm_guided.returncode == 2 and "steered by --policy" in wm_guided.stderr
    wm_churn = rlsynth("generator", "sample", str(wm), "--n-transitions", "10", "--name", "hop/w",
                       "--churn", "5", env=env, check=False)  # fmt: skip
    assert wm_churn.returncode == 2 and "applies to diffusion kinds only" in wm_churn.stderr
    wm_polish = rlsynth("generator", "sample", str(wm), "--n-transitions", "10", "--name", "hop/w",
                        "--polish", "3", env=env, check=False)  # fmt: skip
    assert wm_polish.returncode == 2 and "applies to diffusion kinds only" in wm_polish.stderr


def test_agent_pgd_runs_the_loop_warm_started_and_refuses_bad_options(
    tmp_path: Path, env: dict[str, str]
) -> None:
    rlsynth("datasets", "make", "random", "--env", "Hopper-v5", "--name", "hop", "--transitions", "300",
            "--quiet", "--no-minari", env=env)  # fmt: skip
    traj = tmp_path / "traj"
    rlsynth("generator", "train", "--data", "hop@1", "--kind", "trajectory", "--out", str(traj),
            "--steps", "3", "--quiet", env=env)  # fmt: skip
    loop = ["agent", "pgd", "--generator", str(traj), "--data", "hop@1", "--name", "hop/pgd",
            "--agent-steps", "6", "--regenerate-every", "2", "--transitions", "40", "--steps", "2",
            "--polish", "0"]  # fmt: skip
    warm = ["--regenerate", "warm", "--warm-sigma", "0.5", "--warm-polish", "0"]
    out = as_json(rlsynth(*loop, "--out", str(tmp_path / "run"), *warm, "--quiet", "--json", env=env))
    assert [r["sigma_start"] for r in out["rounds"]] == [None, None, 0.5]
    assert Path(out["agent"]).is_file()
    shown = as_json(rlsynth("datasets", "show", "hop/pgd@3", "--json", env=env))
    assert shown["lineage"]["sampling"]["warm_start"]["from"] == "hop/pgd@2"
    for bad, code, msg in [
        (["--regenerate", "tepid"], 2, "Invalid value for '--regenerate'"),
        (["--warm-sigma", "1"], 1, "regenerate is cold: warm_sigma, warm_steps and warm_polish need warm"),
        (["--regenerate", "warm", "--warm-z", "0"], 2, "--warm-z"),
    ]:
        proc = rlsynth(*loop, "--out", str(tmp_path / "bad"), *bad, env=env, check=False)
        assert proc.returncode == code and msg in proc.stderr, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) <= 3 and "Traceback" not in proc.stderr and not (tmp_path / "bad").exists()
