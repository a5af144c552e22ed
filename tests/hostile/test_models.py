"""Hostile generator checkpoints and agent files, through the real CLI in subprocesses.

A tiny real generator of each kind and a tiny real agent are built once; each case copies one, tampers
with it as an attacker would (sizes that would allocate terabytes, headers that lie about the file,
code-running env ids and pickles, non-finite statistics) and checks that rlsynth refuses it the way a
trusted tool does (:func:`hostile_harness.assert_refused`). The last cases check that the commands which
write several outputs never exit non-zero with something committed, nor leave a half-made ``--out``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import make_dataset, tiny_agent, tiny_generator
from hostile_harness import EVIL_ENV_ID, assert_refused

from rlsynth.datasets.catalog import Catalog

KINDS = ("transition", "trajectory", "world-model")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real artefacts to tamper with: generators by kind, an agent with its sidecar, a catalog."""
    from rlsynth.datasets.d3rlpy_setup import import_d3rlpy

    root = tmp_path_factory.mktemp("hostile-models")
    out = {kind: root / kind for kind in KINDS}
    for kind in KINDS:
        tiny_generator(kind, out[kind], steps=3)
    agent = root / "agent.d3"
    tiny_agent(import_d3rlpy().algos.TD3PlusBCConfig(batch_size=16), steps=3, save_to=agent)
    (root / "agent.d3.json").write_text(json.dumps({"env_id": "Hopper-v5"}))
    out["agent"] = agent
    cat = Catalog(root / "catalog")
    cat.write("hop/one", make_dataset(lengths=(1,)))
    out["catalog"] = root / "catalog"
    return out


# --- helpers: copy and tamper -------------------------------------------------------------------------


def copy_generator(built: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"gen-{kind}"
    shutil.copytree(built[kind], dst)
    return dst


def edit_json(path: Path, change: Callable[[Any], None]) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def set_model(key: str, value: Any) -> Callable[[Any], None]:
    def change(cfg: Any) -> None:
        cfg["model"][key] = value

    return change


def edit_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a safetensors file's JSON header, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def first_tensor(header: dict[str, Any]) -> str:
    return next(k for k in header if k != "__metadata__")


def sample_args(folder: Path, built: dict[str, Path]) -> list[str]:
    return ["generator", "sample", str(folder), "--n-transitions", "10", "--name", "out/x",
            "--catalog", str(built["catalog"])]  # fmt: skip


def refuse_generator(built: dict[str, Path], folder: Path, expect: str | list[str], cwd: Path) -> None:
    assert_refused(sample_args(folder, built), cwd=cwd, watch=[built["catalog"], folder], expect=expect)


def copy_agent(built: dict[str, Path], tmp_path: Path, sidecar: dict[str, Any] | None = None) -> Path:
    dst = tmp_path / "agent.d3"
    shutil.copyfile(built["agent"], dst)
    if sidecar is not None:
        (tmp_path / "agent.d3.json").write_text(json.dumps(sidecar))
    return dst


def tamper_agent_config(path: Path, change: Callable[[Any], None]) -> None:
    """Edit the JSON config inside a .d3 container (a pickled dict of builtins: our own, trusted here)."""
    obj = pickle.loads(path.read_bytes())
    cfg = json.loads(obj["config"])
    change(cfg)
    obj["config"] = json.dumps(cfg)
    path.write_bytes(pickle.dumps(obj))


# d3rlpy's standard scaler as it serialises, with a NaN mean: every action would be NaN.
NAN_SCALER = {"type": "standard", "params": {"mean": [float("nan")] * 11, "std": [1.0] * 11, "eps": 1e-3}}


def eval_args(agent: Path) -> list[str]:
    return ["agent", "eval", str(agent), "--env", "Hopper-v5", "--episodes", "1"]


# --- generator checkpoints: sizes in config.json ------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "key", "value", "expect"),
    [
        ("transition", "width", 10**9, "width"),
        ("trajectory", "horizon", 10**9, "horizon"),
        ("world-model", "hidden", -5, "hidden"),
        ("transition", "depth", 0, "depth"),
        ("transition", "width", 32.5, "width"),
        ("world-model", "ensemble", "5", "ensemble"),
        ("trajectory", "channels", [8] * 1000, "channels"),
    ],
)
def test_config_sizes_are_bounded_before_building(
    built: dict[str, Path], tmp_path: Path, kind: str, key: str, value: Any, expect: str
) -> None:
    folder = copy_generator(built, kind, tmp_path)
    edit_json(folder / "config.json", set_model(key, value))
    refuse_generator(built, folder, ["config.json", expect], tmp_path)


