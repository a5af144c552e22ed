"""Errors that reach the user as one clear line.

Every failure a user can cause (a bad file, name, id, field or shape) raises a subclass of
:class:`RlsynthError`; the CLI prints its message on one line and exits non-zero. Library code never
lets a deep traceback from h5py, pyarrow or Minari stand in for a message.
"""

from __future__ import annotations


class RlsynthError(Exception):
    """Base class of errors whose message is meant for the user as-is."""


class ValidationError(RlsynthError):
    """Data that breaks the canonical episode contract (alignment, shapes, dtypes, flags, finiteness)."""

    def __init__(self, message: str, *, where: str = "", field: str = "", episode: int | None = None) -> None:
        parts = [p for p in (where, f"field '{field}'" if field else "") if p]
        if episode is not None:
            parts.append(f"episode {episode}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.where = where
        self.field = field
        self.episode = episode


class SourceError(RlsynthError):
    """A source that cannot be read: missing file, unknown id, wrong layout."""


class CatalogError(RlsynthError):
    """Bad dataset names, unknown versions, corrupt manifests, refused overwrites."""


class ExportError(RlsynthError):
    """An export target that is invalid or already exists."""
