"""How a part is encoded: dictionaries only where values repeat, and bytes that decode to the rows."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
from helpers import assert_same_transitions, make_dataset

from rlsynth.datasets.parquet import DICTIONARY_COLUMNS, encode_part, from_table, to_table
from rlsynth.datasets.types import Dataset


def test_a_part_dictionary_encodes_its_integer_columns_and_writes_floats_plain() -> None:
    ds = make_dataset(lengths=(40, 30, 50))
    meta = pq.ParquetFile(io.BytesIO(encode_part(ds.transitions, ds.info))).metadata
    assert meta.num_rows == len(ds.transitions)
    seen = set()
    for i in range(meta.row_group(0).num_columns):
        col = meta.row_group(0).column(i)
        name = col.path_in_schema.split(".")[0]
        seen.add(name)
        dictionary = any("DICTIONARY" in e for e in col.encodings)
        assert dictionary == (name in DICTIONARY_COLUMNS), (name, col.encodings)
        assert col.compression == "ZSTD"
    assert seen == set(to_table(ds.transitions, ds.info).column_names)


def test_an_encoded_part_decodes_to_the_same_rows() -> None:
    ds = make_dataset(lengths=(7, 9))
    table = pq.read_table(io.BytesIO(encode_part(ds.transitions, ds.info)))
    assert table.equals(to_table(ds.transitions, ds.info))
    assert_same_transitions(Dataset(info=ds.info, transitions=from_table(table, "part"), source="part"), ds)
