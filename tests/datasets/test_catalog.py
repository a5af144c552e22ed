"""The versioned catalog: round trips, immutability, atomic commits, verification, name safety."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_transitions, make_dataset

from rlsynth.datasets import catalog as C
from rlsynth.datasets.catalog import Catalog, VersionRef, check_name, parse_ref, split_rows
from rlsynth.datasets.errors import CatalogError, ValidationError
from rlsynth.datasets.types import Dataset, Transitions


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_write_read_round_trip_and_manifest(catalog: Catalog) -> None:
    ds = make_dataset()
    ref = catalog.write("hopper/toy", ds, lineage={"seeds": {"run": 3}}, tags={"kind": "test"})
    assert ref == VersionRef("hopper/toy", 1)
    back = catalog.read("hopper/toy@1")
    assert_same_transitions(ds, back)
    assert back.info == ds.info
    man = catalog.manifest("hopper/toy")
    assert man["version"] == 1 and man["name"] == "hopper/toy"
    assert man["counts"] == {
        "episodes": 4,
        "transitions": 29,
        "terminated_episodes": 2,
        "truncated_episodes": 2,
    }
    assert man["lineage"]["seeds"] == {"run": 3} and man["lineage"]["code_version"].startswith("rlsynth")
    assert man["tags"] == {"kind": "test"}
    assert man["env_id"] == "Hopper-v5"
    assert man["schema"]["columns"]["observations"] == "fixed_size_list<item: float>[11]"
    np.testing.assert_allclose(
        man["stats"]["observations"]["mean"], ds.transitions.observations.mean(0), rtol=1e-5
    )
    returns = [float(e.rewards.astype(np.float64).sum()) for e in ds.episodes()]
    assert man["stats"]["episode_return"]["mean"] == pytest.approx(np.mean(returns))


def test_parquet_schema_is_the_design_contract(catalog: Catalog) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog.write("toy", make_dataset())
    part = next(Path(catalog.root).rglob("part-*.parquet"))
    pf = pq.ParquetFile(part)
    schema = pf.schema_arrow
    assert [f.name for f in schema] == list(Transitions.columns())
    assert str(schema.field("episode_id").type) == "int64" and str(schema.field("step").type) == "int32"
    act = schema.field("actions").type
    assert pa.types.is_fixed_size_list(act) and act.list_size == 3 and act.value_type == pa.float32()
    assert str(schema.field("rewards").type) == "float" and str(schema.field("terminals").type) == "bool"
    assert pf.metadata.row_group(0).column(2).compression == "ZSTD"
    assert json.loads(schema.metadata[b"rlsynth.info"])["env_id"] == "Hopper-v5"


def test_versions_are_immutable_and_increment(catalog: Catalog) -> None:
    a, b = make_dataset(0), make_dataset(1)
    assert str(catalog.write("toy", a)) == "toy@1"
    assert str(catalog.write("toy", b)) == "toy@2"
    assert catalog.resolve("toy") == VersionRef("toy", 2)
    assert_same_transitions(catalog.read("toy@1"), a)
    assert_same_transitions(catalog.read("toy"), b)
    with pytest.raises(CatalogError, match="'toy@3' does not exist"):
        catalog.read("toy@3")


def test_content_hash_does_not_depend_on_part_split(catalog: Catalog) -> None:
    ds = make_dataset(lengths=(4, 6, 3, 8, 2, 7))
    one = catalog.write("one", ds, rows_per_part=1000)
    many = catalog.write("many", ds, rows_per_part=5)
    assert len(catalog.manifest(many)["parts"]) > 1
    assert catalog.manifest(one)["content_hash"] == catalog.manifest(many)["content_hash"]
    other = make_dataset(seed=9, lengths=(4, 6, 3, 8, 2, 7))
    assert (
        catalog.manifest(catalog.write("other", other))["content_hash"]
        != catalog.manifest(one)["content_hash"]
    )


def test_parts_written_by_threads_are_the_files_one_thread_writes(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dataset(lengths=(4, 6, 3, 8, 2, 7))
    monkeypatch.setattr(C, "cores", lambda: 1)
    serial = catalog.manifest(catalog.write("serial", ds, rows_per_part=5))
    monkeypatch.setattr(C, "cores", lambda: 4)
    threaded = catalog.manifest(catalog.write("threaded", ds, rows_per_part=5))
    assert len(threaded["parts"]) == 6
    assert threaded["parts"] == serial["parts"] and threaded["content_hash"] == serial["content_hash"]
    assert threaded["stats"] == serial["stats"]
    assert_same_transitions(ds, catalog.read("threaded"))


def test_content_hash_is_the_same_with_columns_hashed_in_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_dataset(lengths=(4, 6, 3, 8, 2, 7))
    serial = C.ContentHasher(ds.info)
    serial.update(ds.transitions)
    monkeypatch.setattr(C, "PARALLEL_HASH_ROWS", 1)
    monkeypatch.setattr(C, "cores", lambda: 4)
    threaded = C.ContentHasher(ds.info)
    threaded.update(ds.transitions)
    assert threaded.hexdigest() == serial.hexdigest()


def test_a_failed_part_in_a_threaded_write_leaves_nothing(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = C.Transaction.write_part

    def flaky(self: C.Transaction, index: int, t: Transitions) -> dict[str, object]:
        if index == 2:
            raise OSError("disk full (injected)")
        return real(self, index, t)

    monkeypatch.setattr(C, "cores", lambda: 2)
    monkeypatch.setattr(C.Transaction, "write_part", flaky)
    with pytest.raises(OSError, match="injected"):
        catalog.write("toy", make_dataset(lengths=(4, 6, 3, 8, 2, 7)), rows_per_part=5)
    assert _staging(catalog) == [] and catalog.versions("toy") == []


def test_split_rows_keeps_whole_episodes() -> None:
    t = make_dataset(lengths=(5, 3, 10, 1)).transitions
    parts = list(split_rows(t, 4))
    assert [len(p) for p in parts] == [5, 3, 10, 1]
    assert [len(p) for p in split_rows(t, 8)] == [8, 10, 1]


def test_verify_catches_one_flipped_byte(catalog: Catalog) -> None:
    catalog.write("toy", make_dataset())
    assert catalog.verify("toy")["ok"]
    part = next(Path(catalog.root).rglob("part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    res = catalog.verify("toy")
    assert not res["ok"] and "checksum mismatch" in res["problems"][0]
    with pytest.raises(CatalogError, match="checksum mismatch"):
        catalog.read("toy")


def test_verify_catches_a_damaged_artifact(catalog: Catalog, tmp_path: Path) -> None:
    f = tmp_path / "agent.d3"
    f.write_bytes(b"weights")
    catalog.write("toy", make_dataset(), files={"agent.d3": f})
    assert catalog.file_bytes("toy", "agent.d3") == b"weights"
    stored = next(Path(catalog.root).rglob("files/agent.d3"))
    stored.write_bytes(b"weightz")
    assert not catalog.verify("toy")["ok"]
    with pytest.raises(CatalogError, match="checksum"):
        catalog.file_bytes("toy", "agent.d3")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../escape",
        "a/../../b",
        "/abs",
        "a//b",
        "Upper",
        "a/",
        ".hidden",
        "_v1",
        "a b",
        "a\\b",
        "x" * 201,
        "a/_staging",
        "~home",
        "toy\n",
        "a/\nb",
    ],
)
def test_names_that_escape_or_are_malformed_are_refused(catalog: Catalog, name: str) -> None:
    with pytest.raises(CatalogError):
        check_name(name)
    with pytest.raises(CatalogError):
        catalog.write(name, make_dataset())
    assert _files(Path(catalog.root)) == []


@pytest.mark.parametrize("ref", ["toy@0", "toy@-1", "toy@x", "toy@", "toy@1@2", "toy@1\n", "toy@\u0661"])
def test_bad_version_references_are_refused(ref: str) -> None:
    with pytest.raises(CatalogError):
        parse_ref(ref)


def test_invalid_data_is_refused_before_anything_is_written(catalog: Catalog) -> None:
    ds = make_dataset()
    t = ds.transitions
    bad_rewards = t.rewards.copy()
    bad_rewards[3] = np.nan
    cols = {c: getattr(t, c) for c in Transitions.columns()}
    cols["rewards"] = bad_rewards
    bad = Dataset(ds.info, Transitions(**cols))
    with pytest.raises(ValidationError, match="field 'rewards', episode 0: non-finite"):
        catalog.write("toy", bad)
    assert _files(Path(catalog.root)) == []


def test_retried_part_replaces_and_missing_part_blocks_commit(catalog: Catalog) -> None:
    ds = make_dataset()
    parts = list(split_rows(ds.transitions, 10))
    txn = catalog.begin("toy", ds.info)
    txn.write_part(0, parts[0])
    txn.write_part(0, parts[0])  # a retried task writes its part again
    with pytest.raises(CatalogError, match=r"expected parts 0\.\.1"):
        txn.commit(expected_parts=2)
    assert catalog.versions("toy") == []
    txn.write_part(1, parts[1])
    ref = txn.commit(expected_parts=2)
    assert catalog.manifest(ref)["counts"]["transitions"] == len(parts[0]) + len(parts[1])


def test_part_from_another_process_is_committed_once(catalog: Catalog) -> None:
    ds = make_dataset()
    txn = catalog.begin("toy", ds.info)
    with mp.get_context("spawn").Pool(1) as pool:
        info = pool.apply(txn.write_part, (0, ds.transitions))
    assert info["rows"] == len(ds.transitions)
    ref = txn.commit(expected_parts=1)
    assert_same_transitions(catalog.read(ref), ds)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from helpers import make_dataset
    from rlsynth.datasets.catalog import Catalog
    cat = Catalog({root!r})
    ds = make_dataset()
    txn = cat.begin("toy", ds.info)
    txn.write_part(0, ds.transitions)
    if {where!r} == "before-commit":
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename = os.rename
    def dying_rename(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)
    os.rename = dying_rename
    txn.commit()
    """
)