def test_config_that_disagrees_with_the_weights_is_refused_before_allocating(
    built: dict[str, Path], tmp_path: Path
) -> None:
    # Valid and within bounds, but the file holds width-32 tensors: the meta-device skeleton is compared.
    folder = copy_generator(built, "transition", tmp_path)
    edit_json(folder / "config.json", set_model("width", 8192))
    refuse_generator(built, folder, ["model.safetensors", "the config needs"], tmp_path)


def test_evil_env_id_in_a_checkpoint_config(built: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_generator(built, "world-model", tmp_path)
    edit_json(folder / "config.json", lambda c: c["data"]["info"].update(env_id=EVIL_ENV_ID))
    refuse_generator(built, folder, ["config.json", "environment id"], tmp_path)


def test_oversized_config_json(built: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_generator(built, "transition", tmp_path)
    (folder / "config.json").write_text('{"kind": "transition", "pad": "' + "x" * (17 * 1024**2) + '"}')
    refuse_generator(built, folder, ["config.json", "bytes"], tmp_path)


# --- generator checkpoints: the safetensors file ------------------------------------------------------


def test_header_declaring_more_than_the_file(built: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_generator(built, "transition", tmp_path)

    def huge(h: dict[str, Any]) -> None:
        h[first_tensor(h)].update(shape=[10**6, 10**6], data_offsets=[0, 4 * 10**12])

    edit_header(folder / "model.safetensors", huge)
    refuse_generator(built, folder, ["model.safetensors", "does not fit"], tmp_path)


def test_header_length_field_of_2_to_the_63(built: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_generator(built, "transition", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**63) + weights.read_bytes()[8:])
    refuse_generator(built, folder, ["model.safetensors", "header length"], tmp_path)


def test_truncated_weights(built: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_generator(built, "world-model", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refuse_generator(built, folder, "model.safetensors", tmp_path)


def test_tensor_names_that_do_not_match_the_config(built: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_generator(built, "transition", tmp_path)

    def rename(h: dict[str, Any]) -> None:
        h["evil.extra"] = h.pop(first_tensor(h))

    edit_header(folder / "model.safetensors", rename)
    refuse_generator(built, folder, ["model.safetensors", "do not match"], tmp_path)


def test_elite_indices_outside_the_ensemble(built: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy_generator(built, "world-model", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["elite_idx"] = tensors["elite_idx"] + 10**6
    save_file(tensors, str(folder / "model.safetensors"))
    refuse_generator(built, folder, ["elite_idx"], tmp_path)


# --- generator checkpoints: normaliser.json -----------------------------------------------------------


@pytest.mark.parametrize(
    ("stat", "value", "expect"),
    [("mean", float("nan"), "finite"), ("std", 0.0, "positive")],
)
def test_non_finite_or_degenerate_normaliser_stats(
    built: dict[str, Path], tmp_path: Path, stat: str, value: float, expect: str
) -> None:
    folder = copy_generator(built, "world-model", tmp_path)
    edit_json(folder / "normaliser.json", lambda n: n["obs"][stat].__setitem__(0, value))
    refuse_generator(built, folder, ["normaliser.json", expect], tmp_path)


def test_normaliser_of_another_size(built: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_generator(built, "transition", tmp_path)
    edit_json(
        folder / "normaliser.json", lambda n: n["features"].update(mean=[0.0] * 10**6, std=[1.0] * 10**6)
    )
    refuse_generator(built, folder, ["normaliser.json", "expected"], tmp_path)


# --- agents ---------------------------------------------------------------------------------------------


def test_evil_env_id_in_an_agent_sidecar(built: dict[str, Path], tmp_path: Path) -> None:
    agent = copy_agent(built, tmp_path, {"env_id": EVIL_ENV_ID})
    args = ["agent", "eval", str(agent), "--episodes", "1"]
    assert_refused(args, cwd=tmp_path, watch=[agent], expect=["agent.d3.json", "environment id"])


def test_evil_env_id_on_the_command_line(built: dict[str, Path], tmp_path: Path) -> None:
    agent = copy_agent(built, tmp_path)
    assert_refused(["agent", "eval", str(agent), "--env", EVIL_ENV_ID], cwd=tmp_path, expect="environment id")


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda c: c["config"]["params"].update(n_critics=10**7), "n_critics"),
        (
            lambda c: c["config"]["params"].update(
                actor_encoder_factory={"type": "vector", "params": {"hidden_units": [10**9, 10**9]}}
            ),
            "hidden_units",
        ),
        (
            # Within the bounds, but not the networks the file holds: compared on the meta device.
            lambda c: c["config"]["params"].update(
                actor_encoder_factory={"type": "vector", "params": {"hidden_units": [8192] * 8}}
            ),
            "does not match its config",
        ),
        (lambda c: c.update(observation_shape=[10**9]), "observation"),
        (lambda c: c["config"]["params"].update(observation_scaler=NAN_SCALER), "finite"),
    ],
    ids=["n_critics", "hidden_units", "meta-mismatch", "observation_shape", "nan-scaler"],
)
def test_agent_config_sizes_are_checked_before_building(
    built: dict[str, Path], tmp_path: Path, change: Callable[[Any], None], expect: str
) -> None:
    agent = copy_agent(built, tmp_path)
    tamper_agent_config(agent, change)
    assert_refused(eval_args(agent), cwd=tmp_path, watch=[agent], expect=["agent.d3", expect])


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_code_running_pickle_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    agent = tmp_path / "evil.d3"
    marker = tmp_path / "pickle-ran"
    agent.write_bytes(pickle.dumps({"torch": b"", "config": "{}", "version": _RunsCode(marker)}))
    assert_refused(eval_args(agent), cwd=tmp_path, watch=[agent], expect="refuses to load")
    assert not marker.exists()


def test_pickle_length_field_larger_than_the_file(built: dict[str, Path], tmp_path: Path) -> None:
    agent = tmp_path / "bomb.d3"
    # BINBYTES8 claiming 2^62 bytes: the unpickler must not ask for a buffer that size.
    agent.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc")
    assert_refused(eval_args(agent), cwd=tmp_path, watch=[agent], expect="not a d3rlpy agent file")


# --- commands with several outputs ---------------------------------------------------------------------


def test_make_with_an_unusable_minari_root_commits_nothing(tmp_path: Path) -> None:
    cat = tmp_path / "catalog"
    blocker = tmp_path / "minari-is-a-file"
    blocker.write_text("not a folder")
    args = ["datasets", "make", "random", "--env", "Hopper-v5", "--name", "hop/r", "--transitions", "50",
            "--quiet", "--catalog", str(cat)]  # fmt: skip
    assert_refused(args, cwd=tmp_path, watch=[cat, blocker], env={"MINARI_DATASETS_PATH": str(blocker)},
                   expect="--no-minari")  # fmt: skip


def test_make_whose_minari_copy_fails_after_the_commit_succeeds_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from rlsynth.datasets import minari_io
    from rlsynth.datasets.errors import ExportError
    from rlsynth.pipeline.cli import cli

    def failing(*_: Any, **__: Any) -> Path:
        raise ExportError("disk full")

    monkeypatch.setattr(minari_io, "write_minari", failing)
    cat = tmp_path / "catalog"
    args = ["datasets", "make", "random", "--env", "Hopper-v5", "--name", "hop/r", "--transitions", "50",
            "--quiet", "--catalog", str(cat), "--json"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr and "disk full" in res.stderr
    made = json.loads(res.stdout)
    assert made["version"] == 1 and made["minari_id"] is None and made["warnings"]
    assert Catalog(cat).versions("hop/r") == [1]


def test_failed_generator_train_leaves_no_out(built: dict[str, Path], tmp_path: Path) -> None:
    # hop/one holds a single transition: training fails after the checkpoint files are written.
    out = tmp_path / "models" / "gen"
    args = ["generator", "train", "--data", "hop/one@1", "--kind", "transition", "--out", str(out),
            "--steps", "2", "--quiet", "--catalog", str(built["catalog"])]  # fmt: skip
    assert_refused(args, cwd=tmp_path, watch=[out, built["catalog"]], expect="at least 2 training samples")
    assert not (tmp_path / "models").exists()


def test_generator_train_failing_mid_run_removes_its_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import TINY, TINY_TRAIN, random_hopper

    from rlsynth.generators import api

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(api.TransitionFamily, "finish", broken)
    out = tmp_path / "gen"
    with pytest.raises(RuntimeError, match="disk full"):
        api.train_generator("transition", random_hopper(), out, steps=3, progress=False,
                            model_overrides=TINY["transition"], train_overrides=TINY_TRAIN)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    api.train_generator("transition", random_hopper(), out, steps=3, progress=False,
                        model_overrides=TINY["transition"], train_overrides=TINY_TRAIN)  # fmt: skip
    assert (out / "model.safetensors").is_file() and not api.staging_folder(out).exists()
