"""The warm-started PGD loop: each round after the first starts from the last round's kept samples, and
its lineage links it to the version it started from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import SharedGenerator, random_hopper

from rlsynth.datasets.catalog import Catalog
from rlsynth.generators.api import SAMPLES_FILE, load_samples
from rlsynth.generators.options import Regeneration
from rlsynth.offline_rl.pgd import PGDConfig, run_pgd


def test_warm_rounds_start_from_the_previous_version_and_record_it(
    tmp_path: Path, shared_generator: SharedGenerator
) -> None:
    gen = shared_generator("trajectory", steps=5)
    cat = Catalog(str(tmp_path / "cat"))
    regen = Regeneration(regenerate="warm", warm_tolerance=0.5, warm_reseed=0.25, warm_polish=0)
    cfg = PGDConfig(algo="td3bc", steps=9, regenerate_every=3, synthetic_transitions=60, synthetic_rows=12,
                    real_rows=4, regeneration=regen)  # fmt: skip
    res = run_pgd(cfg, gen, random_hopper(), cat, "pgd/warm", tmp_path / "run", progress=False)
    versions = [r.version for r in res.rounds]
    assert versions == ["pgd/warm@1", "pgd/warm@2", "pgd/warm@3"]
    lineages = [cat.manifest(v)["lineage"] for v in versions]
    assert lineages[0]["sampling"]["warm_start"] is None and res.rounds[0].sigma_start is None
    first, second = lineages[1]["sampling"]["warm_start"], lineages[2]["sampling"]["warm_start"]
    assert first["from"] == "pgd/warm@1" and second["from"] == "pgd/warm@2"
    assert lineages[2]["producer"]["previous"] == "pgd/warm@2"
    # σ_start chosen once, in round 1, from its measured curve; round 2 reuses it.
    assert first["chosen"]["tolerance"] == 0.5 and first["chosen"]["curve"][-1][0] == first["sigma_start"]
    assert second["chosen"] is None and second["sigma_start"] == first["sigma_start"]
    assert res.rounds[1].sigma_start == res.rounds[2].sigma_start == first["sigma_start"]
    assert first["polish"] == 0 and first["steps"] >= 1
    for v in versions:
        kept = load_samples(cat.file_bytes(v, SAMPLES_FILE), (8, gen.layout.dim), v)
        assert cat.verify(v)["ok"] and len(kept) == cat.manifest(v)["counts"]["episodes"]
    previous = load_samples(cat.file_bytes("pgd/warm@1", SAMPLES_FILE), (8, gen.layout.dim), "v")
    assert first["samples"] == len(previous) - round(0.25 * len(previous))
    assert np.isfinite(previous).all()


def test_cold_rounds_keep_no_samples(tmp_path: Path, shared_generator: SharedGenerator) -> None:
    gen = shared_generator("trajectory", steps=5)
    cat = Catalog(str(tmp_path / "cat"))
    cfg = PGDConfig(algo="td3bc", steps=4, regenerate_every=2, synthetic_transitions=30, synthetic_rows=12,
                    real_rows=4)  # fmt: skip
    res = run_pgd(cfg, gen, random_hopper(), cat, "pgd/cold", tmp_path / "run", progress=False)
    for r in res.rounds:
        man = cat.manifest(r.version)
        assert man["lineage"]["sampling"]["warm_start"] is None and not man.get("files")
