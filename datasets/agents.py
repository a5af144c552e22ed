"""d3rlpy agent files (``.d3``), loaded without trusting them.

``d3rlpy.load_learnable`` unpickles the whole file, so a crafted ``.d3`` can run code. A ``.d3`` file is a
pickled dict of builtins (``{"torch": bytes, "config": str, "version": str}``); we unpickle it with a
loader that refuses every global (no class can be built, no function called), check the config's sizes,
compare the networks it builds on the ``meta`` device with the weights in the file, and load the weights
with ``torch.load(weights_only=True)`` (see :func:`load_agent`).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from rlsynth.datasets.d3rlpy_setup import import_d3rlpy
from rlsynth.datasets.errors import RlsynthError, brief, first_line, read_bounded
from rlsynth.datasets.sources import file_sha256
from rlsynth.datasets.types import check_env_id


class AgentError(RlsynthError):
    """An agent file that is missing, corrupt, unsafe or incompatible."""


MAX_AGENT_BYTES = 1024**3
"""The largest ``.d3`` file read: the whole file is read into memory (so no field can claim more)."""
MAX_SIDECAR_BYTES = 16 * 1024**2
MAX_N_CRITICS = 64
MAX_HIDDEN_LAYERS = 32
MAX_WIDTH = 8192
MAX_OBSERVATION = 1 << 20
MAX_ACTION = 4096
MAX_CONFIG_INT = 10**8
"""Any other integer in an agent config (batch sizes, intervals, sample counts) stays far below this."""
MAX_CONFIG_DEPTH = 32


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise AgentError(f"refuses to load {module}.{name}: a .d3 file holds only plain data")


def _read_container(path: Path) -> dict[str, Any]:
    # Unpickled from memory, not the file: a length field claiming more bytes than the file has then
    # fails as truncated data instead of asking the file object for a buffer that size.
    data = read_bounded(path, MAX_AGENT_BYTES, "agent file", AgentError)
    try:
        obj = _BuiltinsOnly(io.BytesIO(data)).load()
    except AgentError as e:
        raise AgentError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, MemoryError,
            OverflowError, RecursionError, AttributeError, UnicodeDecodeError) as e:  # fmt: skip
        raise AgentError(f"{path}: not a d3rlpy agent file ({brief(e)})") from None
    if not isinstance(obj, dict) or not {"torch", "config", "version"} <= obj.keys():
        raise AgentError(f"{path}: not a d3rlpy agent file (expected keys torch, config, version)")
    if not isinstance(obj["torch"], bytes) or not isinstance(obj["config"], str):
        raise AgentError(f"{path}: not a d3rlpy agent file (wrong field types)")
    return obj


def sidecar(path: Path) -> Path:
    """``AGENT.d3.json``: what rlsynth records beside an agent it wrote (algorithm, data, SHA-256)."""
    return path.with_name(path.name + ".json")


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The record beside agent ``path`` (None if there is none), bounded in size; its env id is checked
    here, where it enters: gymnasium would import the module of a ``module:Name`` id."""
    side = sidecar(Path(path))
    if not side.is_file():
        return None
    try:
        record = json.loads(read_bounded(side, MAX_SIDECAR_BYTES, "agent record", AgentError))
    except (OSError, ValueError, RecursionError) as e:
        raise AgentError(f"{side}: unreadable agent record ({first_line(e)})") from None
    if not isinstance(record, dict):
        raise AgentError(f"{side}: unreadable agent record (not a JSON object)")
    if record.get("env_id") is not None:
        check_env_id(record["env_id"], str(side))
    if not isinstance(record.get("sha256", ""), str):
        raise AgentError(f"{side}: sha256 is not a string")
    return record


def recorded_env_id(path: Path) -> str | None:
    """The environment rlsynth recorded with the agent at ``path`` (checked), if any."""
    record = read_sidecar(path)
    return None if record is None else record.get("env_id")


