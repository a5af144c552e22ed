"""Importing d3rlpy quietly: no gym banner, no info-level structlog lines, no ``d3rlpy_logs/`` folder."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

_QUIET = False


def import_d3rlpy() -> Any:
    """Import d3rlpy once with its noise silenced (it pulls in gym 0.26, which prints a banner)."""
    global _QUIET
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import d3rlpy
    if not _QUIET:
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        _QUIET = True
    return d3rlpy


def noop_logger() -> Any:
    """A d3rlpy logger adapter that writes nothing (keeps ``d3rlpy_logs/`` out of the working directory)."""
    d3rlpy = import_d3rlpy()
    return d3rlpy.logging.NoopAdapterFactory()
