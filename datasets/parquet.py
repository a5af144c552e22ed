"""Transitions <-> Arrow tables: the Parquet row schema of DESIGN.md.

Vectors are fixed-size float32 lists, so a column converts to a (N, dim) numpy array without copies.
:func:`read_part` is the one way a stored part becomes arrays: it checks the footer (row count, declared
decoded size) and the schema before Arrow decodes a single page; it can decode only some columns.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlsynth.datasets.errors import CatalogError, brief
from rlsynth.datasets.types import DatasetInfo, Transitions

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


DICTIONARY_COLUMNS = ("episode_id", "step")
"""The columns a part dictionary-encodes: few distinct values (flags are bit-packed as they are). Float
columns are written plain, then zstd: their values are almost all distinct, so a dictionary would be
built, overflow and be dropped on every page, time spent for nothing (BENCHMARKS.md, Scale)."""


def encode_part(t: Transitions, info: DatasetInfo) -> bytes:
    """The Parquet bytes of one part: the row schema, zstd level 1 (the fastest level), dictionaries only
    on :data:`DICTIONARY_COLUMNS`."""
    buf = io.BytesIO()
    table = to_table(t, info)
    pq.write_table(
        table, buf, compression="zstd", compression_level=1, use_dictionary=list(DICTIONARY_COLUMNS)
    )
    return buf.getvalue()


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


def table_arrays(table: pa.Table, columns: Sequence[str], where: str) -> dict[str, np.ndarray]:
    """The named columns as numpy (zero-copy where Arrow allows), in the order asked.

    Raises :class:`CatalogError` on a table that lacks one of them (a foreign schema)."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise CatalogError(
            f"{where}: not an rlsynth transitions table (missing columns {', '.join(missing)})"
        )
    return {name: _numpy(table.column(name), where, name) for name in columns}


def from_table(table: pa.Table, where: str) -> Transitions:
    """Every column to numpy (zero-copy where Arrow allows). Raises :class:`CatalogError` on a foreign
    schema."""
    return Transitions(**table_arrays(table, Transitions.columns(), where))


def info_from_schema(schema: pa.Schema, where: str) -> DatasetInfo:
    meta = schema.metadata or {}
    if INFO_KEY not in meta:
        raise CatalogError(f"{where}: Parquet schema carries no rlsynth.info metadata")
    try:
        return DatasetInfo.from_json(json.loads(meta[INFO_KEY]))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CatalogError(f"{where}: Parquet rlsynth.info metadata is not valid ({brief(e)})") from None


# Bytes a row takes once decoded (the Arrow arrays from_table returns).
def row_bytes(info: DatasetInfo) -> int:
    return 8 + 4 + 4 * (2 * info.observation_space.dim + info.action_space.dim) + 4 + 1 + 1


# Parquet's encodings (RLE, dictionaries) can beat zstd on constant columns, so the bounds on what a
# part may decode to are generous; they exist so that a few-KB file cannot declare terabytes.
MAX_DECODED_OVERHEAD = 4
MAX_DECODED_FLOOR = 256 * 1024**2
MAX_COMPRESSION_RATIO = 1000


def check_schema(schema: pa.Schema, info: DatasetInfo, where: str) -> None:
    """Refuse a part whose columns are not exactly the rlsynth row schema for ``info``."""
    expected = arrow_schema(info)
    names = [f.name for f in schema]
    if names != expected.names:
        raise CatalogError(f"{where}: columns {names[:10]} are not the rlsynth row schema")
    for got, want in zip(schema, expected, strict=True):
        if not got.type.equals(want.type):
            raise CatalogError(f"{where}: column '{got.name}' is {got.type}, expected {want.type}")
    if info_from_schema(schema, where) != info:
        raise CatalogError(f"{where}: written for other spaces than the manifest records")


def read_part(
    data: pa.Buffer, rows: int, info: DatasetInfo, where: str, columns: Sequence[str] | None = None
) -> pa.Table:
    """A stored part as a table, refused before decoding if its footer disagrees with the manifest's
    ``rows``, declares more decoded bytes than such rows take, or has another schema.

    ``columns``: decode only these (Parquet stores each column apart, so the others are never
    decompressed); the footer and schema checks still cover every column."""
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        meta = pf.metadata
    except (pa.ArrowException, OSError) as e:
        raise CatalogError(f"{where}: not valid Parquet ({brief(e)})") from None
    if meta.num_rows != rows:
        raise CatalogError(f"{where}: holds {meta.num_rows} rows where the manifest records {rows}")
    declared = sum(
        meta.row_group(g).column(c).total_uncompressed_size
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    )
    decoded = rows * row_bytes(info)
    if decoded > max(MAX_COMPRESSION_RATIO * data.size, MAX_DECODED_FLOOR):
        raise CatalogError(
            f"{where}: {rows} rows would decode to {decoded} bytes from a {data.size}-byte file"
        )
    bound = max(MAX_DECODED_OVERHEAD * decoded, MAX_DECODED_FLOOR)
    if declared > bound:
        raise CatalogError(f"{where}: declares {declared} decoded bytes for {rows} rows (at most {bound})")
    check_schema(pf.schema_arrow, info, where)
    try:
        table = pf.read(columns=None if columns is None else list(columns))
    except MemoryError:
        raise  # Arrow's allocation failures subclass ArrowException too; they say nothing about the file
    except (pa.ArrowException, OSError) as e:
        raise CatalogError(f"{where}: not valid Parquet ({brief(e)})") from None
    if table.num_rows != rows:
        raise CatalogError(f"{where}: holds {table.num_rows} rows where the manifest records {rows}")
    return table
