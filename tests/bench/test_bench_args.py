"""The benchmark scripts reject bad options with one line and exit 2, before they load or train anything."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from helpers import load_bench as load

DOWNSTREAM = ["--data", "d@1", "--generator", "G", "--target", "t.d3"]


@pytest.fixture(scope="module")
def downstream() -> ModuleType:
    return load("downstream")


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return load("gpu_check")


def rejects(parse: object, argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse(argv)  # type: ignore[operator]
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def test_downstream_parses_mix_conditions_seeds_and_algos(downstream: ModuleType) -> None:
    a = downstream.parse_args(
        [*DOWNSTREAM, "--pgd-mix", "128:128", "--conditions", "real,pgd", "--seeds", "3,4", "--algos", "iql"]
    )
    assert a.mix == (128, 128)
    assert a.keys == ["real", "pgd"]
    assert a.names["pgd"] == "PGD loop (128 + 128)"
    assert a.names["real"] == "real"
    assert a.seed_list == (3, 4)
    assert a.algo_list == ("iql",)
    # The module's own table keeps the paper's label (it is not mutated per run).
    assert downstream.CONDITIONS["pgd"] == "PGD loop (240 + 16)"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pgd-mix", "240-16"], "--pgd-mix: expected SYNTHETIC:REAL rows, got '240-16'"),
        (
            ["--pgd-mix", "200:16"],
            "--pgd-mix: 200:16 must be positive synthetic rows and real rows adding up to",
        ),
        (["--pgd-mix", "0:256"], "--pgd-mix: 0:256 must be positive"),
        (["--conditions", "real,bogus"], "--conditions: unknown ['bogus']"),
        (["--steps", "0"], "--steps must be positive, got 0"),
        (["--regen", "-5"], "--regen must be positive, got -5"),
        (["--pgd-synthetic", "0"], "--pgd-synthetic must be positive, got 0"),
        (["--scale", "0"], "--scale and --pgd-std must be positive"),
        (["--pgd-std", "nan"], "--scale and --pgd-std must be positive"),
        (["--polish", "-1"], "--polish must be ≥ 0"),
        (["--seeds", "0,x"], "--seeds: expected comma-separated integers, got '0,x'"),
        (["--algos", "td3bc,sac"], "--algos: unknown ['sac']"),
    ],
)
def test_downstream_rejects_bad_options(
    downstream: ModuleType,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    rejects(downstream.parse_args, [*DOWNSTREAM, "--out", str(tmp_path / "out"), *extra], capsys, message)
    assert not (tmp_path / "out").exists()


def test_downstream_rejects_a_generator_that_cannot_be_guided(
    downstream: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A world model passed as --generator is refused with a clear error before any set is sampled."""
    from helpers import random_hopper, tiny_generator

    from rlsynth.datasets.catalog import Catalog

    Catalog(tmp_path / "cat").write("toy/real", random_hopper())
    tiny_generator("world-model", tmp_path / "wm", steps=2)
    sampled: list[object] = []
    monkeypatch.setattr(downstream, "synthesize", lambda *a, **k: sampled.append(a))
    with pytest.raises(downstream.RlsynthError, match="is a world-model model; guidance needs a diffusion"):
        downstream.main(
            f"--data toy/real@1 --catalog {tmp_path / 'cat'} --generator {tmp_path / 'wm'} "
            f"--target t.d3 --out {tmp_path / 'out'}".split()
        )
    assert sampled == []
    assert not (tmp_path / "out").exists()


def test_gpu_check_parses_jobs_samplers_and_seeds(gpu_check: ModuleType) -> None:
    jobs = "trajectory:gpu-paper:11000,transition:cpu-small:5"
    a, judge = gpu_check.parse_args(
        [
            "--data",
            "x.hdf5",
            "--jobs",
            jobs,
            "--out",
            "o",
            "--samplers",
            "20:0,40:40",
            "--seeds",
            "1,2",
            "--sample",
            "100",
            "--rows",
            "50",
        ]
    )
    assert judge.samplers == ((20, 0.0), (40, 40.0))
    assert judge.seeds == (1, 2)
    assert (judge.sample, judge.rows) == (100, 50)
    assert a.jobs.split(",")[0] == "trajectory:gpu-paper:11000"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--jobs", "trajectory:gpu-paper"], "--jobs: expected KIND:PRESET:STEPS with positive STEPS"),
        (["--jobs", "trajectory:gpu-paper:0"], "--jobs: expected KIND:PRESET:STEPS with positive STEPS"),
        (["--jobs", "trajectory:huge:100"], "--jobs: 'trajectory:huge:100': unknown kind or preset"),
        (["--jobs", "video:cpu-small:100"], "unknown kind or preset"),
        (["--samplers", "20"], "--samplers: expected STEPS:CHURN pairs, got '20'"),
        (["--samplers", "20:x"], "--samplers: expected STEPS:CHURN pairs, got '20:x'"),
        (["--samplers", "20:-1"], "--samplers: '20:-1' needs steps ≥ 0 and a finite churn ≥ 0"),
        (["--samplers", "20:inf"], "needs steps ≥ 0 and a finite churn ≥ 0"),
        (["--seeds", "1,two"], "--seeds: expected comma-separated integers, got '1,two'"),
        (["--sample", "0"], "--sample and --rows must be positive"),
    ],
)
def test_gpu_check_rejects_bad_options(
    gpu_check: ModuleType, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--data", "x.hdf5", "--jobs", "trajectory:cpu-small:10", "--out", "o"]
    rejects(gpu_check.parse_args, [*base, *extra], capsys, message)


def test_generators_table_says_when_a_preset_planned_its_steps() -> None:
    gens = load("generators")
    assert gens.trained({"steps": 21000, "train_s": 708.2, "budget_s": 840.0}) == (
        "21000 steps (planned in a 14-min budget), 708 s"
    )
    assert gens.trained({"steps": 15000, "train_s": 320.4, "budget_s": None}) == "15000 steps, 320 s"


WARM = ["--data", "d@1", "--generator", "G", "--out", "o"]


def test_warm_pgd_parses_seeds_and_algos() -> None:
    a = load("warm_pgd").parse_args([*WARM, "--seeds", "3,4", "--algos", "iql", "--rounds", "4"])
    assert a.seed_list == (3, 4) and a.algo_list == ("iql",) and a.rounds == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--algos", "sac"], "--algos: unknown algorithm 'sac'"),
        (["--rounds", "1"], "--rounds must be at least 2"),
        (["--transitions", "0"], "--transitions must be positive"),
        (["--seeds", "a"], "--seeds: expected comma-separated integers"),
    ],
)
def test_warm_pgd_rejects_bad_options(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rejects(load("warm_pgd").parse_args, [*WARM, *extra], capsys, message)
