"""Atomic file publication on a local filesystem, and what an interrupted writer leaves behind.

* :func:`publish_file` makes a finished file visible at once, never replacing anything.
* :class:`Writer` names the process that owns a staging folder, so that a later process can tell a
  commit in progress from the leftovers of a writer that was killed (SIGKILL, power loss).
* :func:`sigterm_as_interrupt` makes SIGTERM (what ``timeout``, Kubernetes and Ray send) unwind the
  stack like Ctrl-C, so the ``except``/``finally`` clean-up that already handles Ctrl-C runs for it too.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from rlsynth.datasets.errors import ExportError


def publish_file(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Make a finished temporary file visible under ``final`` at once, refusing to replace anything.

    ``os.link`` fails if ``final`` exists, so two writers racing for one name cannot both win and a reader
    never sees a half-written file. The temporary name is left for the caller to remove.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ExportError(f"{final}: already exists; exports never overwrite") from None
    except OSError as e:
        raise ExportError(f"{final}: cannot be written ({e.strerror})") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread was, so that Ctrl-C's clean-up paths run for it too."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM during the clean-up kills at once, as it would without this handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def sigterm_as_interrupt() -> bool:
    """Handle SIGTERM like Ctrl-C in this process (main thread only; a handler someone else installed is
    kept). Returns whether it was installed. Idempotent."""
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is _raise_terminated:
        return True
    if current not in (signal.SIG_DFL, None):
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot; 0 where /proc is not there): tells a reused pid apart."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()
    # Field 22 of proc(5); after the ")" that ends the command name, it is the 20th.
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else 0


@dataclass(frozen=True)
class Writer:
    """The process that opened a commit: host, boot, pid and its start time."""

    host: str
    boot: str
    pid: int
    start: int

    @classmethod
    def this_process(cls) -> Writer:
        pid = os.getpid()
        return cls(socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pid, _start_ticks(pid))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: object) -> Writer | None:
        if not isinstance(d, dict):
            return None
        try:
            w = cls(str(d["host"]), str(d["boot"]), int(d["pid"]), int(d["start"]))
        except (KeyError, TypeError, ValueError):
            return None
        return w if w.pid > 0 else None

    def is_dead(self) -> bool:
        """True only when certain: the writer ran on this host and is gone (or the host rebooted since).
        A writer on another host is never declared dead (its liveness cannot be seen from here)."""
        here = Writer.this_process()
        if self.host != here.host:
            return False
        if self.boot and here.boot and self.boot != here.boot:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return bool(self.start and _start_ticks(self.pid) not in (0, self.start))
