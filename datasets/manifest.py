"""A version's ``manifest.json``: the one parser, which checks every field before anything uses it.

A manifest comes from a catalog that may have been copied from a stranger, so nothing in it is trusted:
:func:`parse_manifest` checks the type of every field, the grammar of every name it will join to a path
(parts and artifacts: a full match, so no ``/``, ``..`` or trailing newline), the environment id, and
what can be cross-checked without reading the data (name and version against the folder, the schema
against the spaces, part rows against the counts). Every refusal is one line naming the manifest file.
What needs the data (hashes, counts, stats) is checked by :meth:`datasets.catalog.Catalog.verify`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlsynth.datasets.errors import CatalogError, RlsynthError
from rlsynth.datasets.parquet import FORMAT_VERSION, arrow_schema
from rlsynth.datasets.types import BoxSpace, DatasetInfo, check_env_id

# 100 000 parts of a few hundred bytes each fit; a manifest is parsed whole, and JSON costs up to ~30x
# its size in Python objects, so a bigger one is refused before it is read.
MAX_MANIFEST_BYTES = 16 * 1024**2
MAX_PARTS = 100_000
# A flat Box space wider than this is not a dataset rlsynth can train on; refusing it bounds the stats.
MAX_SPACE_DIM = 1 << 20
MAX_FILE_NAME = 255
PART_RE = re.compile(r"part-(\d{5})\.parquet")
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CONTENT_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
COUNT_KEYS = ("episodes", "transitions", "terminated_episodes", "truncated_episodes")
SUMMARY_KEYS = ("mean", "std", "min", "max")


@dataclass(frozen=True)
class PartRecord:
    path: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class FileRecord:
    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A checked manifest: the typed fields rlsynth relies on, and ``raw``, the whole JSON object."""

    name: str
    version: int
    content_hash: str
    info: DatasetInfo
    counts: Mapping[str, int]
    parts: tuple[PartRecord, ...]
    files: tuple[FileRecord, ...]
    raw: Mapping[str, Any]

    def file(self, name: str) -> FileRecord | None:
        return next((f for f in self.files if f.name == name), None)


def schema_json(info: DatasetInfo) -> dict[str, Any]:
    schema = arrow_schema(info)
    return {"format": FORMAT_VERSION, "columns": {f.name: str(f.type) for f in schema}}


