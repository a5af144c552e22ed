"""d3rlpy agent files (``.d3``), loaded without trusting them.

``d3rlpy.load_learnable`` unpickles the whole file, so a crafted ``.d3`` can run code. A ``.d3`` file is a
pickled dict of builtins (``{"torch": bytes, "config": str, "version": str}``); we unpickle it with a
loader that refuses every global (no class can be built, no function called), parse the config as JSON
through d3rlpy, and load the weights with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

from datasets.errors import RlsynthError
from offline_rl.d3rlpy_setup import import_d3rlpy


class AgentError(RlsynthError):
    """An agent file that is missing, corrupt, unsafe or incompatible."""


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise AgentError(f"refuses to load {module}.{name}: a .d3 file holds only plain data")


def _read_container(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _BuiltinsOnly(f).load()
    except AgentError as e:
        raise AgentError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise AgentError(f"{path}: not a d3rlpy agent file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not {"torch", "config", "version"} <= obj.keys():
        raise AgentError(f"{path}: not a d3rlpy agent file (expected keys torch, config, version)")
    if not isinstance(obj["torch"], bytes) or not isinstance(obj["config"], str):
        raise AgentError(f"{path}: not a d3rlpy agent file (wrong field types)")
    return obj


def sidecar(path: Path) -> Path:
    """``AGENT.d3.json``: what rlsynth records beside an agent it wrote (algorithm, data, SHA-256)."""
    return path.with_name(path.name + ".json")


def _check_recorded_hash(p: Path) -> None:
    side = sidecar(p)
    if not side.is_file():
        return
    try:
        recorded = json.loads(side.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError) as e:
        raise AgentError(f"{side}: unreadable agent record ({e})") from None
    if recorded is not None:
        from datasets.sources import file_sha256

        if file_sha256(p) != recorded:
            raise AgentError(f"{p}: content does not match the SHA-256 recorded in {side.name} (damaged?)")


def load_agent(path: str | os.PathLike[str], device: str = "cpu:0") -> Any:
    """Load a d3rlpy algorithm saved with ``algo.save(path)``; one clear error for any bad file.

    When rlsynth wrote the file, its sidecar's SHA-256 is checked first."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise AgentError(f"{p}: no such agent file")
    _check_recorded_hash(p)
    obj = _read_container(p)
    d3rlpy = import_d3rlpy()
    try:
        json.loads(obj["config"])
        config = d3rlpy.base.LearnableConfigWithShape.deserialize(obj["config"])
        algo = config.create(device)
    except Exception as e:  # d3rlpy raises assorted errors for configs it cannot rebuild.
        raise AgentError(
            f"{p}: agent config cannot be rebuilt by d3rlpy {d3rlpy.__version__} "
            f"(saved with {obj['version']}): {type(e).__name__}: {e}"
        ) from None
    try:
        state = torch.load(io.BytesIO(obj["torch"]), map_location="cpu", weights_only=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        algo.impl.load_model(buf)
    except Exception as e:  # corrupt bytes, unsafe payloads and shape mismatches all land here.
        raise AgentError(f"{p}: agent weights cannot be loaded ({type(e).__name__}: {e})") from None
    return algo


def check_agent_spaces(algo: Any, obs_dim: int, act_dim: int, what: str) -> None:
    """An agent built for other observation/action sizes than ``what`` is an error, not a shape crash."""
    shape = list(algo.impl.observation_shape)
    if shape != [obs_dim] or int(algo.impl.action_size) != act_dim:
        raise AgentError(
            f"agent expects observations {shape} and {algo.impl.action_size} actions; "
            f"{what} has [{obs_dim}] and {act_dim}"
        )


def agent_kind(algo: Any) -> str:
    """A short algorithm name, e.g. ``iql`` or ``td3plusbc``."""
    return str(algo.config.get_type())
