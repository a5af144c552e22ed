"""The Ray pipeline end to end on a local 2-CPU cluster, tiny budgets: every stage, resume, retries."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from processes import MARKER, cli_command, free_port, marked_processes, run_cli, stop_marked

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.sources import file_sha256
from rlsynth.pipeline.config import from_dict
from rlsynth.pipeline.run import FAIL_ONCE_ENV, run_pipeline, start_private_cluster, stop_private_cluster

TINY = {
    "name": "tiny",
    "source": {"recipe": "random", "env": "Hopper-v5", "transitions": 400, "name": "tiny/src"},
    "target": {"algo": "bc", "steps": 20},
    "generator": {"kind": "transition", "steps": 30},
    "synthesize": {"transitions": 300, "shards": 3, "name": "tiny/syn", "polish": 2},
    "fidelity": {"sample": 100, "horizons": [1]},
    "agents": {
        "algos": ["bc"],
        "seeds": [0],
        "steps": 20,
        "eval_every": 10,
        "eval_episodes": 1,
        "final_episodes": 1,
        "conditions": ["real", "synthetic", "mixed", "pgd"],
        "pgd_regenerate_every": 10,
        "pgd_transitions": 100,
    },
}


@pytest.fixture
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The private cluster ``rlsynth run`` starts (loopback, token, free ports), 2 CPUs; afterwards no
    process of it may be left."""
    fault = tmp_path_factory.mktemp("fault") / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, str(fault))  # workers inherit it: the first shard task fails once
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, value)
    cluster = start_private_cluster(num_cpus=2)
    try:
        yield
    finally:
        stop_private_cluster(cluster)
    assert not stop_marked(value), "Ray processes outlived the test's cluster"


def test_every_stage_runs_and_a_failed_shard_is_retried(ray_cluster: None, tmp_path: Path) -> None:
    cfg = from_dict(TINY)
    cat_uri = str(tmp_path / "cat")
    logs: list[str] = []
    m = run_pipeline(cfg, tmp_path / "runs" / "r1", catalog_uri=cat_uri, log=logs.append)
    assert Path(os.environ[FAIL_ONCE_ENV]).exists()  # one shard task did fail and was retried
    cat = Catalog(cat_uri)
    syn = m["stages"]["synthesize"]
    man = cat.manifest(syn["ref"])
    assert syn["rows"] == 300 and man["counts"]["transitions"] == 300 and len(man["parts"]) == 3
    assert cat.verify(syn["ref"])["ok"]
    assert man["lineage"]["generator"]["checkpoint_hash"] == m["stages"]["generator"]["checkpoint_hash"]
    assert man["lineage"]["guidance"]["options"]["terms"] == ["policy"]
    assert man["lineage"]["producer"]["synthesize"]["sampler"]["polish"] == 2
    assert man["lineage"]["sampling"]["polish"] == 2  # the shards sampled with it
    assert man["lineage"]["shards"] == {"count": 3, "sizes": [100, 100, 100]}
    assert man["lineage"]["agent"]["sha256"] == file_sha256(Path(m["stages"]["target"]["agent"]))
    agg = {r["condition"] for r in m["stages"]["agents"]["aggregate"]}
    assert agg == {"real", "synthetic", "mixed", "pgd"}
    report = (tmp_path / "runs" / "r1" / "report.md").read_text()
    assert syn["ref"] in report and "| pgd |" in report
    assert (tmp_path / "runs" / "r1" / "config.yaml").is_file()
    listed = run_cli("runs", "list", "--runs", str(tmp_path / "runs"), "--json", check=True)
    assert json.loads(listed.stdout) == [
        {"run": "r1", "path": str(tmp_path / "runs" / "r1"), "finished": True}
    ]
    shown = run_cli("runs", "show", "r1", "--runs", str(tmp_path / "runs"), check=True)
    assert syn["ref"] in shown.stdout
    missing = run_cli("runs", "show", "nope", "--runs", str(tmp_path / "runs"))
    assert missing.returncode == 1 and "no such run" in missing.stderr
    # A second run of the same config skips every stage.
    logs.clear()
    again = run_pipeline(cfg, tmp_path / "runs" / "r2", catalog_uri=cat_uri, log=logs.append)
    assert set(again["status"].values()) == {"cached"} and again["stages"]["synthesize"]["ref"] == syn["ref"]
    # A changed agents section re-runs only the agents stage.
    changed = from_dict({**TINY, "agents": {**TINY["agents"], "conditions": ["real"], "steps": 10}})
    third = run_pipeline(changed, tmp_path / "runs" / "r3", catalog_uri=cat_uri, log=logs.append)
    assert third["status"]["agents"] == "done" and third["status"]["synthesize"] == "cached"


