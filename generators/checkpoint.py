"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder holds::

    config.json        {"kind": ..., "model": {...}, "train": {...}, "data": {...}}  (the resolved config)
    model.safetensors  the model's weights (EMA weights when training used EMA)
    normaliser.json    per-column mean/std used to (un)normalise the data
    state.safetensors  + state.json  resumable training state (raw weights, optimiser moments, step, RNG)

Optimiser state dicts are nested dicts of tensors and numbers; they are flattened to ``a.b.c`` keys for
safetensors, with the non-tensor leaves and the nesting kept in JSON. Writes go to a temporary name and are
renamed into place, so an interrupted save never leaves a half-written checkpoint behind.

A checkpoint is untrusted input: its model config is checked against the config class's field types and
:data:`SIZE_LIMITS`, its data description and its normalisers against their shapes, each failure one line
naming the file (:mod:`generators.loading` applies these checks before anything is built).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlsynth.datasets.errors import RlsynthError, first_line, read_bounded
from rlsynth.datasets.types import DatasetInfo


class CheckpointError(RlsynthError):
    """A checkpoint folder that is missing, incomplete or does not match the code."""


BLOCK_ROWS = 1 << 16
"""Rows per block when tokens are built and statistics summed (:meth:`Normaliser.fit`,
:func:`generators.tokens.window_normaliser`): bounds the float64 temporaries to a few MB whatever the
dataset's size."""


def column_moments(n: int, rows: Callable[[int, int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean and std per column of an (n, D) table given by ``rows(lo, hi)`` (its rows lo..hi-1, any
    float dtype), two passes over blocks of ``BLOCK_ROWS``: the table itself is never built, so a column
    derived from others (a one-step change) costs one block, not a whole float64 copy."""
    blocks = [(lo, min(lo + BLOCK_ROWS, n)) for lo in range(0, n, BLOCK_ROWS)] or [(0, 0)]
    total = np.zeros(rows(0, 0).shape[1:])
    for lo, hi in blocks:
        total += np.asarray(rows(lo, hi), np.float64).sum(0)
    mean = total / n
    sq = np.zeros_like(mean)
    for lo, hi in blocks:
        d = rows(lo, hi).astype(np.float64) - mean
        sq += np.square(d, out=d).sum(0)
    return mean, np.sqrt(sq / n)


@dataclass(frozen=True)
class Normaliser:
    """Per-dimension z-scoring: ``(x - mean) / std``. Shapes: mean, std (dim,)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, floor: float = 1e-6) -> Normaliser:
        """Mean and std per column of ``x`` (N, ...) in float64, summed over blocks of ``BLOCK_ROWS`` rows so
        that no float64 copy of the whole array is made (2M float32 rows of 27 features: 0.4 GB each);
        a single block gives exactly ``x.mean(0)`` and ``x.std(0)``."""
        flat = np.asarray(x).reshape(len(x), -1)
        return cls.of_moments(*column_moments(len(flat), lambda lo, hi: flat[lo:hi]), floor)

    @classmethod
    def of_moments(cls, mean: np.ndarray, std: np.ndarray, floor: float = 1e-6) -> Normaliser:
        return cls(mean.astype(np.float32), np.maximum(std, floor).astype(np.float32))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.as_tensor(self.mean, device=x.device)) / torch.as_tensor(self.std, device=x.device)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.as_tensor(self.std, device=z.device) + torch.as_tensor(self.mean, device=z.device)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, d: Any, dim: int | None = None, where: str = "normaliser") -> Normaliser:
        """Stats read from a file: finite means, positive finite stds, ``dim`` of each when given (a
        normaliser of another size would broadcast into wrong samples, a zero std divides by zero)."""
        if not isinstance(d, Mapping) or not {"mean", "std"} <= d.keys():
            raise CheckpointError(f"{where}: expected {{'mean': [...], 'std': [...]}}")
        mean, std = _float_list(d["mean"], f"{where} mean"), _float_list(d["std"], f"{where} std")
        if len(mean) != len(std) or (dim is not None and len(mean) != dim):
            want = f"{dim}" if dim is not None else "equal"
            raise CheckpointError(f"{where}: {len(mean)} means and {len(std)} stds, expected {want} of each")
        if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0 for v in std):
            raise CheckpointError(f"{where}: means must be finite and stds finite and positive")
        return cls(np.asarray(mean, np.float32), np.asarray(std, np.float32))