@pytest.mark.parametrize("where", ["before-commit", "at-publish"])
def test_writer_killed_midway_leaves_no_version(catalog: Catalog, where: str) -> None:
    tests = str(Path(__file__).resolve().parents[1])
    script = KILL_SCRIPT.format(tests=tests, root=catalog.root, where=where)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    staged = list(Path(catalog.root).rglob("part-*.parquet"))
    assert staged, "the writer got as far as writing a part"
    if where == "at-publish":
        assert list(Path(catalog.root).rglob("manifest.json")), "the manifest was written, not yet published"
    assert catalog.versions("toy") == [] and catalog.list() == []
    with pytest.raises(CatalogError, match="no dataset named 'toy'"):
        catalog.read("toy")
    assert str(catalog.write("toy", make_dataset())) == "toy@1"


def _commit_concurrently(root: str, seed: int, barrier: object) -> str:
    ds = make_dataset(seed=seed)
    cat = Catalog(root)
    txn = cat.begin("race", ds.info)
    txn.write_part(0, ds.transitions)
    barrier.wait()  # type: ignore[attr-defined]
    return str(txn.commit(lineage={"seeds": {"writer": seed}}))


def test_concurrent_commits_get_distinct_versions(catalog: Catalog) -> None:
    ctx = mp.get_context("fork")
    n = 4
    barrier = ctx.Manager().Barrier(n)
    with ctx.Pool(n) as pool:
        refs = pool.starmap(_commit_concurrently, [(catalog.root, s, barrier) for s in range(n)])
    assert sorted(refs) == [f"race@{v}" for v in range(1, n + 1)]
    for ref in refs:
        man = catalog.manifest(ref)
        seed = man["lineage"]["seeds"]["writer"]
        assert_same_transitions(catalog.read(ref), make_dataset(seed=seed))
        assert catalog.verify(ref)["ok"]


