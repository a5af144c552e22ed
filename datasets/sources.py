"""One entry point for every dataset source.

* ``minari:<id>``            a Minari dataset (local; downloaded when ``download`` and the remote answers)
* ``hdf5:<path>``, ``*.hdf5``, ``*.h5``  a D4RL-layout HDF5 file
* ``NAME`` / ``NAME@N``       a catalog version
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rlsynth.datasets.catalog import Catalog, ContentHasher
from rlsynth.datasets.errors import SourceError
from rlsynth.datasets.hdf5 import read_hdf5
from rlsynth.datasets.minari_io import read_minari
from rlsynth.datasets.types import Dataset, check_env_id


def _is_hdf5(spec: str) -> bool:
    return spec.startswith("hdf5:") or spec.endswith((".hdf5", ".h5"))


def load_source(
    spec: str, catalog: Catalog | None = None, *, env_id: str | None = None, download: bool = False
) -> Dataset:
    """Read ``spec`` into a validated :class:`Dataset`. ``env_id`` overrides an HDF5 file's own."""
    if env_id is not None:
        # The id a user passes (--env) is checked where it enters, like the ids files carry.
        env_id = check_env_id(env_id, "--env")
    if spec.startswith("minari:"):
        ds = read_minari(spec[len("minari:") :], download=download)
    elif _is_hdf5(spec):
        ds = read_hdf5(spec.removeprefix("hdf5:"), env_id=env_id)
    else:
        ds = (catalog or Catalog()).read(spec)
    if env_id and ds.info.env_id and env_id != ds.info.env_id and not _is_hdf5(spec):
        raise SourceError(f"{spec}: dataset is for '{ds.info.env_id}', not '{env_id}'")
    return ds


def source_lineage(spec: str, ds: Dataset, catalog: Catalog | None = None) -> dict[str, Any]:
    """How a source is recorded in lineage: its spec and a hash that pins its exact content."""
    hasher = ContentHasher(ds.info)
    hasher.update(ds.transitions)
    entry: dict[str, Any] = {"source": spec, "content_hash": hasher.hexdigest()}
    if spec.startswith("minari:"):
        entry["kind"] = "minari"
    elif _is_hdf5(spec):
        path = Path(spec.removeprefix("hdf5:"))
        entry.update(kind="hdf5", path=str(path.resolve()), sha256=file_sha256(path))
    else:
        man = (catalog or Catalog()).manifest(spec)
        entry.update(kind="catalog", ref=f"{man['name']}@{man['version']}")
    return entry


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