MAX_STATS = 1 << 20
"""The most entries one normaliser may hold (a million dimensions is far beyond any observation)."""


def _float_list(v: Any, where: str) -> list[float]:
    if not isinstance(v, list) or len(v) > MAX_STATS:
        raise CheckpointError(f"{where}: expected a list of at most {MAX_STATS} numbers")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        raise CheckpointError(f"{where}: expected numbers only")
    # float32 overflow (1e39) is as bad as a literal Infinity.
    return [float(np.float32(x)) if abs(x) < 3.4e38 else math.inf for x in v]


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


MAX_JSON_BYTES = 16 * 1024**2
"""Checkpoint JSON files (config, normaliser, training state with its loss history) stay far below this;
a bigger one is refused before it is read."""


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A checkpoint's JSON file, bounded in size; every failure is one line naming the file."""
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: missing (not a complete rlsynth checkpoint)")
    data = read_bounded(path, limit, "checkpoint file", CheckpointError)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot be read ({first_line(e)})") from None


# safetensors' own limit on its JSON header: a larger length field is a damaged or hostile file.
MAX_HEADER_BYTES = 100 * 1024**2
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
TORCH_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as a safetensors header declares it: dtype name (``F32``...) and shape."""

    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorSpec]:
    """The tensors a safetensors file declares, checked against the file's size before any is read.

    The format: an 8-byte little-endian header length, that many bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``), then the data. Every tensor's byte
    range must be its shape × itemsize, inside the file, and the ranges must tile the data exactly, so
    no declared shape can make a reader allocate more than the file holds.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a valid safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header length {n} exceeds its {size} bytes)"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete rlsynth checkpoint)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(e)})") from None
    return _check_header(path, header, size - 8 - n)


def _check_header(path: Path, header: Any, data_bytes: int) -> dict[str, TensorSpec]:
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    specs: dict[str, TensorSpec] = {}
    ranges: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"{path}: not a valid safetensors file (tensor {name[:60]!r}: "
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            raise CheckpointError(bad + "missing or unknown dtype)")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            raise CheckpointError(bad + "shape and data_offsets must be lists of non-negative integers)")
        begin, end = offsets
        if not begin <= end <= data_bytes or math.prod(shape) * DTYPE_BYTES[entry["dtype"]] != end - begin:
            raise CheckpointError(
                bad + f"shape {shape[:8]} does not fit bytes {begin}-{end} of {data_bytes})"
            )
        specs[name] = TensorSpec(entry["dtype"], tuple(shape))
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise CheckpointError(
                f"{path}: not a valid safetensors file (tensor byte ranges overlap or leave gaps)"
            )
        position = end
    if position != data_bytes:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({data_bytes - position} bytes unaccounted for)"
        )
    return specs


def _ints(v: Any) -> TypeGuard[list[int]]:
    return isinstance(v, list) and len(v) <= 16 and all(type(x) is int and x >= 0 for x in v)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The header a file holding ``tensors`` would have (works on ``meta`` tensors: nothing allocated)."""
    return {
        k: TensorSpec(TORCH_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in tensors.items()
    }


def check_specs(path: Path, found: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec]) -> None:
    """Refuse a file whose tensors are not exactly the expected names, dtypes and shapes."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        shown = ", ".join([f"missing {k}" for k in missing[:2]] + [f"extra {k}" for k in extra[:2]])
        raise CheckpointError(f"{path}: tensors do not match the config ({shown[:200]})")
    for k, spec in expected.items():
        if found[k] != spec:
            raise CheckpointError(
                f"{path}: tensor {k} is {found[k].dtype}{list(found[k].shape)[:8]}, "
                f"the config needs {spec.dtype}{list(spec.shape)[:8]}"
            )