def rlsynth(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command(*args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_killed_mid_synthesis_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    config = {**TINY, "synthesize": {**TINY["synthesize"], "transitions": 12_000, "shards": 4},
              "agents": {**TINY["agents"], "conditions": ["real"]}}  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    value = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in (FAIL_ONCE_ENV, "RAY_ADDRESS")} | {MARKER: value}
    killed_env = {**env, "RLSYNTH_CATALOG": str(tmp_path / "cat-a")}
    proc = rlsynth("run", str(path), "--runs", str(tmp_path / "a"), env=killed_env)
    deadline = time.time() + 240
    log: Path | None = None
    while time.time() < deadline:
        logs = list((tmp_path / "a").glob("*/run.log"))
        if logs and "[synthesize] running" in logs[0].read_text():
            log = logs[0]
            break
        time.sleep(0.5)
    assert log is not None, "the run never reached synthesis"
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any(v["name"] == "tiny/syn" for v in Catalog(str(tmp_path / "cat-a")).list())
    resumed = rlsynth("run", str(path), "--resume", str(log.parent), env=killed_env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    fresh_env = {**env, "RLSYNTH_CATALOG": str(tmp_path / "cat-b")}
    fresh = rlsynth("run", str(path), "--runs", str(tmp_path / "b"), env=fresh_env)
    out_b, _ = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, out_b
    a = json.loads((log.parent / "metrics.json").read_text())["stages"]["synthesize"]
    b = json.loads(next((tmp_path / "b").glob("*/metrics.json")).read_text())["stages"]["synthesize"]
    assert a["content_hash"] == b["content_hash"] and a["rows"] == 12_000
    assert "skipped" in log.read_text()  # earlier stages were not redone
    # Each run's private cluster is gone with it, the SIGKILLed one's included (Ray's reaper).
    assert not stop_marked(value), "Ray processes outlived their runs"


def test_ray_job_submit_to_a_real_head_puts_the_dataset_in_the_catalog(tmp_path: Path) -> None:
    """README's cluster setup, authentication on: a token in a 0600 file, ``RAY_AUTH_MODE=token``,
    ``ray start --head`` and ``ray job submit`` of the tiny config. The head stays on loopback with free
    ports only (this is a shared machine), and afterwards every process it started is gone."""
    bin_dir = Path(sys.executable).parent
    value = uuid.uuid4().hex
    temp = Path(tempfile.mkdtemp(prefix="rls-", dir="/tmp"))  # short: Ray's socket paths are limited
    token = temp / "auth_token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in (FAIL_ONCE_ENV, "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), MARKER: value,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback binding for a test on a shared machine
            "PATH": f"{bin_dir}:{env.get('PATH', '')}"}  # fmt: skip
    config = {**TINY, "agents": {**TINY["agents"], "conditions": ["real"]}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    dash = free_port()
    start = [str(bin_dir / "ray"), "start", "--head", f"--port={free_port()}", "--num-cpus=2",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             "--disable-usage-stats", f"--temp-dir={temp / 'ray'}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}"]  # fmt: skip
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", str(tmp_path), "--", "rlsynth", "run", "tiny.yaml",
                  "--catalog", str(tmp_path / "cat"), "--runs", str(tmp_path / "runs")]  # fmt: skip
        # The head's job agent can take a while to register after `ray start` returns: retry that error only.
        for _ in range(30):
            proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "ray: attached to the cluster at" in proc.stdout + proc.stderr  # the job's own cluster
        names = {v["name"] for v in Catalog(str(tmp_path / "cat")).list()}
        assert {"tiny/src", "tiny/syn"} <= names
        # A client without the token (auth off on its side, no token anywhere) is refused by the head.
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        no_token |= {"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
        refused = subprocess.run([*submit[:5], "--", "true"], env=no_token, capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
        assert refused.returncode != 0, refused.stdout[-1000:]
    finally:
        # SIGTERM first (Ray's processes clean up), then whatever is left is killed; nothing may be.
        for pid in marked_processes(value):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        stop_marked(value)
        shutil.rmtree(temp, ignore_errors=True)
    assert not marked_processes(value), "processes of the test's head outlived it"


def test_a_drafter_stage_trains_and_records_its_refiner(tmp_path: Path) -> None:
    from helpers import random_hopper

    from rlsynth.datasets.catalog import Catalog
    from rlsynth.generators.api import SampleOptions, load_generator, sample
    from rlsynth.pipeline.run import _task_train_generator

    cat = Catalog(str(tmp_path / "cat"))
    ref = str(cat.write("tiny/src", random_hopper(), lineage={}))
    out = tmp_path / "stage" / "model"
    got = _task_train_generator(str(tmp_path / "cat"), ref, "autoregressive", "cpu-small", 2, 0, str(out))
    gen = load_generator(out, device="cpu")
    assert gen.kind == "autoregressive" and got["checkpoint_hash"] == gen.checkpoint_hash
    refiner = load_generator(gen.config["refiner"], device="cpu")
    assert refiner.kind == "trajectory" and refiner.folder == tmp_path / "stage" / "refiner"
    # Shards and the PGD loop sample with no refiner given: the recorded one refines the drafts.
    assert sample(gen, random_hopper(), 40, SampleOptions(seed=0)).n_transitions >= 40
