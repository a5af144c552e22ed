"""rlsynth and Hugging Face ``datasets`` installed in one environment: both import and both work.

Run in a fresh interpreter from a directory outside the checkout, as a user's script would be (inside the
checkout the root folders are on ``sys.path`` and would answer to ``import datasets`` themselves).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import numpy as np
import datasets
from datasets import Dataset
hf = Dataset.from_dict({"x": [1, 2, 3]}).map(lambda r: {"y": r["x"] * 2})

import rlsynth
from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.envs import env_info
from rlsynth.datasets.types import Dataset as Version, Episode, episodes_to_transitions
from rlsynth.generators.api import PRESETS
from rlsynth.pipeline.cli import cli

rng = np.random.default_rng(0)
none = np.zeros(5, bool)
ep = Episode(
    observations=rng.normal(size=(6, 11)).astype(np.float32),
    actions=rng.uniform(-1, 1, size=(5, 3)).astype(np.float32),
    rewards=np.ones(5, np.float32),
    terminations=none,
    truncations=np.array([0, 0, 0, 0, 1], bool),
)
data = Version(info=env_info("Hopper-v5"), transitions=episodes_to_transitions([ep]), source="toy")
catalog = Catalog(sys.argv[1])
back = catalog.read(catalog.write("toy", data))
print(json.dumps({
    "hf_file": datasets.__file__,
    "hf_y": list(hf["y"]),
    "hf_has_load_dataset": hasattr(datasets, "load_dataset"),
    "rlsynth_file": rlsynth.__file__,
    "transitions": len(back.transitions.rewards),
    "presets": sorted(PRESETS)[:1],
    "cli": cli.name,
}))
"""


def test_hugging_face_datasets_and_rlsynth_work_side_by_side(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "catalog")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "HF_DATASETS_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["hf_has_load_dataset"] and got["hf_y"] == [2, 4, 6]
    assert Path(got["hf_file"]).parent != REPO / "datasets" and "site-packages" in got["hf_file"]
    assert got["transitions"] == 5 and got["presets"] and got["cli"]