def read_tensors(path: Path, expected: Mapping[str, TensorSpec] | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; the header is checked against the file's size (and ``expected``,
    when given) before anything is read."""
    found = read_header(path)
    if expected is not None:
        check_specs(path, found, expected)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files.
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(e)})") from None


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


# Upper bounds on a checkpoint's architecture sizes, far above any preset (gpu-paper's largest width is
# 1024): a config.json is untrusted, and these keep even building a meta-device skeleton cheap.
SIZE_LIMITS = {
    "horizon": 1024, "width": 8192, "depth": 64, "emb": 4096, "heads": 64, "kv_heads": 64,
    "mlp_ratio": 16, "stride": 1024, "sample_steps": 10_000, "refine_steps": 1000, "ensemble": 100,
    "elites": 100, "hidden": 8192, "layers": 64, "channels": 8192, "polish": 10_000,
}  # fmt: skip
# Settings where 0 means "none" (no refinement steps, no polishing) rather than an empty model.
MAY_BE_ZERO = frozenset({"refine_steps", "polish"})
MAX_CHANNEL_LEVELS = 8
SIGNED_FLOATS = frozenset({"p_mean"})
"""Float settings that may be negative (log σ's mean); every other one is a non-negative scale."""


def _check_number(name: str, v: Any, hint: Any, where: Path) -> None:
    """One model-config value against its declared type and bound."""
    bad = f"{where}: model setting {name}={str(v)[:40]}"
    name = name.rsplit(".", 1)[-1]
    if hint is float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise CheckpointError(f"{bad} is not a finite number")
        if v < 0 and name not in SIGNED_FLOATS:
            raise CheckpointError(f"{bad} must not be negative")
        return
    if v is None and hint == (int | None):
        return
    limit = SIZE_LIMITS.get(name, 1_000_000)
    lowest = 0 if name in MAY_BE_ZERO else 1
    if type(v) is not int or not lowest <= v <= limit:
        raise CheckpointError(f"{bad} must be an integer in [{lowest}, {limit}]")


def check_model_fields(cls: Any, d: Any, where: Path, prefix: str = "") -> None:
    """Every field of ``d`` is one of ``cls``'s, of its type and within :data:`SIZE_LIMITS` (nested
    dataclasses are checked the same way), before anything is built from it."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: model config {prefix or 'model'} is not a JSON object")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise CheckpointError(f"{where}: unknown model setting {prefix}{unknown[0][:40]}")
    for name, v in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            check_model_fields(hint, v, where, f"{prefix}{name}.")
        elif typing.get_origin(hint) is tuple:
            if not isinstance(v, list) or not 1 <= len(v) <= MAX_CHANNEL_LEVELS:
                raise CheckpointError(
                    f"{where}: model setting {name} must be a list of 1-{MAX_CHANNEL_LEVELS} sizes"
                )
            for x in v:
                _check_number(name, x, int, where)
        else:
            _check_number(f"{prefix}{name}", v, hint, where)


def checkpoint_info(config: Any, where: Path) -> DatasetInfo:
    """The data description a checkpoint records (its env id checked: gymnasium would import a
    ``module:Name`` id); each failure is one line naming the file."""
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("info"), dict):
        raise CheckpointError(f"{where}: no data.info (not an rlsynth generator config)")
    if not isinstance(data.get("source", {}), dict):
        raise CheckpointError(f"{where}: data.source is not a JSON object")
    try:
        return DatasetInfo.from_json(data["info"])
    except RlsynthError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: data.info is malformed ({type(e).__name__}: {e})") from None


def read_norms(path: Path, dims: dict[str, int]) -> dict[str, Normaliser]:
    stats = read_json(path)
    if not isinstance(stats, dict) or set(stats) != set(dims):
        raise CheckpointError(f"{path}: expected normalisers {sorted(dims)}")
    return {k: Normaliser.from_json(stats[k], dims[k], f"{path} [{k}]") for k in dims}
