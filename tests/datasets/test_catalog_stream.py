"""Streaming reads: batches part by part, column projection, checks while streaming, bounded memory."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import big_transitions, hopper_info, make_dataset, run_capped_child

from rlsynth.datasets.catalog import Catalog, VersionRef
from rlsynth.datasets.errors import CatalogError
from rlsynth.datasets.types import Dataset, Transitions

LENGTHS = (5, 9, 3, 12, 7, 4)


def _toy(catalog: Catalog) -> VersionRef:
    """Six episodes, one per part (each is longer than half of rows_per_part)."""
    ref = catalog.write("toy", make_dataset(lengths=LENGTHS), rows_per_part=10)
    assert len(catalog.manifest(ref)["parts"]) == len(LENGTHS)
    return ref


def _concat(batches: list[dict[str, np.ndarray]], column: str) -> np.ndarray:
    return np.concatenate([b[column] for b in batches])


def _part(catalog: Catalog, i: int) -> Path:
    return Path(catalog.root) / "toy" / "_v1" / f"part-{i:05d}.parquet"


def test_all_column_batches_concatenate_to_read(catalog: Catalog) -> None:
    ref = _toy(catalog)
    batches = list(catalog.iter_batches(ref, max_rows=4))
    # A batch never spans two parts: 5 -> 4+1, 9 -> 4+4+1, 3, 12 -> 4+4+4, 7 -> 4+3, 4.
    assert [len(b["rewards"]) for b in batches] == [4, 1, 4, 4, 1, 3, 4, 4, 4, 4, 3, 4]
    whole = catalog.read(ref).transitions
    for b in batches:
        assert tuple(b) == Transitions.columns()
    for c in Transitions.columns():
        got, want = _concat(batches, c), getattr(whole, c)
        assert got.dtype == want.dtype and got.shape == want.shape, c
        np.testing.assert_array_equal(got, want, err_msg=c)
    # Batches own their memory: writable (torch.from_numpy takes them as is), pinning no part.
    assert all(a.flags.writeable and a.flags.owndata for b in batches for a in b.values())


def test_projection_decodes_only_the_asked_columns(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _toy(catalog)
    asked: list[object] = []
    real_read = pq.ParquetFile.read

    def spy(self: pq.ParquetFile, columns: list[str] | None = None, **kw: object) -> object:
        asked.append(columns)
        return real_read(self, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    batches = list(catalog.iter_batches(ref, columns=["rewards", "observations", "rewards"]))
    assert asked == [["rewards", "observations"]] * len(LENGTHS)
    assert all(tuple(b) == ("rewards", "observations") for b in batches)
    whole = catalog.read(ref, use_cache=False).transitions
    np.testing.assert_array_equal(_concat(batches, "rewards"), whole.rewards)
    np.testing.assert_array_equal(_concat(batches, "observations"), whole.observations)
    assert _concat(batches, "observations").shape == (sum(LENGTHS), 11)


def test_bad_columns_and_batch_sizes_are_refused_at_the_call(catalog: Catalog) -> None:
    ref = _toy(catalog)
    with pytest.raises(CatalogError, match=r"^unknown column 'rewardz' \(columns: episode_id, step, "):
        catalog.iter_batches(ref, columns=["rewards", "rewardz"])
    with pytest.raises(CatalogError, match=r"unknown columns 'a', 'b' \(columns: .*timeouts\)$"):
        catalog.iter_batches(ref, columns=["a", "b"])
    with pytest.raises(CatalogError, match="not the string 'rewards'"):
        catalog.iter_batches(ref, columns="rewards")
    with pytest.raises(CatalogError, match="no columns asked for"):
        catalog.iter_batches(ref, columns=[])
    with pytest.raises(CatalogError, match="max_rows must be a positive integer"):
        catalog.iter_batches(ref, max_rows=0)
    with pytest.raises(CatalogError, match="'toy@2' does not exist"):
        catalog.iter_batches("toy@2")


@pytest.mark.parametrize("columns", [None, ["rewards"]])
def test_a_damaged_part_is_named_after_the_parts_before_it(
    catalog: Catalog, columns: list[str] | None
) -> None:
    ref = _toy(catalog)
    part = _part(catalog, 1)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    it = catalog.iter_batches(ref, columns=columns)
    first = next(it)  # part 0 is intact: streaming reaches the damage only when it gets there
    assert len(first["rewards"]) == LENGTHS[0]
    with pytest.raises(CatalogError, match=r"^toy@1 part part-00001\.parquet: checksum mismatch"):
        next(it)


def test_a_truncated_part_fails_before_any_batch(catalog: Catalog) -> None:
    ref = _toy(catalog)
    part = _part(catalog, 3)
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(CatalogError, match=r"toy@1 part part-00003\.parquet: is 100 bytes"):
        catalog.iter_batches(ref)


def test_a_content_hash_mismatch_raises_after_the_last_batch(catalog: Catalog) -> None:
    ref = _toy(catalog)
    man_path = Path(catalog.root) / "toy" / "_v1" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["content_hash"] = "sha256:" + "0" * 64
    man_path.write_text(json.dumps(man))
    seen = []
    with pytest.raises(CatalogError, match=r"^toy@1: content hash differs from the manifest"):
        for b in catalog.iter_batches(ref):
            seen.append(len(b["rewards"]))
    assert sum(seen) == sum(LENGTHS)  # every batch came out first: consumers commit only at the end
    # A projection cannot recompute the hash (it needs every column); the part checksums still hold.
    assert sum(len(b["rewards"]) for b in catalog.iter_batches(ref, columns=["rewards"])) == sum(LENGTHS)
    with pytest.raises(CatalogError, match="content hash differs"):
        catalog.read(ref, use_cache=False)
    assert not catalog.verify(ref)["ok"]


# -- larger than memory ----------------------------------------------------------------------------
# The child caps its address space at what it uses after its imports and a warm-up, plus MARGIN. The
# big version decodes to over 3x MARGIN, and read needs about twice that (every part, then their
# concatenation); streaming holds one ~1 MiB part and needs about 5 MiB. Its values repeat, so the parts
# compress to little on disk and the write stays fast: memory depends on the decoded size only.
MARGIN = 24 * 2**20
BIG_EPISODES, BIG_LENGTH, BIG_ROWS_PER_PART = 7_000, 100, 8_000

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from rlsynth.datasets.catalog import Catalog

    def address_space():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    cat, margin = Catalog(sys.argv[1]), int(sys.argv[2])
    # Warm-up on a tiny version: Arrow's thread pools and lazily built code paths exist before the cap.
    for _ in cat.iter_batches("warm"):
        pass
    cat.verify("warm")
    cat.read("warm", use_cache=False)
    limit = address_space() + margin
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rows, total = 0, 0.0
    for b in cat.iter_batches("big"):
        rows += len(b["rewards"])
        total += float(b["rewards"].sum(dtype=np.float64))
    out = {"rows": rows, "reward_sum": total, "verify_ok": cat.verify("big")["ok"]}
    try:
        cat.read("big", use_cache=False)
        out["read"] = "ok"
    except MemoryError:
        out["read"] = "MemoryError"
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the address space from /proc")
def test_a_version_larger_than_memory_streams_where_read_fails(catalog: Catalog) -> None:
    big = big_transitions(BIG_EPISODES, BIG_LENGTH)
    decoded = sum(getattr(big, c).nbytes for c in Transitions.columns())
    assert decoded > 3 * MARGIN
    expected_sum = float(big.rewards.sum(dtype=np.float64))
    catalog.write("big", Dataset(hopper_info(), big), rows_per_part=BIG_ROWS_PER_PART)
    del big
    catalog.write("warm", make_dataset(), rows_per_part=10)
    out = run_capped_child(CHILD, catalog.root, str(MARGIN), timeout=120)
    assert out == {
        "rows": BIG_EPISODES * BIG_LENGTH,
        "reward_sum": expected_sum,
        "verify_ok": True,
        "read": "MemoryError",
    }
