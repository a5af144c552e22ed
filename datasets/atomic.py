"""Atomic file publication on a local filesystem."""

from __future__ import annotations

import os

from datasets.errors import ExportError


def publish_file(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Make a finished temporary file visible under ``final`` at once, refusing to replace anything.

    ``os.link`` fails if ``final`` exists, so two writers racing for one name cannot both win and a reader
    never sees a half-written file. The temporary name is left for the caller to remove.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ExportError(f"{final}: already exists; exports never overwrite") from None
