"""The warm-started PGD loop: each round after the first starts from the last round's kept samples, and
its lineage links it to the version it started from."""

from __future__ import annotations

from pathlib import Path

from helpers import SharedGenerator, random_hopper

from rlsynth.datasets.catalog import Catalog
from rlsynth.generators.api import SAMPLES_FILE, load_samples
from rlsynth.generators.options import Regeneration, SamplerSettings
from rlsynth.generators.warm import warm_steps
from rlsynth.offline_rl.pgd import PGDConfig, run_pgd


def test_warm_rounds_start_from_the_previous_version_and_record_it(
    tmp_path: Path, shared_generator: SharedGenerator
) -> None:
    gen = shared_generator("trajectory", steps=5)
    cat = Catalog(str(tmp_path / "cat"))
    regen = Regeneration(regenerate="warm", warm_pilot=8, warm_reseed=0.25, warm_sigma=0.5, warm_polish=0)
    cfg = PGDConfig(algo="td3bc", steps=12, regenerate_every=3, synthetic_transitions=60, synthetic_rows=12,
                    real_rows=4, regeneration=regen)  # fmt: skip
    res = run_pgd(cfg, gen, random_hopper(), cat, "pgd/warm", tmp_path / "run", progress=False)
    versions = [r.version for r in res.rounds]
    assert versions == ["pgd/warm@1", "pgd/warm@2", "pgd/warm@3", "pgd/warm@4"]
    lineages = [cat.manifest(v)["lineage"] for v in versions]
    # Round 0 is unguided and round 1 starts from it cold: a warm start needs a guided last round.
    assert [lin["sampling"]["warm_start"] for lin in lineages[:2]] == [None, None]
    assert [r.sigma_start for r in res.rounds] == [None, None, 0.5, 0.5]
    for r in (2, 3):
        started = lineages[r]["sampling"]["warm_start"]
        assert started["from"] == versions[r - 1] == lineages[r]["producer"]["previous"]
        assert started["sigma_start"] == 0.5 and started["polish"] == 0 and started["chosen"] is None
        assert started["steps"] == warm_steps(gen.model.cfg.sample_steps, gen.model.cfg.edm, 0.5)  # type: ignore[union-attr]
        previous = load_samples(cat.file_bytes(versions[r - 1], SAMPLES_FILE), (8, gen.layout.dim), "v")
        assert started["samples"] == len(previous) - round(0.25 * len(previous))
    for v in versions:
        kept = load_samples(cat.file_bytes(v, SAMPLES_FILE), (8, gen.layout.dim), v)
        assert cat.verify(v)["ok"] and len(kept) == cat.manifest(v)["counts"]["episodes"]


def test_cold_rounds_keep_no_samples(tmp_path: Path, shared_generator: SharedGenerator) -> None:
    gen = shared_generator("trajectory", steps=5)
    cat = Catalog(str(tmp_path / "cat"))
    cfg = PGDConfig(algo="td3bc", steps=4, regenerate_every=2, synthetic_transitions=30, synthetic_rows=12,
                    real_rows=4)  # fmt: skip
    res = run_pgd(cfg, gen, random_hopper(), cat, "pgd/cold", tmp_path / "run", progress=False)
    for r in res.rounds:
        man = cat.manifest(r.version)
        assert man["lineage"]["sampling"]["warm_start"] is None and not man.get("files")


def test_the_first_warm_round_chooses_and_later_rounds_reuse_the_choice(
    tmp_path: Path, shared_generator: SharedGenerator
) -> None:
    gen = shared_generator("trajectory", steps=5)
    cat = Catalog(str(tmp_path / "cat"))
    regen = Regeneration(regenerate="warm", warm_pilot=8, warm_reseed=0.25)
    cfg = PGDConfig(algo="td3bc", steps=12, regenerate_every=3, synthetic_transitions=60, synthetic_rows=12,
                    real_rows=4, regeneration=regen, sampler=SamplerSettings(polish=6))  # fmt: skip
    res = run_pgd(cfg, gen, random_hopper(), cat, "pgd/choose", tmp_path / "run", progress=False)
    lineages = [cat.manifest(r.version)["lineage"]["sampling"]["warm_start"] for r in res.rounds]
    first = lineages[2]
    chosen = first["chosen"]
    # Pilots compared on the simulator's one-step error, the target's likelihood and the spread.
    assert chosen["z"] == 2.0 and {"dynamics", "target_ll", "spread", "cost"} <= chosen["cold"].keys()
    assert chosen["rungs"] and {"dynamics", "target_ll", "contraction", "cost"} <= chosen["rungs"][0].keys()
    if first["cold"]:  # nothing matched: round 3 tries again
        assert not any(g["passed"] for g in chosen["rungs"]) and lineages[3]["chosen"] is not None
    else:
        last = chosen["rungs"][-1]
        assert last["passed"] and (last["sigma_start"], last["polish"]) == (
            first["sigma_start"],
            first["polish"],
        )
        assert lineages[3]["chosen"] is None and lineages[3]["sigma_start"] == first["sigma_start"]
