"""A version larger than the memory the process may take: every family trains on it, where building its
table in memory (the old way) fails, and it exports to Minari, where building its episodes fails."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import (
    TINY_TRAIN,
    assert_same_transitions,
    big_transitions,
    hopper_info,
    make_dataset,
    run_capped_child,
)

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.minari_io import read_minari
from rlsynth.datasets.types import Dataset

# The child caps its data segment (private memory: what the training tables took in memory) at what it
# uses after a warm-up, plus MARGIN. The version's columns come memory-mapped from the cache, shared and
# read-only, so they do not count; a file-backed scratch table is a shared mapping and does not count
# either. Each family's table in memory is larger than MARGIN.
MARGIN = 64 * 2**20
EPISODES, LENGTH = 1_200, 1_000
TABLE_WIDTH = {"trajectory": 16, "autoregressive": 16, "transition": 27, "world-model": 14}
"""Float32 columns of each family's smallest table on Hopper (tokens; features; world-model inputs)."""

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np
    from rlsynth.datasets.catalog import Catalog
    from rlsynth.generators.trainer import train_generator

    def data_segment():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))

    cat, out, margin = Catalog(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    kind, width, tiny = sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6])
    # Warm-up on a tiny version: torch's thread pools and lazily built kernels exist before the cap.
    train_generator(kind, cat.read("warm"), out / "warm", steps=2, progress=False, train_overrides=tiny)
    big = cat.read("big")
    n = len(big.transitions)
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (data_segment() + margin, hard))
    train_generator(kind, big, out / "big", steps=2, progress=False, train_overrides=tiny)
    result = {"trained": (out / "big" / "model.safetensors").is_file()}
    try:
        np.zeros((n, width), np.float32)  # the family's table, built in memory as it was before
        result["in_memory"] = "ok"
    except MemoryError:
        result["in_memory"] = "MemoryError"
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def big_catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, Path]:
    """The big version, its cache entry filled (the children's reads map it), and a tiny one."""
    root = tmp_path_factory.mktemp("big")
    cache = root / "cache"
    catalog = Catalog(root / "catalog")
    catalog.write("big", Dataset(hopper_info(), big_transitions(EPISODES, LENGTH)), rows_per_part=50_000)
    catalog.write("warm", make_dataset(lengths=(40, 40, 40, 40)), rows_per_part=100)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("RLSYNTH_CACHE", str(cache))
        catalog.read("big")
    return catalog, cache


@pytest.mark.skipif(sys.platform != "linux", reason="reads the data segment from /proc")
@pytest.mark.parametrize("kind", sorted(TABLE_WIDTH))
def test_a_family_trains_on_a_version_larger_than_its_memory(
    kind: str, big_catalog: tuple[Catalog, Path], tmp_path: Path
) -> None:
    catalog, cache = big_catalog
    assert EPISODES * LENGTH * TABLE_WIDTH[kind] * 4 > MARGIN  # its table does not fit under the cap
    tiny = json.dumps({**TINY_TRAIN, "batch_size": 8, "val_fraction": 1e-4})
    args = (catalog.root, str(tmp_path / "runs"), str(MARGIN), kind, str(TABLE_WIDTH[kind]), tiny)
    out = run_capped_child(CHILD, *args, timeout=300, env={"RLSYNTH_CACHE": str(cache)})
    assert out == {"trained": True, "in_memory": "MemoryError"}
    assert not list((cache / "scratch").glob("*"))  # the scratch files went with the process


EXPORT_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from rlsynth.datasets.catalog import Catalog
    from rlsynth.datasets.minari_io import write_minari

    def data_segment():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))

    cat, margin = Catalog(sys.argv[1]), int(sys.argv[2])
    write_minari(cat.read("warm"), "rlsynth/warm-v0")  # Minari's and Arrow's lazily built paths
    big = cat.read("big")
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (data_segment() + margin, hard))
    result = {"exported": write_minari(big, "rlsynth/big-v0").is_dir()}
    try:
        big.episodes()  # every episode built at once, as the export did before
        result["in_memory"] = "ok"
    except MemoryError:
        result["in_memory"] = "MemoryError"
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the data segment from /proc")
def test_a_version_larger_than_memory_exports_to_minari(big_catalog: tuple[Catalog, Path]) -> None:
    catalog, cache = big_catalog
    out = run_capped_child(
        EXPORT_CHILD, catalog.root, str(MARGIN), timeout=300, env={"RLSYNTH_CACHE": str(cache)}
    )
    assert out == {"exported": True, "in_memory": "MemoryError"}
    back = read_minari("rlsynth/big-v0")
    assert back.n_transitions == EPISODES * LENGTH
    assert_same_transitions(back, catalog.read("big"))