def test_non_local_filesystem_uri_needs_no_code_change() -> None:
    cat = Catalog("mock:///store")
    assert not cat.local
    ds = make_dataset()
    assert str(cat.write("ns/toy", ds, rows_per_part=8)) == "ns/toy@1"
    assert str(cat.write("ns/toy", ds)) == "ns/toy@2"
    assert_same_transitions(cat.read("ns/toy@1"), ds)
    assert cat.verify("ns/toy@1")["ok"]
    assert [m["version"] for m in cat.list()] == [1, 2]


def test_list_skips_staging_and_nested_namespaces(catalog: Catalog) -> None:
    ds = make_dataset()
    catalog.write("a", ds)
    catalog.write("a/b", ds)
    catalog.begin("a", ds.info).write_part(0, ds.transitions)  # never committed
    assert [(m["name"], m["version"]) for m in catalog.list()] == [("a", 1), ("a/b", 1)]


def test_unknown_filesystem_scheme_is_a_clear_error() -> None:
    with pytest.raises(CatalogError, match="catalog 'nosuch://x'"):
        Catalog("nosuch://x")


# -- stray entries, stale staging, SIGTERM ------------------------------------------------------------


@pytest.mark.parametrize("stray", ["file", "symlink"])
def test_a_stray_entry_named_like_a_version_never_blocks_a_commit(
    catalog: Catalog, tmp_path: Path, stray: str
) -> None:
    ds = make_dataset()
    catalog.write("toy", ds)
    entry = Path(catalog.root) / "toy" / "_v2"
    if stray == "file":
        entry.write_bytes(b"not a version")
    else:
        entry.symlink_to(tmp_path)
    assert catalog.versions("toy") == [1]
    assert str(catalog.write("toy", ds)) == "toy@3"  # the number a stray entry holds is skipped
    assert catalog.versions("toy") == [1, 3] and catalog.verify("toy@3")["ok"]


