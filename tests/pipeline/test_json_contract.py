"""Every documented ``--json`` key of the reporting commands, on tiny data (scripts read these keys).

In-process through the click group (the output is the same as the console command's; test_cli.py
covers the subprocess path and exit codes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import random_hopper, tiny_agent

from rlsynth.datasets.catalog import Catalog

SHOW_KEYS = {"name", "version", "episodes", "transitions", "content_hash", "env_id", "lineage", "stats"}
ONE_STEP_KEYS = {
    "obs_mse",
    "obs_mse_normalised",
    "reward_mae",
    "terminal_agreement",
    "rows",
    "unrecoverable_rows",
    "obs_mse_normalised_all_rows",
}
EVALUATE_KEYS = {"one_step", "horizons", "policy_log_likelihood", "novelty"}
LIKELIHOOD_KEYS = {"mean", "per_action_dim", "rows"}
AGENT_EVAL_KEYS = {"env_id", "episodes", "return_mean", "return_std", "normalised_score"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from rlsynth.datasets.d3rlpy_setup import import_d3rlpy

    root = tmp_path_factory.mktemp("json-contract")
    cat = Catalog(root / "catalog")
    cat.write("hop/rand", random_hopper())
    agent = root / "agent.d3"
    tiny_agent(import_d3rlpy().algos.TD3PlusBCConfig(batch_size=16), random_hopper(), 3, save_to=agent)
    return {"root": root, "catalog": root / "catalog", "agent": agent}


def run_json(*args: str) -> Any:
    res = CliRunner().invoke(__import__("rlsynth.pipeline.cli", fromlist=["cli"]).cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_datasets_show_list_verify(setup: dict[str, Path]) -> None:
    cat = str(setup["catalog"])
    shown = run_json("datasets", "show", "hop/rand@1", "--catalog", cat)
    assert shown.keys() >= SHOW_KEYS
    assert (shown["name"], shown["version"], shown["transitions"]) == ("hop/rand", 1, 300)
    assert shown["env_id"] == "Hopper-v5" and shown["content_hash"].startswith("sha256:")
    listed = run_json("datasets", "list", "--catalog", cat)
    assert isinstance(listed, list) and len(listed) == 1 and listed[0].keys() >= SHOW_KEYS
    verified = run_json("datasets", "verify", "hop/rand@1", "--catalog", cat)
    assert verified.keys() >= {"ok", "content_hash"} and verified["ok"] is True
    assert verified["content_hash"] == shown["content_hash"]


def test_datasets_evaluate(setup: dict[str, Path]) -> None:
    plot = setup["root"] / "fidelity.png"
    out = run_json("datasets", "evaluate", "hop/rand@1", "--catalog", str(setup["catalog"]),
                   "--policy", str(setup["agent"]), "--reference", "hop/rand@1", "--sample", "40",
                   "--windows", "4", "--horizons", "1,4", "--plot", str(plot), "--no-store")  # fmt: skip
    assert out.keys() >= EVALUATE_KEYS
    assert out["one_step"].keys() >= ONE_STEP_KEYS
    assert set(out["horizons"]) == {"1", "4"}
    assert out["policy_log_likelihood"].keys() >= LIKELIHOOD_KEYS
    assert out["novelty"] is not None


def test_agent_eval_has_the_normalised_score(setup: dict[str, Path]) -> None:
    out = run_json("agent", "eval", str(setup["agent"]), "--env", "Hopper-v5", "--episodes", "2")
    assert out.keys() >= AGENT_EVAL_KEYS
    assert out["episodes"] == 2 and out["env_id"] == "Hopper-v5"
    # D4RL's Hopper references: 100 · (R − R_random) / (R_expert − R_random).
    lo, hi = -20.272305, 3234.3
    assert out["normalised_score"] == pytest.approx(100 * (out["return_mean"] - lo) / (hi - lo))


def test_normalised_score_is_null_without_reference_returns() -> None:
    from rlsynth.offline_rl.evaluate import summarise

    res = summarise("Pendulum-v1", 0, [1.0, 3.0], [5, 5], None).to_json()
    assert res.keys() >= AGENT_EVAL_KEYS and res["normalised_score"] is None and res["return_mean"] == 2.0