def _check_recorded_hash(p: Path) -> None:
    record = read_sidecar(p)
    recorded = None if record is None else record.get("sha256")
    if recorded is not None:
        from rlsynth.datasets.sources import file_sha256

        if file_sha256(p) != recorded:
            raise AgentError(
                f"{p}: content does not match the SHA-256 recorded in {sidecar(p).name} (damaged?)"
            )


def _check_config_values(p: Path, node: Any, key: str = "", depth: int = 0) -> None:
    """Every number in an agent config finite and bounded, before d3rlpy builds anything from it: the
    counts that multiply modules (``n_critics``, layers) tightly, widths and the rest loosely (the
    weights' shapes are then compared with the file's tensors)."""
    bad = f"{p}: agent config"
    if depth > MAX_CONFIG_DEPTH:
        raise AgentError(f"{bad} is nested deeper than {MAX_CONFIG_DEPTH} levels")
    if isinstance(node, dict):
        for k, v in node.items():
            _check_config_values(p, v, str(k), depth + 1)
    elif isinstance(node, list):
        if key == "hidden_units" and len(node) > MAX_HIDDEN_LAYERS:
            raise AgentError(f"{bad} declares {len(node)} hidden layers (at most {MAX_HIDDEN_LAYERS})")
        if len(node) > MAX_OBSERVATION:
            raise AgentError(f"{bad} {key} holds {len(node)} values (at most {MAX_OBSERVATION})")
        for v in node:
            _check_config_values(p, v, key, depth + 1)
    elif isinstance(node, float) and not math.isfinite(node):
        raise AgentError(f"{bad} {key} is {node} (scalers and settings must be finite)")
    elif isinstance(node, int) and not isinstance(node, bool):
        limit = {"n_critics": MAX_N_CRITICS, "hidden_units": MAX_WIDTH}.get(key, MAX_CONFIG_INT)
        if not -MAX_CONFIG_INT <= node <= limit or (key in ("n_critics", "hidden_units") and node < 1):
            raise AgentError(f"{bad} {key}={str(node)[:30]} is out of range (at most {limit})")


def _check_shape(p: Path, cfg: Any) -> None:
    shape, act = cfg.get("observation_shape"), cfg.get("action_size")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or not all(type(n) is int and n > 0 for n in shape)
    ):
        raise AgentError(f"{p}: agent config observation_shape {str(shape)[:40]} is not a list of sizes")
    if math.prod(shape) > MAX_OBSERVATION or type(act) is not int or not 1 <= act <= MAX_ACTION:
        raise AgentError(
            f"{p}: agent config declares observations {shape[:4]} and {str(act)[:20]} actions (too large)"
        )


