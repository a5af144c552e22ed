"""Hostile catalogs, through the real CLI: a real version is committed with the library, then tampered
with the way a stranger's catalog (a shared bucket, a downloaded archive) could be.

Each case must be refused by :func:`hostile_harness.assert_refused`: exit non-zero, one short line naming
what is wrong, no traceback, no foreign code, bounded memory, and nothing written under the catalog or
the output folder. Warm-cache cases read the version once in this process first (the subprocess shares
``$RLSYNTH_CACHE``), so they prove a cache hit does not hide a damaged part.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from helpers import make_dataset
from hostile_harness import EVIL_ENV_ID, assert_refused, run_cli

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.parquet import to_table
from rlsynth.datasets.types import DatasetInfo


@dataclass(frozen=True)
class Built:
    """A catalog holding ``toy@1`` (two parts and an artifact ``agent.d3``), and folders around it."""

    tmp: Path
    root: Path
    work: Path  # the CLI's working folder (export-file writes here by default)
    out: Path  # where exports are pointed
    outside: Path  # files outside the catalog that it must never reach

    @property
    def vdir(self) -> Path:
        return self.root / "toy" / "_v1"

    @property
    def manifest_path(self) -> Path:
        return self.vdir / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return data

    def write_manifest(self, man: Any) -> None:
        self.manifest_path.write_text(json.dumps(man))

    def edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        man = self.manifest()
        change(man)
        self.write_manifest(man)

    def part(self, i: int = 0) -> Path:
        return self.vdir / f"part-{i:05d}.parquet"

    def args(self, *args: str) -> list[str]:
        return ["datasets", *args, "--catalog", str(self.root)]

    def export(self) -> list[str]:
        return self.args("export", "toy@1", "--format", "hdf5", "--out", str(self.out / "toy.h5"))

    def warm(self) -> None:
        Catalog(self.root).read("toy@1")


@pytest.fixture
def built(tmp_path: Path) -> Built:
    b = Built(tmp_path, tmp_path / "catalog", tmp_path / "work", tmp_path / "out", tmp_path / "outside")
    for d in (b.work, b.out, b.outside):
        d.mkdir()
    agent = tmp_path / "agent.d3"
    agent.write_bytes(b"agent weights")
    Catalog(b.root).write("toy", make_dataset(), files={"agent.d3": agent}, rows_per_part=15)
    agent.unlink()
    (b.outside / "secret").write_bytes(b"not for the catalog")
    return b


Tamper = Callable[[Built], list[str]]


def _field(path: str, value: Any) -> Tamper:
    """Set the manifest field at ``path`` (dots; ``parts.0.path`` indexes a list) and run ``show``."""

    def tamper(b: Built) -> list[str]:
        def change(man: dict[str, Any]) -> None:
            *head, last = path.split(".")
            obj: Any = man
            for k in head:
                obj = obj[int(k)] if isinstance(obj, list) else obj[k]
            obj[int(last) if isinstance(obj, list) else last] = value

        b.edit(change)
        return b.args("show", "toy@1")

    return tamper


def _drop(key: str) -> Tamper:
    def tamper(b: Built) -> list[str]:
        b.edit(lambda man: man.pop(key))
        return b.args("show", "toy@1")

    return tamper


def _raw_manifest(data: bytes) -> Tamper:
    def tamper(b: Built) -> list[str]:
        b.manifest_path.write_bytes(data)
        return b.args("show", "toy@1")

    return tamper


def _huge_manifest(b: Built) -> list[str]:
    with open(b.manifest_path, "r+b") as f:
        f.truncate(4 * 1024**3)  # sparse: costs no disk, would cost gigabytes to parse
    return b.args("show", "toy@1")


def _evil_env(b: Built) -> list[str]:
    def change(man: dict[str, Any]) -> None:
        man["env_id"] = EVIL_ENV_ID
        man["info"]["env_id"] = EVIL_ENV_ID

    b.edit(change)
    return b.export()


def _verify_after(change: Callable[[dict[str, Any]], None]) -> Tamper:
    def tamper(b: Built) -> list[str]:
        b.edit(change)
        return b.args("verify", "toy@1")

    return tamper


def _more_episodes(man: dict[str, Any]) -> None:
    man["counts"]["episodes"] += 1
    man["counts"]["terminated_episodes"] += 1


def _stats(man: dict[str, Any]) -> None:
    man["stats"]["observations"]["mean"][0] += 0.5


def _hash(man: dict[str, Any]) -> None:
    man["content_hash"] = "sha256:" + "0" * 64


def _part_symlink(command: str) -> Tamper:
    def tamper(b: Built) -> list[str]:
        secret = b.outside / "part.parquet"
        shutil.copy(b.part(), secret)  # same bytes: only the link itself is wrong
        b.part().unlink()
        b.part().symlink_to(secret)
        return b.export() if command == "export" else b.args("verify", "toy@1")

    return tamper


def _name_symlink(b: Built) -> list[str]:
    shutil.copytree(b.root / "toy", b.outside / "toy")
    (b.root / "evil").symlink_to(b.outside / "toy")
    return b.args("show", "evil")


def _artifact_symlink(b: Built) -> list[str]:
    stored = b.vdir / "files" / "agent.d3"
    stored.unlink()
    stored.symlink_to(b.outside / "secret")
    return b.args("export-file", "toy@1", "agent.d3")


def _files_dir_symlink(b: Built) -> list[str]:
    shutil.copytree(b.vdir / "files", b.outside / "files")
    shutil.rmtree(b.vdir / "files")
    (b.vdir / "files").symlink_to(b.outside / "files")
    return b.args("export-file", "toy@1", "agent.d3", "--out", str(b.out / "agent.d3"))


def _artifact_traversal_in_manifest(b: Built) -> list[str]:
    def change(man: dict[str, Any]) -> None:
        man["files"]["../../outside/secret"] = man["files"].pop("agent.d3")

    b.edit(change)
    return b.args("show", "toy@1")


def _artifact_traversal_argument(b: Built) -> list[str]:
    return b.args("export-file", "toy@1", "../manifest.json", "--out", str(b.out / "m.json"))


def _warm_then(damage: Callable[[Path], None]) -> Tamper:
    def tamper(b: Built) -> list[str]:
        b.warm()
        damage(b.part())
        return b.export()

    return tamper


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:64])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _stray_part(b: Built) -> list[str]:
    shutil.copy(b.part(0), b.vdir / "part-00009.parquet")
    return b.args("verify", "toy@1")


def _fifo_part(b: Built) -> list[str]:
    b.part().unlink()
    os.mkfifo(b.part())
    return b.export()


def _rewritten_part(b: Built) -> list[str]:
    """A part written for another environment, with the manifest's size and hash updated to match it."""
    ds = make_dataset()
    other = DatasetInfo("Walker2d-v5", ds.info.observation_space, ds.info.action_space)
    buf = io.BytesIO()
    pq.write_table(to_table(ds.transitions, other), buf)
    data = buf.getvalue()
    b.part(0).write_bytes(data)
    b.part(1).unlink()
    part = {"path": b.part(0).name, "rows": len(ds.transitions), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    b.edit(lambda man: man.update(parts=[part]))
    return b.export()


def _rows_lie(b: Built) -> list[str]:
    def change(man: dict[str, Any]) -> None:
        man["parts"][0]["rows"] += 10**9
        man["counts"]["transitions"] += 10**9

    b.edit(change)
    return b.export()


def _poison(b: Built) -> list[str]:
    """A second dataset's manifest claiming the first one's content hash (a cache-poisoning attempt)."""
    cat = Catalog(b.root)
    cat.write("other", make_dataset(seed=5))
    path = b.root / "other" / "_v1" / "manifest.json"
    man = json.loads(path.read_text())
    man["content_hash"] = b.manifest()["content_hash"]
    path.write_text(json.dumps(man))
    return b.args("export", "other", "--format", "hdf5", "--out", str(b.out / "o.h5"))


def _ref(ref: str) -> Tamper:
    return lambda b: b.args("show", ref)


def _deep(b: Built) -> list[str]:
    b.manifest_path.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    return b.args("verify", "toy@1")


CASES: list[tuple[str, Tamper, tuple[str, ...]]] = [
    ("missing-parts", _drop("parts"), ("manifest.json", "'parts' is missing")),
    ("missing-info", _drop("info"), ("manifest.json", "'info'")),
    ("counts-wrong-type", _field("counts.transitions", "29"), ("manifest.json", "counts.transitions")),
    ("parts-not-a-list", _field("parts", {"a": 1}), ("manifest.json", "'parts'")),
    ("stats-wrong-shape", _field("stats.observations.mean", [0.0]), ("stats.observations.mean",)),
    ("not-json", _raw_manifest(b"{not json"), ("manifest.json", "not valid json")),
    ("json-array", _raw_manifest(b"[1, 2]"), ("manifest.json", "expected an object")),
    ("deep-nesting", _deep, ("manifest.json",)),
    ("huge-manifest", _huge_manifest, ("manifest.json", "bytes")),
    ("name-not-folder", _field("name", "other"), ("manifest.json", "'name'")),
    ("version-not-folder", _field("version", 7), ("manifest.json", "'version'")),
    ("evil-env-id", _evil_env, ("manifest.json", "environment id")),
    ("env-id-disagrees", _field("env_id", "Walker2d-v5"), ("'env_id'",)),
    ("created-escape", _field("created", "\x1b]0;pwned\x07"), ("'created'",)),
    ("huge-space", _field("info.observation_space.shape", [10**9]), ("declares",)),
    ("part-traversal", _field("parts.0.path", "../../etc/passwd"), ("not a part name",)),
    ("part-absolute", _field("parts.0.path", "/etc/passwd"), ("not a part name",)),
    ("part-trailing-newline", _field("parts.0.path", "part-00000.parquet\n"), ("not a part name",)),
    ("counts-altered", _verify_after(_more_episodes), ("counts.episodes",)),
    ("stats-altered", _verify_after(_stats), ("stats.observations.mean",)),
    ("hash-altered", _verify_after(_hash), ("content hash differs",)),
    ("part-symlink-verify", _part_symlink("verify"), ("symbolic link",)),
    ("part-symlink-export", _part_symlink("export"), ("symbolic link",)),
    ("name-folder-symlink", _name_symlink, ("symbolic link",)),
    ("artifact-symlink", _artifact_symlink, ("agent.d3", "symbolic link")),
    ("files-folder-symlink", _files_dir_symlink, ("symbolic link",)),
    ("artifact-traversal-manifest", _artifact_traversal_in_manifest, ("not an artifact name",)),
    ("artifact-traversal-argument", _artifact_traversal_argument, ("invalid artifact name",)),
    ("warm-cache-deleted-part", _warm_then(Path.unlink), ("part-00000.parquet", "missing")),
    ("warm-cache-truncated-part", _warm_then(_truncate), ("part-00000.parquet", "bytes")),
    ("warm-cache-rewritten-part", _warm_then(_flip), ("part-00000.parquet", "checksum")),
    ("stray-part", _stray_part, ("part-00009.parquet", "not listed")),
    ("fifo-part", _fifo_part, ("not a regular file",)),
    ("rewritten-part-other-spaces", _rewritten_part, ("part-00000.parquet",)),
    ("rows-lie", _rows_lie, ("part-00000.parquet", "rows")),
    ("cache-poisoning", _poison, ("content hash differs",)),
    ("name-trailing-newline", _ref("toy\n"), ("invalid dataset name",)),
    ("name-dotdot", _ref("toy/../toy"), ("invalid dataset name",)),
    ("version-unicode-digit", _ref("toy@\u00b2"), ("invalid version",)),
]


@pytest.mark.parametrize(("tamper", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_catalog_is_refused(built: Built, tamper: Tamper, expect: tuple[str, ...]) -> None:
    args = tamper(built)
    assert_refused(args, cwd=built.work, watch=[built.root, built.out, built.work], expect=expect)


def test_read_only_commands_create_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no-catalog"
    for args in (["show", "nope"], ["verify", "nope"], ["export-file", "nope", "a.d3"]):
        assert_refused(["datasets", *args, "--catalog", str(missing)], cwd=tmp_path, expect="no dataset")
    out = run_cli(["datasets", "list", "--catalog", str(missing)], cwd=tmp_path)
    assert out.code == 0 and "empty" in out.output
    assert not missing.exists()


def test_list_shows_good_versions_and_warns_about_broken_ones(built: Built) -> None:
    cat = Catalog(built.root)
    cat.write("toy", make_dataset(seed=1))
    cat.write("zeta", make_dataset(seed=2))
    built.write_manifest({"name": "toy"})  # toy@1 broken
    (built.root / "loop").mkdir()
    (built.root / "loop" / "self").symlink_to(built.root / "loop")  # a symlink loop
    (built.root / "toy" / "_v3").symlink_to(built.outside)
    out = run_cli(["datasets", "list", "--catalog", str(built.root)], cwd=built.work)
    assert out.code == 0, out.output
    assert "toy@2" in out.output and "zeta@1" in out.output
    warnings = [line for line in out.lines if line.startswith("warning:")]
    assert len(warnings) == 3, out.output
    assert any("toy@1" in w and "manifest.json" in w for w in warnings)
    assert "Traceback" not in out.output and "unexpected" not in out.output


def test_verify_of_an_intact_version_passes(built: Built) -> None:
    out = run_cli(built.args("verify", "toy@1"), cwd=built.work)
    assert out.code == 0 and ": ok (sha256:" in out.output, out.output
