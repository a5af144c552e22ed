"""Errors that reach the user as one clear line.

Every failure a user can cause (a bad file, name, id, field or shape) raises a subclass of
:class:`RlsynthError`; the CLI prints its message on one line and exits non-zero. Library code never
lets a deep traceback from h5py, pyarrow or Minari stand in for a message: it catches the library's
exception at its boundary and re-raises one of these, quoting the library at most through :func:`brief`.
"""

from __future__ import annotations

import os
import stat

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


class ScratchError(RlsynthError):
    """A work array that fits neither in memory nor in the scratch folder (``datasets.scratch``)."""


def read_bounded(path: str | os.PathLike[str], limit: int, what: str, error: type[RlsynthError]) -> bytes:
    """The bytes of the regular file ``path``, refused as ``error`` (one line naming the file) when it is
    larger than ``limit`` or not a regular file.

    Every file rlsynth reads whole (agent files, checkpoint and metadata JSON, run configs) comes through
    here: the size is checked on the open descriptor before anything is read, so a file that grows or is
    swapped after the check still yields at most ``limit`` bytes, and a FIFO or device planted under the
    name is refused instead of blocking or streaming without end.
    """
    where = os.fspath(path)
    try:
        fd = os.open(where, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{where}: no such {what}") from None
    except OSError as e:
        raise error(f"{where}: cannot open the {what} ({first_line(e)})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where}: not a regular file (a {what} must be one)")
        raise error(f"{where}: {st.st_size} bytes, more than a {what} may hold ({limit})")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{where}: cannot read the {what} ({first_line(e)})") from None
    if len(data) > limit:
        raise error(f"{where}: more than the {limit} bytes a {what} may hold")
    return data
