"""Agent files load safely: a crafted .d3 cannot run code, corrupt files get one clear error."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dataset, tiny_agent

from rlsynth.datasets.agents import AgentError, agent_kind, load_agent
from rlsynth.datasets.d3rlpy_setup import import_d3rlpy


def trained(tmp_path: Path, name: str = "td3") -> Path:
    path = tmp_path / f"{name}.d3"
    tiny_agent(import_d3rlpy().algos.TD3PlusBCConfig(batch_size=16), steps=5, save_to=path)
    return path


def test_round_trip_matches_d3rlpy(tmp_path: Path) -> None:
    path = trained(tmp_path)
    ours, theirs = load_agent(path), import_d3rlpy().load_learnable(str(path))
    obs = make_dataset().transitions.observations[:5]
    np.testing.assert_array_equal(ours.predict(obs), theirs.predict(obs))
    assert agent_kind(ours) == "td3_plus_bc"


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_a_file_that_would_run_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.d3"
    path.write_bytes(pickle.dumps({"torch": b"", "config": "{}", "version": _Boom()}))
    with pytest.raises(AgentError, match=r"refuses to load builtins\.print"):
        load_agent(path)
    assert "pwned" not in capsys.readouterr().out


def test_unsafe_torch_payload_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = pickle.loads(trained(tmp_path).read_bytes())
    buf = io.BytesIO()
    torch.save({"x": _Boom()}, buf)
    path = tmp_path / "evil-weights.d3"
    path.write_bytes(pickle.dumps({**good, "torch": buf.getvalue()}))
    with pytest.raises(AgentError, match="agent weights cannot be loaded"):
        load_agent(path)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage bytes", "not a d3rlpy agent file"),
        (pickle.dumps([1, 2, 3]), "expected keys torch, config, version"),
        (
            pickle.dumps({"torch": b"x", "config": "{not json", "version": "2.8.1"}),
            "config cannot be rebuilt",
        ),
    ],
)
def test_corrupt_files_are_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.d3"
    path.write_bytes(content)
    with pytest.raises(AgentError, match=message):
        load_agent(path)


def test_truncated_weights_and_missing_file(tmp_path: Path) -> None:
    good = pickle.loads(trained(tmp_path).read_bytes())
    path = tmp_path / "cut.d3"
    path.write_bytes(pickle.dumps({**good, "torch": good["torch"][:100]}))
    with pytest.raises(AgentError, match="agent weights cannot be loaded"):
        load_agent(path)
    with pytest.raises(AgentError, match="no such agent file"):
        load_agent(tmp_path / "none.d3")
