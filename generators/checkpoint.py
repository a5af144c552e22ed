"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder holds::

    config.json        {"kind": ..., "model": {...}, "train": {...}, "data": {...}}  (the resolved config)
    model.safetensors  the model's weights (EMA weights when training used EMA)
    normaliser.json    per-column mean/std used to (un)normalise the data
    state.safetensors  + state.json  resumable training state (raw weights, optimiser moments, step, RNG)

Optimiser state dicts are nested dicts of tensors and numbers; they are flattened to ``a.b.c`` keys for
safetensors, with the non-tensor leaves and the nesting kept in JSON. Writes go to a temporary name and are
renamed into place, so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from datasets.errors import RlsynthError


class CheckpointError(RlsynthError):
    """A checkpoint folder that is missing, incomplete or does not match the code."""


@dataclass(frozen=True)
class Normaliser:
    """Per-dimension z-scoring: ``(x - mean) / std``. Shapes: mean, std (dim,)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, floor: float = 1e-6) -> Normaliser:
        x64 = np.asarray(x, np.float64).reshape(len(x), -1)
        return cls(x64.mean(0).astype(np.float32), np.maximum(x64.std(0), floor).astype(np.float32))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.as_tensor(self.mean, device=x.device)) / torch.as_tensor(self.std, device=x.device)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.as_tensor(self.std, device=z.device) + torch.as_tensor(self.mean, device=z.device)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Normaliser:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True)))


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete rlsynth checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete rlsynth checkpoint)") from None
    except Exception as e:  # safetensors raises its own error types for damaged files.
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts/lists of tensors and numbers) into flat tensors and a JSON skeleton."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}, {"__tensor__": prefix}
    if isinstance(state, Mapping):
        tensors: dict[str, torch.Tensor] = {}
        skel: dict[str, Any] = {"__dict__": []}
        for k, v in state.items():
            t, s = flatten_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
            skel["__dict__"].append([k, s])
        return tensors, skel
    if isinstance(state, list | tuple):
        tensors, items = {}, []
        for i, v in enumerate(state):
            t, s = flatten_state(v, f"{prefix}.{i}")
            tensors.update(t)
            items.append(s)
        return tensors, {"__list__": items}
    return {}, {"__value__": state}


def unflatten_state(tensors: Mapping[str, torch.Tensor], skel: Any) -> Any:
    if "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if "__dict__" in skel:
        return {k: unflatten_state(tensors, s) for k, s in skel["__dict__"]}
    if "__list__" in skel:
        return [unflatten_state(tensors, s) for s in skel["__list__"]]
    return skel["__value__"]


def checkpoint_hash(folder: Path) -> str:
    """SHA-256 over the files that define a trained generator (config, weights, normaliser)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "normaliser.json"):
        p = folder / name
        if not p.exists():
            raise CheckpointError(f"{p}: missing (not a complete rlsynth checkpoint)")
        h.update(name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return "sha256:" + h.hexdigest()