def _parse_config(p: Path, text: str) -> Any:
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise AgentError(f"{p}: agent config cannot be rebuilt (not JSON: {first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise AgentError(f"{p}: agent config cannot be rebuilt (not a JSON object)")
    _check_config_values(p, cfg)
    _check_shape(p, cfg)
    return cfg


def _build(p: Path, d3rlpy: Any, obj: dict[str, Any], device: str) -> Any:
    import torch

    try:
        config = d3rlpy.base.LearnableConfigWithShape.deserialize(obj["config"])
        if device != "meta":
            return config.create(device)
        # d3rlpy builds modules on the default device and then moves them: both must be meta.
        with torch.device("meta"):
            return config.create("meta")
    except Exception as e:  # d3rlpy raises assorted errors for configs it cannot rebuild.
        raise AgentError(
            f"{p}: agent config cannot be rebuilt by d3rlpy {d3rlpy.__version__} "
            f"(saved with {str(obj['version'])[:20]}): {brief(e)}"
        ) from None


def _check_zip(p: Path, blob: bytes) -> None:
    """The weights are a torch zip archive of stored (uncompressed) records that fit the bytes we have:
    nothing in it can expand beyond the file."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise AgentError(
            f"{p}: agent weights cannot be loaded (not a torch archive: {first_line(e)})"
        ) from None
    if any(i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size for i in infos):
        raise AgentError(f"{p}: agent weights cannot be loaded (compressed records; torch stores them raw)")
    if sum(i.file_size for i in infos) > len(blob):
        raise AgentError(f"{p}: agent weights cannot be loaded (records larger than the file)")


def _expected_modules(algo: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """Parameter names and shapes of each network of an algorithm built on the meta device."""
    from torch import nn

    modules = algo.impl.modules.create_checkpointer("meta").modules
    return {
        k: {name: tuple(t.shape) for name, t in m.state_dict().items()}
        for k, m in modules.items()
        if isinstance(m, nn.Module)
    }


def _check_state(p: Path, state: Any, expected: dict[str, dict[str, tuple[int, ...]]]) -> None:
    import torch

    if not isinstance(state, dict):
        raise AgentError(f"{p}: agent weights cannot be loaded (not a dict of networks)")
    for key, shapes in expected.items():
        part = state.get(key)
        if not isinstance(part, dict):
            raise AgentError(f"{p}: agent weights cannot be loaded (no weights for {key})")
        found = {n: tuple(t.shape) for n, t in part.items() if isinstance(t, torch.Tensor)}
        if found != shapes:
            diff = sorted(set(found.items()) ^ set(shapes.items()))[:1]
            raise AgentError(f"{p}: agent weights cannot be loaded ({key} does not match its config: {diff})")


def load_agent(path: str | os.PathLike[str], device: str = "cpu:0") -> Any:
    """Load a d3rlpy algorithm saved with ``algo.save(path)``; one clear error for any bad file.

    Nothing in the file is trusted before it is checked: the container is unpickled with no globals; the
    config's numbers are bounded and finite; the networks are first built on the ``meta`` device (no
    memory) and their shapes compared with the weights in the file (a torch archive of raw records no
    larger than the file, loaded with ``weights_only``); only then are real networks built. When rlsynth
    wrote the file, its sidecar's SHA-256 is checked first."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise AgentError(f"{p}: no such agent file")
    _check_recorded_hash(p)
    obj = _read_container(p)
    _parse_config(p, obj["config"])
    d3rlpy = import_d3rlpy()
    expected = _expected_modules(_build(p, d3rlpy, obj, "meta"))
    _check_zip(p, obj["torch"])
    try:
        state = torch.load(io.BytesIO(obj["torch"]), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt bytes and unsafe payloads land here.
        raise AgentError(f"{p}: agent weights cannot be loaded ({brief(e)})") from None
    _check_state(p, state, expected)
    algo = _build(p, d3rlpy, obj, device)
    try:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        algo.impl.load_model(buf)
    except Exception as e:  # optimiser states that do not fit their networks land here.
        raise AgentError(f"{p}: agent weights cannot be loaded ({brief(e)})") from None
    check_finite_weights(p, algo)
    return algo


def check_finite_weights(p: Path, algo: Any) -> None:
    """Non-finite weights would act (or give log-likelihoods) as NaN far from here; refuse them at load."""
    import torch
    from torch import nn

    for name, m in algo.impl.modules.create_checkpointer("cpu").modules.items():
        if isinstance(m, nn.Module) and not all(bool(torch.isfinite(t).all()) for t in m.state_dict().values()
                                                if t.is_floating_point()):  # fmt: skip
            raise AgentError(f"{p}: agent weights of {name} are not all finite")


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


def save_agent(algo: Any, out: Path, meta: dict[str, Any]) -> None:
    """Write ``out`` and ``out.json`` atomically (temporary names in the same folder, then renames)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        algo.save(tmp)
        meta_tmp = tmp + ".json"
        meta = {**meta, "sha256": file_sha256(Path(tmp))}
        Path(meta_tmp).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(tmp, out)
        os.replace(meta_tmp, str(out) + ".json")
    finally:
        for leftover in (tmp, tmp + ".json"):
            if os.path.exists(leftover):
                os.unlink(leftover)
