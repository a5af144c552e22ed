"""Transitions <-> Arrow tables: the Parquet row schema of DESIGN.md.

Vectors are fixed-size float32 lists, so a column converts to a (N, dim) numpy array without copies.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from datasets.errors import CatalogError
from datasets.types import DatasetInfo, Transitions

FORMAT_VERSION = "rlsynth.transitions/1"
INFO_KEY = b"rlsynth.info"
FORMAT_KEY = b"rlsynth.format"


def arrow_schema(info: DatasetInfo) -> pa.Schema:
    obs_dim, act_dim = info.observation_space.dim, info.action_space.dim
    fields = [
        pa.field("episode_id", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("observations", pa.list_(pa.float32(), obs_dim), nullable=False),
        pa.field("actions", pa.list_(pa.float32(), act_dim), nullable=False),
        pa.field("rewards", pa.float32(), nullable=False),
        pa.field("next_observations", pa.list_(pa.float32(), obs_dim), nullable=False),
        pa.field("terminals", pa.bool_(), nullable=False),
        pa.field("timeouts", pa.bool_(), nullable=False),
    ]
    meta = {
        INFO_KEY: json.dumps(info.to_json(), sort_keys=True).encode(),
        FORMAT_KEY: FORMAT_VERSION.encode(),
    }
    return pa.schema(fields, metadata=meta)


def _vectors(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1)), a.shape[1])


def to_table(t: Transitions, info: DatasetInfo) -> pa.Table:
    schema = arrow_schema(info)
    cols = [
        pa.array(t.episode_id),
        pa.array(t.step),
        _vectors(t.observations),
        _vectors(t.actions),
        pa.array(t.rewards),
        _vectors(t.next_observations),
        pa.array(t.terminals),
        pa.array(t.timeouts),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def _numpy(col: pa.ChunkedArray, where: str, name: str) -> np.ndarray:
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if arr.null_count:
        raise CatalogError(f"{where}: column '{name}' holds nulls")
    if isinstance(arr, pa.FixedSizeListArray):
        width = arr.type.list_size
        values = arr.values
        if arr.offset or len(values) != len(arr) * width:
            values = arr.flatten()
        return values.to_numpy(zero_copy_only=False).reshape(-1, width)
    return arr.to_numpy(zero_copy_only=False)


def from_table(table: pa.Table, where: str) -> Transitions:
    """Columns to numpy (zero-copy where Arrow allows). Raises :class:`CatalogError` on a foreign schema."""
    missing = [c for c in Transitions.columns() if c not in table.column_names]
    if missing:
        raise CatalogError(
            f"{where}: not an rlsynth transitions table (missing columns {', '.join(missing)})"
        )
    cols = {name: _numpy(table.column(name), where, name) for name in Transitions.columns()}
    return Transitions(**cols)


def info_from_schema(schema: pa.Schema, where: str) -> DatasetInfo:
    meta = schema.metadata or {}
    if INFO_KEY not in meta:
        raise CatalogError(f"{where}: Parquet schema carries no rlsynth.info metadata")
    return DatasetInfo.from_json(json.loads(meta[INFO_KEY]))
