"""Errors that reach the user as one clear line.

Every failure a user can cause (a bad file, name, id, field or shape) raises a subclass of
:class:`RlsynthError`; the CLI prints its message on one line and exits non-zero. Library code never
lets a deep traceback from h5py, pyarrow or Minari stand in for a message: it catches the library's
exception at its boundary and re-raises one of these, quoting the library at most through :func:`brief`.
"""

from __future__ import annotations

# A message is printed after "error: " on one terminal line; beyond this it stops being read.
MAX_MESSAGE_CHARS = 1000
# What a quoted library message may add to ours: its first line, shortened.
MAX_QUOTE_CHARS = 200

# Control characters (newlines included) and Unicode line separators become visible escapes, so a name
# or id taken from a hostile file cannot break a message into several lines or rewrite the terminal.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}
_ESCAPES |= {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters."""
    flat = text.translate(_ESCAPES)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _message_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else ""


def first_line(e: BaseException) -> str:
    """A library exception's message as a short quote: its first line (its type when it has none)."""
    return one_line(_message_line(e) or type(e).__name__, MAX_QUOTE_CHARS)


def brief(e: BaseException) -> str:
    """A library exception as a short quote: its type and the first line of its message."""
    first = _message_line(e)
    return one_line(f"{type(e).__name__}: {first}" if first else type(e).__name__, MAX_QUOTE_CHARS)


class RlsynthError(Exception):
    """Base class of errors whose message is meant for the user as-is (always one line)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


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
    """A source that cannot be read: missing file, unknown id, wrong layout, unsafe structure."""


class CatalogError(RlsynthError):
    """Bad dataset names, unknown versions, corrupt manifests, refused overwrites."""


class ExportError(RlsynthError):
    """An export target that is invalid or already exists."""