def test_opening_a_catalog_creates_nothing(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "nowhere")
    assert cat.list() == [] and cat.versions("toy") == []
    with pytest.raises(CatalogError, match="no dataset named 'toy'"):
        cat.read("toy")
    assert not (tmp_path / "nowhere").exists()
    cat.write("toy", make_dataset())  # the first commit creates the root
    assert cat.versions("toy") == [1]


def _staging(catalog: Catalog, name: str = "toy") -> list[str]:
    d = Path(catalog.root) / name / "_staging"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_the_next_commit_clears_what_a_killed_writer_left(catalog: Catalog) -> None:
    tests = str(Path(__file__).resolve().parents[1])
    script = KILL_SCRIPT.format(tests=tests, root=catalog.root, where="before-commit")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert len(_staging(catalog)) == 2  # the part folder and its writer record
    live = catalog.begin("toy", make_dataset().info)  # a commit in progress here: never touched
    live.write_part(0, make_dataset().transitions)
    catalog.write("toy", make_dataset())
    assert _staging(catalog) == sorted([live.txn_id, f"{live.txn_id}.writer.json"])
    live.commit()
    assert _staging(catalog) == []


def test_staging_without_a_writer_is_cleared_by_age_only(catalog: Catalog) -> None:
    catalog.write("toy", make_dataset())
    legacy = Path(catalog.root) / "toy" / "_staging" / ("a" * 32)
    legacy.mkdir()
    (legacy / "part-00000.parquet").write_bytes(b"x" * 1000)
    assert catalog.clear_stale_staging("toy") == []
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    assert catalog.clear_stale_staging(older_than_s=3600) == [str(legacy)]
    assert _staging(catalog) == []


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from helpers import make_dataset
    from rlsynth.datasets import catalog as C
    from rlsynth.datasets.atomic import Terminated, sigterm_as_interrupt
    assert sigterm_as_interrupt()
    real = C.Transaction.write_part
    def slow(self, index, t):
        out = real(self, index, t)
        sys.stdout.write("part written\\n")  # one write: threads' lines must not interleave
        sys.stdout.flush()
        time.sleep({sleep})
        return out
    C.Transaction.write_part = slow
    C.cores = lambda: {threads}
    try:
        C.Catalog({root!r}).write("toy", make_dataset(lengths=(4, 6, 3, 8, 2, 7)), rows_per_part=5)
    except Terminated:
        sys.exit(143)
    """
)


@pytest.mark.parametrize("threads", [1, 2])
def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_staging(catalog: Catalog, threads: int) -> None:
    """With threads the unwinding waits for the parts being written (a second each here), no longer."""
    tests = str(Path(__file__).resolve().parents[1])
    script = SIGTERM_SCRIPT.format(
        tests=tests, root=catalog.root, threads=threads, sleep=1 if threads > 1 else 60
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"part written\n"
    assert list(Path(catalog.root).rglob("part-*.parquet"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read() if proc.stderr else ""
    assert _staging(catalog) == [] and catalog.versions("toy") == []