class _Fields:
    """Typed access to one JSON object; every refusal names the manifest and the field's path."""

    def __init__(self, obj: object, where: str, path: str) -> None:
        if not isinstance(obj, dict):
            raise CatalogError(f"{where}: {path or 'the manifest'} is {_kind(obj)}, expected an object")
        self.obj: dict[str, Any] = obj
        self.where = where
        self.path = path

    def _label(self, key: str) -> str:
        return f"'{self.path}.{key}'" if self.path else f"'{key}'"

    def fail(self, key: str, what: str) -> CatalogError:
        return CatalogError(f"{self.where}: field {self._label(key)} {what}")

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.obj:
            if optional:
                return None
            raise self.fail(key, "is missing")
        v = self.obj[key]
        if v is None and optional:
            return None
        if isinstance(v, bool) and bool not in _as_tuple(kind):
            raise self.fail(key, f"is {_kind(v)}, expected {_names(kind)}")
        if not isinstance(v, kind):
            raise self.fail(key, f"is {_kind(v)}, expected {_names(kind)}")
        return v

    def count(self, key: str, *, minimum: int = 0) -> int:
        v: int = self.get(key, int)
        if v < minimum:
            raise self.fail(key, f"is {v}, expected at least {minimum}")
        return v

    def number(self, key: str) -> float:
        return float(self.get(key, (int, float)))

    def numbers(self, key: str, length: int) -> list[float]:
        v: list[Any] = self.get(key, list)
        if len(v) != length or not all(_is_number(x) for x in v):
            raise self.fail(key, f"is not a list of {length} numbers")
        return [float(x) for x in v]

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict), self.where, f"{self.path}.{key}" if self.path else key)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _kind(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return _names(type(v)) if type(v) in (int, float, str, list, dict) else type(v).__name__


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_json(data: bytes, where: str) -> dict[str, Any]:
    """Decode a manifest's bytes; any malformed JSON (or nesting deep enough to exhaust the parser's stack)
    is one line."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CatalogError(f"{where}: not valid JSON ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise CatalogError(f"{where}: the manifest is {_kind(obj)}, expected an object")
    return obj


def parse_manifest(data: bytes, where: str, *, name: str, version: int) -> Manifest:
    """Check the manifest of ``name@version`` (read from ``where``) field by field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CatalogError(
            f"{where}: {len(data)} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})"
        )
    raw = load_json(data, where)
    m = _Fields(raw, where, "")
    _check_identity(m, name, version)
    m.get("created", str)
    _check_created(m)
    content_hash: str = m.get("content_hash", str)
    if not CONTENT_HASH_RE.fullmatch(content_hash):
        raise m.fail("content_hash", "is not 'sha256:' followed by 64 hex digits")
    info = _parse_info(m.sub("info"))
    env_id = m.get("env_id", str, optional=True)
    if env_id is not None:
        check_env_id(env_id, f"{where}: field 'env_id'")
    if env_id != info.env_id:
        raise m.fail("env_id", f"'{env_id}' differs from 'info.env_id' '{info.env_id}'")
    if m.get("schema", dict) != schema_json(info):
        raise m.fail("schema", "does not match the spaces in 'info' (a foreign or altered manifest)")
    counts = _parse_counts(m.sub("counts"))
    _check_stats(m.sub("stats"), info)
    _check_lineage(m.sub("lineage"))
    m.get("fidelity", dict, optional=True)
    tags = m.get("tags", dict)
    parts = _parse_parts(m, counts)
    files = _parse_files(m)
    return Manifest(
        name=name,
        version=version,
        content_hash=content_hash,
        info=info,
        counts=counts,
        parts=parts,
        files=files,
        raw={**raw, "files": raw.get("files") or {}, "tags": tags},
    )


def _check_identity(m: _Fields, name: str, version: int) -> None:
    recorded_name = m.get("name", str)
    if recorded_name != name:
        raise m.fail("name", f"is '{recorded_name}' but the version lies in the folder of '{name}'")
    recorded_version = m.get("version", int)
    if recorded_version != version:
        raise m.fail("version", f"is {recorded_version} but the version lies in the folder _v{version}")


def _check_created(m: _Fields) -> None:
    # Printed by `datasets list` and `show`: a timestamp, never free text that could carry terminal codes.
    try:
        _dt.datetime.fromisoformat(m.obj["created"])
    except ValueError:
        raise m.fail("created", "is not an ISO 8601 timestamp") from None


def _parse_space(f: _Fields) -> BoxSpace:
    if f.get("type", str) != "box":
        raise f.fail("type", "is not 'box' (the only space kind rlsynth stores)")
    shape: list[Any] = f.get("shape", list)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise f.fail("shape", "is not a list of positive integers")
    dim = math.prod(shape)
    if dim > MAX_SPACE_DIM:
        raise f.fail("shape", f"declares {dim} values, more than {MAX_SPACE_DIM}")
    for key in ("low", "high"):
        bounds: list[Any] = f.get(key, list)
        if len(bounds) != dim or not all(_is_number(b) or b in ("inf", "-inf") for b in bounds):
            raise f.fail(key, f"is not a list of {dim} numbers or 'inf'/'-inf'")
    try:
        return BoxSpace.from_json(f.obj)
    except (ValueError, TypeError) as e:
        raise CatalogError(f"{f.where}: field '{f.path}' is not a valid space ({e})") from None


def _parse_info(f: _Fields) -> DatasetInfo:
    env_id = f.get("env_id", str, optional=True)
    if env_id is not None:
        check_env_id(env_id, f"{f.where}: field 'info.env_id'")
    refs = [f.get(k, (int, float), optional=True) for k in ("ref_min_score", "ref_max_score")]
    if any(r is not None and not math.isfinite(r) for r in refs):
        raise f.fail("ref_min_score", "or 'ref_max_score' is not finite")
    try:
        return DatasetInfo(
            env_id=env_id,
            observation_space=_parse_space(f.sub("observation_space")),
            action_space=_parse_space(f.sub("action_space")),
            ref_min_score=None if refs[0] is None else float(refs[0]),
            ref_max_score=None if refs[1] is None else float(refs[1]),
        )
    except RlsynthError:
        raise
    except (ValueError, TypeError) as e:
        raise CatalogError(f"{f.where}: field 'info' is not valid ({e})") from None


def _parse_counts(f: _Fields) -> dict[str, int]:
    counts = {k: f.count(k) for k in COUNT_KEYS}
    if counts["episodes"] < 1 or counts["episodes"] > counts["transitions"]:
        raise f.fail("episodes", f"is {counts['episodes']} for {counts['transitions']} transitions")
    if counts["terminated_episodes"] + counts["truncated_episodes"] != counts["episodes"]:
        raise f.fail("terminated_episodes", "plus 'truncated_episodes' is not the number of episodes")
    return counts


def _check_summary(f: _Fields, length: int | None) -> None:
    for key in SUMMARY_KEYS:
        if length is None:
            f.number(key)
        else:
            f.numbers(key, length)


def _check_stats(f: _Fields, info: DatasetInfo) -> None:
    _check_summary(f.sub("observations"), info.observation_space.dim)
    _check_summary(f.sub("actions"), info.action_space.dim)
    _check_summary(f.sub("rewards"), None)
    _check_summary(f.sub("episode_return"), None)
    lengths = f.sub("episode_length")
    lengths.number("mean")
    lengths.count("min", minimum=1)
    lengths.count("max", minimum=1)


def _check_lineage(f: _Fields) -> None:
    sources = f.get("sources", list, optional=True) or []
    if not all(isinstance(s, dict) for s in sources):
        raise f.fail("sources", "is not a list of objects")
    recipe = f.get("recipe", dict, optional=True)
    if recipe is not None:
        f.sub("recipe").get("recipe", str)


def _parse_parts(m: _Fields, counts: Mapping[str, int]) -> tuple[PartRecord, ...]:
    entries: list[Any] = m.get("parts", list)
    if not entries or len(entries) > MAX_PARTS:
        raise m.fail("parts", f"holds {len(entries)} parts, expected 1 to {MAX_PARTS}")
    parts = []
    for i, entry in enumerate(entries):
        p = _Fields(entry, m.where, f"parts[{i}]")
        path = p.get("path", str)
        if not PART_RE.fullmatch(path):
            raise p.fail("path", f"{path[:80]!r} is not a part name (part-NNNNN.parquet)")
        sha = p.get("sha256", str)
        if not SHA256_RE.fullmatch(sha):
            raise p.fail("sha256", "is not 64 hex digits")
        parts.append(PartRecord(path, p.count("rows", minimum=1), p.count("bytes", minimum=1), sha))
    if len({p.path for p in parts}) != len(parts):
        raise m.fail("parts", "names one part file twice")
    rows = sum(p.rows for p in parts)
    if rows != counts["transitions"]:
        raise m.fail("parts", f"hold {rows} rows where 'counts.transitions' is {counts['transitions']}")
    return tuple(parts)


def _parse_files(m: _Fields) -> tuple[FileRecord, ...]:
    files = m.get("files", dict, optional=True) or {}
    out = []
    for name, meta in files.items():
        if len(name) > MAX_FILE_NAME or not FILE_NAME_RE.fullmatch(name):
            raise m.fail("files", f"names {name[:80]!r}, which is not an artifact name")
        f = _Fields(meta, m.where, f"files.{name}")
        sha = f.get("sha256", str)
        if not SHA256_RE.fullmatch(sha):
            raise f.fail("sha256", "is not 64 hex digits")
        out.append(FileRecord(name, f.count("bytes"), sha))
    return tuple(out)
