"""The real CLI under SIGTERM (what timeout, Kubernetes and Ray send): work in progress unwinds like Ctrl-C
(exit 143, no partial output), and `datasets gc` clears what a SIGKILLed writer left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import cli_command, run_cli

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=REPO, env=env, check=True)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = os.environ | {"RLSYNTH_CATALOG": str(tmp_path / "cat")}
    _run(["datasets", "make", "random", "--env", "Hopper-v5", "--name", "toy", "--transitions", "500",
          "--no-minari", "--quiet"], e)  # fmt: skip
    return e


def test_sigterm_during_training_exits_143_and_leaves_no_partial_output(
    tmp_path: Path, env: dict[str, str]
) -> None:
    out = tmp_path / "gen"
    args = ["generator", "train", "--data", "toy@1", "--kind", "transition", "--steps", "1000000",
            "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cli_command(*args), cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    end = time.monotonic() + 120
    while not any(p.name.startswith(".gen") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # into the training loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gen")]  # no hidden partial folder


def test_gc_clears_a_killed_writers_staging(tmp_path: Path, env: dict[str, str]) -> None:
    cat = tmp_path / "cat"
    script = (
        "import os; from rlsynth.datasets.catalog import Catalog\n"
        f"cat = Catalog({str(cat)!r})\n"
        "txn = cat.begin('toy', cat.read('toy@1').info)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=False)
    staging = cat / "toy" / "_staging"
    assert any(p.is_dir() for p in staging.iterdir())
    removed = json.loads(_run(["datasets", "gc", "--json"], env).stdout)["removed"]
    assert len(removed) == 1 and not any(p.is_dir() for p in staging.iterdir())
    assert json.loads(_run(["datasets", "gc", "toy", "--json"], env).stdout)["removed"] == []
