"""bench/scale.py: tiled data stays valid D4RL-layout data, and the whole benchmark runs at a tiny size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import BENCH, make_dataset
from helpers import load_bench as load

from rlsynth.datasets.validation import validate_transitions


def test_tiled_data_renumbers_each_copy_and_truncates_a_cut_episode() -> None:
    scale = load("scale")
    base = make_dataset(0, (5, 9, 3, 12))  # 29 transitions, terminated / truncated alternating
    ds = scale.tiled(base, 70)  # two whole copies and 12 rows of a third, cut inside its second episode
    t = ds.transitions
    validate_transitions(t, ds.info, "tiled")
    assert len(t) == 70 and ds.n_episodes == 4 + 4 + 2
    np.testing.assert_array_equal(t.observations[29:58], base.transitions.observations)
    assert t.timeouts[-1] and not t.terminals[-1]
    assert len(np.unique(t.episode_id)) == ds.n_episodes


def test_bad_options_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    scale = load("scale")
    for argv, message in (
        (["--kinds", "gan"], "--kinds: unknown gan"),
        (["--sizes", "1k"], "--sizes: expected comma-separated integers"),
        (["--train-steps", "0"], "--train-steps at least 1"),
        (["--sample-n", "0"], "--sample-n and --agent-steps must be positive"),
        (["--sample-polish", "-1"], "--sample-polish not negative"),
    ):
        with pytest.raises(SystemExit) as e:
            scale.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_benchmark_runs_every_stage_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    argv = ["--sizes", "400", "--base", "200", "--train-steps", "1", "--kinds", "trajectory"]
    argv += ["--eval-sample", "10", "--sample-n", "64", "--agent-steps", "2"]
    # --work need not exist yet: the benchmark makes it.
    argv += ["--no-write", "--work", str(tmp_path / "work")]
    out = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), *argv], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    # build, import, verify, read, train, evaluate, sample, mixed agent, PGD round; then the commit
    # split's header and its one row
    assert len(rows) == 11, out.stdout
    assert not any("failed" in r for r in rows), out.stdout
    assert rows[-1].startswith("| trajectory | 400 | 64 |"), out.stdout
    assert "GFLOP/s" in out.stdout
