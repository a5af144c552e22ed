"""The versioned Parquet catalog.

Layout under the catalog root (any pyarrow filesystem URI; a plain path is a local directory)::

    <name>/_v<N>/part-00000.parquet ...   Parquet parts (zstd, fixed-size float32 lists)
    <name>/_v<N>/files/<file>             artifacts kept with the version (e.g. the agent of a recipe)
    <name>/_v<N>/manifest.json            written last; a version exists iff its manifest does
    <name>/_staging/<txn>/                parts of a commit in progress (never visible)

Names are ``[a-z0-9][a-z0-9._-]*`` components joined by ``/``; version folders start with ``_`` so they can
never collide with a name. A commit writes parts (from any process: a :class:`Transaction` is a plain
picklable value), validates and hashes them, writes the manifest, and publishes the whole folder:

* local filesystem: one ``rename(2)`` of the staging folder to ``_v<N>``; rename refuses a non-empty target,
  so two writers racing for N get N and N+1, and a writer killed at any point leaves no version;
* other filesystems (``s3://``, ...): parts are moved into ``_v<N>`` and the manifest is written last, so a
  killed writer still leaves no version; object stores have no exclusive create, so two writers racing on
  the same name there are not separated (documented limitation).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from datasets import cache
from datasets.errors import CatalogError, RlsynthError
from datasets.parquet import FORMAT_VERSION, arrow_schema, from_table, info_from_schema, to_table
from datasets.types import Dataset, DatasetInfo, Transitions
from datasets.validation import validate_transitions

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)*$")
MAX_NAME_LENGTH = 200
DEFAULT_CATALOG = "~/.rlsynth/catalog"
MANIFEST = "manifest.json"
PART_RE = re.compile(r"^part-(\d{5})\.parquet$")
VERSION_RE = re.compile(r"^_v([1-9]\d*)$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ANNOTATION_KEYS = frozenset({"fidelity"})


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass(frozen=True, order=True)
class VersionRef:
    """A committed version ``name@version``."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def check_name(name: str) -> str:
    """Refuse names that are malformed or could escape the catalog root (``..``, ``/x``, ``a//b``, ...)."""
    if not isinstance(name, str) or not name:
        raise CatalogError("dataset name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise CatalogError(f"dataset name '{name[:40]}...' is longer than {MAX_NAME_LENGTH} characters")
    if not NAME_RE.match(name):
        raise CatalogError(
            f"invalid dataset name '{name}': use [a-z0-9][a-z0-9._-]* components separated by '/'"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` -> (NAME, None) meaning latest; ``NAME@N`` -> (NAME, N)."""
    name, sep, ver = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not ver.isdigit() or int(ver) < 1:
        raise CatalogError(f"invalid version in '{ref}': expected NAME@N with N = 1, 2, ...")
    return name, int(ver)


def default_catalog_uri() -> str:
    return os.environ.get("RLSYNTH_CATALOG") or DEFAULT_CATALOG


def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"rlsynth {version('rlsynth')}"
    except PackageNotFoundError:
        return "rlsynth (not installed)"


class ContentHasher:
    """Hash of a dataset's logical content, independent of how rows are split into parts.

    One running SHA-256 per column is fed the parts in order; the result hashes the format, the info
    and the column digests. Re-splitting the same rows gives the same hash; any changed value does not.
    """

    def __init__(self, info: DatasetInfo) -> None:
        self._info = json.dumps(info.to_json(), sort_keys=True)
        self._cols = {c: hashlib.sha256() for c in Transitions.columns()}

    def update(self, t: Transitions) -> None:
        for c, h in self._cols.items():
            a = np.ascontiguousarray(getattr(t, c))
            h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(-1).data)

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        h.update(FORMAT_VERSION.encode())
        h.update(self._info.encode())
        for c, ch in self._cols.items():
            h.update(c.encode())
            h.update(ch.digest())
        return "sha256:" + h.hexdigest()


def column_stats(t: Transitions) -> dict[str, Any]:
    """Per-dimension mean/std/min/max of vectors and rewards, and episode return/length summaries."""

    def summary(a: np.ndarray) -> dict[str, list[float]]:
        a = a.reshape(len(a), -1).astype(np.float64)
        return {
            "mean": a.mean(0).tolist(),
            "std": a.std(0).tolist(),
            "min": a.min(0).tolist(),
            "max": a.max(0).tolist(),
        }

    bounds = t.episode_bounds()
    returns = np.add.reduceat(t.rewards.astype(np.float64), bounds[:-1])
    lengths = np.diff(bounds)
    return {
        "observations": summary(t.observations),
        "actions": summary(t.actions),
        "rewards": {k: v[0] for k, v in summary(t.rewards).items()},
        "episode_return": {
            "mean": float(returns.mean()),
            "std": float(returns.std()),
            "min": float(returns.min()),
            "max": float(returns.max()),
        },
        "episode_length": {
            "mean": float(lengths.mean()),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
        },
    }


def _schema_json(info: DatasetInfo) -> dict[str, Any]:
    schema = arrow_schema(info)
    return {"format": FORMAT_VERSION, "columns": {f.name: str(f.type) for f in schema}}


_FILESYSTEMS: dict[str, tuple[pafs.FileSystem, str]] = {}


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem object per URI and process: reuses connections, and lets every Transaction of a
    process see the same in-memory ``mock://`` store (used by the tests of the non-local path)."""
    if uri not in _FILESYSTEMS:
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise CatalogError(f"catalog '{uri}': {e}") from None
        _FILESYSTEMS[uri] = (fs, root.rstrip("/"))
    return _FILESYSTEMS[uri]


class Catalog:
    """A store of immutable dataset versions on a pyarrow filesystem."""

    def __init__(self, uri: str | os.PathLike[str] | None = None) -> None:
        raw = str(uri) if uri is not None else default_catalog_uri()
        self.uri = raw
        if "://" in raw:
            self.fs, self.root = _filesystem(raw)
        else:
            path = Path(raw).expanduser().resolve()
            self.fs = pafs.LocalFileSystem(use_mmap=True)
            self.root = path.as_posix()
            self.uri = self.root
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as e:
            raise CatalogError(f"catalog '{raw}': cannot create or open the root ({e})") from None

    # -- paths ---------------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _version_dir(self, ref: VersionRef) -> str:
        return self._join(check_name(ref.name), f"_v{ref.version}")

    def _exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type != pafs.FileType.NotFound)

    # -- reading -------------------------------------------------------------------------------------
    def _version_dirs(self, name: str) -> list[tuple[int, bool]]:
        """(N, visible) for each ``_v<N>`` folder of ``name``."""
        base = self._join(check_name(name))
        infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        out = []
        for fi in infos:
            m = VERSION_RE.match(fi.base_name)
            if m and fi.type == pafs.FileType.Directory:
                out.append((int(m.group(1)), self._exists(f"{fi.path}/{MANIFEST}")))
        return sorted(out)

    def versions(self, name: str) -> list[int]:
        return [n for n, visible in self._version_dirs(name) if visible]

    def resolve(self, ref: str | VersionRef) -> VersionRef:
        version: int | None
        if isinstance(ref, VersionRef):
            name, version = ref.name, ref.version
        else:
            name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise CatalogError(f"no dataset named '{name}' in catalog {self.uri}")
        if version is None:
            return VersionRef(name, versions[-1])
        if version not in versions:
            raise CatalogError(
                f"'{name}@{version}' does not exist (versions: {', '.join(map(str, versions))})"
            )
        return VersionRef(name, version)

    def manifest(self, ref: str | VersionRef) -> dict[str, Any]:
        r = self.resolve(ref)
        path = f"{self._version_dir(r)}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.read()
            manifest: dict[str, Any] = json.loads(data)
        except (OSError, ValueError) as e:
            raise CatalogError(f"{r}: manifest cannot be read ({e})") from None
        return manifest

    def list(self) -> list[dict[str, Any]]:
        """Manifests of every visible version, sorted by name then version."""
        sel = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        refs = []
        prefix = self.root + "/"
        for fi in self.fs.get_file_info(sel):
            if fi.base_name != MANIFEST or not fi.path.startswith(prefix):
                continue
            parts = fi.path[len(prefix) :].split("/")
            m = VERSION_RE.match(parts[-2]) if len(parts) >= 3 else None
            name = "/".join(parts[:-2])
            if m and NAME_RE.match(name):
                refs.append(VersionRef(name, int(m.group(1))))
        return [self.manifest(r) for r in sorted(refs)]

    def _read_checked(self, path: str, expected_sha: str, label: str) -> pa.Buffer:
        """A whole file as an Arrow buffer (memory-mapped on a local disk), checked against its SHA-256."""
        try:
            with self.fs.open_input_file(path) as f:
                data = f.read_buffer()
        except OSError as e:
            raise CatalogError(f"{label}: cannot be read ({e})") from None
        if _sha256_bytes(memoryview(data)) != expected_sha:
            raise CatalogError(f"{label}: checksum mismatch (the file was altered or damaged)")
        return data

    def read(self, ref: str | VersionRef, *, use_cache: bool = True) -> Dataset:
        """Load a version. Parts are checked against their recorded SHA-256 as they are read; the decoded
        columns then go to the local cache (see :mod:`datasets.cache`), whose later reads are CRC-checked."""
        r = self.resolve(ref)
        man = self.manifest(r)
        info = DatasetInfo.from_json(man["info"])
        cached = cache.load(man["content_hash"]) if use_cache else None
        if cached is not None:
            return Dataset(info=info, transitions=cached, source=str(r))
        vdir = self._version_dir(r)
        tables = []
        for p in man["parts"]:
            data = self._read_checked(f"{vdir}/{p['path']}", p["sha256"], f"{r} part {p['path']}")
            try:
                tables.append(pq.read_table(pa.BufferReader(data)))
            except (pa.ArrowException, OSError) as e:
                raise CatalogError(f"{r} part {p['path']}: not valid Parquet ({e})") from None
        t = from_table(pa.concat_tables(tables), str(r))
        if use_cache:
            cache.store(man["content_hash"], t)
        return Dataset(info=info, transitions=t, source=str(r))

    def file_bytes(self, ref: str | VersionRef, file_name: str) -> bytes:
        """An artifact stored with a version (checked against its hash)."""
        r = self.resolve(ref)
        files = self.manifest(r).get("files", {})
        if file_name not in files:
            raise CatalogError(f"{r} has no file '{file_name}' (files: {', '.join(files) or 'none'})")
        return self._read_checked(
            f"{self._version_dir(r)}/files/{file_name}", files[file_name]["sha256"], f"{r} file {file_name}"
        ).to_pybytes()

    def verify(self, ref: str | VersionRef) -> dict[str, Any]:
        """Re-hash every file and recompute the content hash; never raises for damaged data."""
        r = self.resolve(ref)
        man = self.manifest(r)
        problems: list[str] = []
        info = DatasetInfo.from_json(man["info"])
        hasher = ContentHasher(info)
        vdir = self._version_dir(r)
        rows = 0
        for p in man["parts"]:
            try:
                data = self._read_checked(f"{vdir}/{p['path']}", p["sha256"], f"part {p['path']}")
                t = from_table(pq.read_table(pa.BufferReader(data)), p["path"])
                validate_transitions(t, info, f"part {p['path']}")
                hasher.update(t)
                rows += len(t)
            except (RlsynthError, pa.ArrowException, OSError) as e:
                problems.append(str(e))
        for fname, meta in man.get("files", {}).items():
            try:
                self._read_checked(f"{vdir}/files/{fname}", meta["sha256"], f"file {fname}")
            except RlsynthError as e:
                problems.append(str(e))
        recomputed = None if problems else hasher.hexdigest()
        if recomputed is not None and recomputed != man["content_hash"]:
            problems.append("content hash differs from the manifest")
        if not problems and rows != man["counts"]["transitions"]:
            problems.append(f"{rows} rows where the manifest records {man['counts']['transitions']}")
        return {
            "name": r.name,
            "version": r.version,
            "ok": not problems,
            "content_hash": recomputed,
            "expected_content_hash": man["content_hash"],
            "problems": problems,
        }

    def annotate(self, ref: str | VersionRef, key: str, value: Any) -> dict[str, Any]:
        """Record an evaluation result (``fidelity``) in a version's manifest, atomically.

        Only annotation keys may change: the data, its hashes and its lineage stay as committed, and
        ``verify`` still checks the same content hash.
        """
        if key not in ANNOTATION_KEYS:
            raise CatalogError(
                f"'{key}' is not an annotation (annotations: {', '.join(sorted(ANNOTATION_KEYS))})"
            )
        r = self.resolve(ref)
        man = self.manifest(r)
        man[key] = value
        folder = self._version_dir(r)
        data = json.dumps(man, indent=2, sort_keys=True, default=_json_default).encode()
        tmp = f"{folder}/{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, f"{folder}/{MANIFEST}")
        return man

    # -- writing -------------------------------------------------------------------------------------
    def begin(self, name: str, info: DatasetInfo) -> Transaction:
        """Open a commit of a new version of ``name``; nothing is visible until :meth:`Transaction.commit`."""
        check_name(name)
        txn = Transaction(self.uri, name, uuid.uuid4().hex, info)
        self.fs.create_dir(txn.staging_dir(self), recursive=True)
        return txn

    def write(
        self,
        name: str,
        dataset: Dataset,
        *,
        lineage: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        files: Mapping[str, str | os.PathLike[str]] | None = None,
        rows_per_part: int = 1_000_000,
    ) -> VersionRef:
        """Validate and commit a whole in-memory dataset as the next version of ``name``."""
        validate_transitions(dataset.transitions, dataset.info, f"dataset for '{name}'")
        txn = self.begin(name, dataset.info)
        try:
            for i, part in enumerate(split_rows(dataset.transitions, rows_per_part)):
                txn.write_part(i, part)
            for fname, src in (files or {}).items():
                txn.add_file(fname, src)
            return txn.commit(lineage=lineage, tags=tags)
        except BaseException:
            txn.abort()
            raise


def split_rows(t: Transitions, rows: int) -> Iterable[Transitions]:
    """Cut transitions into parts of whole episodes, each about ``rows`` rows (an episode is never split)."""
    bounds = t.episode_bounds()
    lo = 0
    while lo < len(t):
        # The last episode start at or below lo + rows, but always at least one whole episode.
        k = int(np.searchsorted(bounds, lo + rows, side="right")) - 1
        hi = int(bounds[k]) if bounds[k] > lo else int(bounds[np.searchsorted(bounds, lo, side="right")])
        yield Transitions(**{c: getattr(t, c)[lo:hi] for c in Transitions.columns()})
        lo = hi


@dataclass(frozen=True)
class Transaction:
    """A commit in progress. A plain value: send it to another process (a Ray task) to write parts there."""

    catalog_uri: str
    name: str
    txn_id: str
    info: DatasetInfo

    def catalog(self) -> Catalog:
        return Catalog(self.catalog_uri)

    def staging_dir(self, cat: Catalog | None = None) -> str:
        c = cat or self.catalog()
        return c._join(self.name, "_staging", self.txn_id)

    def write_part(self, index: int, t: Transitions) -> dict[str, Any]:
        """Write part ``index``: whole episodes, validated; a retried task's rewrite replaces it atomically.

        Parts are concatenated in index order at commit; episode ids must keep increasing across parts.
        """
        if not 0 <= index < 100_000:
            raise CatalogError(f"part index {index} out of range [0, 99999]")
        validate_transitions(t, self.info, f"{self.name} part {index}")
        cat = self.catalog()
        buf = io.BytesIO()
        pq.write_table(to_table(t, self.info), buf, compression="zstd", compression_level=1)
        data = buf.getvalue()
        final = f"{self.staging_dir(cat)}/part-{index:05d}.parquet"
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        with cat.fs.open_output_stream(tmp) as f:
            f.write(data)
        cat.fs.move(tmp, final)
        return {"index": index, "rows": len(t), "sha256": _sha256_bytes(data)}

    def add_file(self, file_name: str, src: str | os.PathLike[str]) -> None:
        if not FILE_NAME_RE.match(file_name):
            raise CatalogError(f"invalid artifact name '{file_name}'")
        cat = self.catalog()
        with open(src, "rb") as f:
            data = f.read()
        cat.fs.create_dir(f"{self.staging_dir(cat)}/files", recursive=True)
        with cat.fs.open_output_stream(f"{self.staging_dir(cat)}/files/{file_name}") as out:
            out.write(data)

    def abort(self) -> None:
        cat = self.catalog()
        d = self.staging_dir(cat)
        if cat._exists(d):
            cat.fs.delete_dir(d)

    def _parts(self, cat: Catalog) -> list[tuple[int, str]]:
        sel = pafs.FileSelector(self.staging_dir(cat), allow_not_found=True)
        out = []
        for fi in cat.fs.get_file_info(sel):
            m = PART_RE.match(fi.base_name)
            if m:
                out.append((int(m.group(1)), fi.base_name))
        return sorted(out)

    def commit(
        self,
        *,
        lineage: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        expected_parts: int | None = None,
    ) -> VersionRef:
        """Check, hash and publish the staged parts as the next version. Returns its reference.

        ``expected_parts``: refuse to commit unless exactly parts 0..expected_parts-1 exist (a lost shard
        must never yield a smaller dataset).
        """
        cat = self.catalog()
        parts = self._parts(cat)
        if not parts:
            raise CatalogError(f"{self.name}: nothing to commit (no parts were written)")
        indices = [i for i, _ in parts]
        if expected_parts is not None and indices != list(range(expected_parts)):
            raise CatalogError(
                f"{self.name}: expected parts 0..{expected_parts - 1}, found {indices}; nothing committed"
            )
        manifest = self._build_manifest(cat, parts, lineage or {}, tags or {})
        if cat.local:
            return self._publish_local(cat, manifest)
        return self._publish_generic(cat, manifest)

    def _build_manifest(
        self,
        cat: Catalog,
        parts: Sequence[tuple[int, str]],
        lineage: Mapping[str, Any],
        tags: Mapping[str, Any],
    ) -> dict[str, Any]:
        sdir = self.staging_dir(cat)
        hasher = ContentHasher(self.info)
        tables, part_meta = [], []
        for _, fname in parts:
            with cat.fs.open_input_stream(f"{sdir}/{fname}") as f:
                data = f.read()
            table = pq.read_table(pa.BufferReader(data))
            if info_from_schema(table.schema, fname) != self.info:
                raise CatalogError(
                    f"{self.name}: part {fname} was written for other spaces; nothing committed"
                )
            tables.append(table)
            part_meta.append(
                {"path": fname, "rows": table.num_rows, "bytes": len(data), "sha256": _sha256_bytes(data)}
            )
        t = from_table(pa.concat_tables(tables), self.name)
        validate_transitions(t, self.info, f"{self.name} (all parts)")
        hasher.update(t)
        files = {}
        for fi in cat.fs.get_file_info(pafs.FileSelector(f"{sdir}/files", allow_not_found=True)):
            with cat.fs.open_input_stream(fi.path) as f:
                data = f.read()
            files[fi.base_name] = {"sha256": _sha256_bytes(data), "bytes": len(data)}
        n_eps = len(t.episode_bounds()) - 1
        full_lineage = {
            "sources": [],
            "generator": None,
            "guidance": None,
            "agent": None,
            "seeds": None,
            "code_version": code_version(),
            **dict(lineage),
        }
        return {
            "name": self.name,
            "version": None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "content_hash": hasher.hexdigest(),
            "env_id": self.info.env_id,
            "info": self.info.to_json(),
            "schema": _schema_json(self.info),
            "counts": {
                "episodes": n_eps,
                "transitions": len(t),
                "terminated_episodes": int(t.terminals.sum()),
                "truncated_episodes": int((t.timeouts & ~t.terminals).sum()),
            },
            "stats": column_stats(t),
            "lineage": full_lineage,
            "fidelity": None,
            "tags": dict(tags),
            "parts": part_meta,
            "files": files,
        }

    def _write_manifest(self, cat: Catalog, folder: str, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default).encode()
        tmp = f"{folder}/{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with cat.fs.open_output_stream(tmp) as f:
            f.write(data)
        cat.fs.move(tmp, f"{folder}/{MANIFEST}")

    def _next_version(self, cat: Catalog) -> int:
        dirs = cat._version_dirs(self.name)
        return (dirs[-1][0] + 1) if dirs else 1

    def _publish_local(self, cat: Catalog, manifest: dict[str, Any]) -> VersionRef:
        sdir = self.staging_dir(cat)
        version = self._next_version(cat)
        while True:
            manifest["version"] = version
            self._write_manifest(cat, sdir, manifest)
            target = cat._join(self.name, f"_v{version}")
            try:
                os.rename(sdir, target)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    version = max(version + 1, self._next_version(cat))
                    continue
                raise CatalogError(f"{self.name}: commit failed ({e})") from None
            return VersionRef(self.name, version)

    def _publish_generic(self, cat: Catalog, manifest: dict[str, Any]) -> VersionRef:
        sdir = self.staging_dir(cat)
        version = self._next_version(cat)
        target = cat._join(self.name, f"_v{version}")
        manifest["version"] = version
        cat.fs.create_dir(target, recursive=True)
        for p in manifest["parts"]:
            cat.fs.move(f"{sdir}/{p['path']}", f"{target}/{p['path']}")
        if manifest["files"]:
            cat.fs.create_dir(f"{target}/files", recursive=True)
            for fname in manifest["files"]:
                cat.fs.move(f"{sdir}/files/{fname}", f"{target}/files/{fname}")
        self._write_manifest(cat, target, manifest)
        cat.fs.delete_dir(sdir)
        return VersionRef(self.name, version)
