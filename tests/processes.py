"""Starting the real CLI in a subprocess (one spelling of the command for every CLI test), finding the
processes a test started (by an environment marker they inherit) and free ports: the Ray tests must leave
no process behind and never use fixed ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLI = (sys.executable, "-c", "from rlsynth.pipeline.cli import entry; entry()")
"""The console entry point in a fresh interpreter, as the installed ``rlsynth`` command runs it."""


def cli_command(*args: str) -> list[str]:
    """The command line running ``rlsynth ARGS...`` (for :class:`subprocess.Popen`)."""
    return [*CLI, *args]


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``rlsynth ARGS...`` run to completion, its output captured as text."""
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=check
    )


MARKER = "RLSYNTH_TEST_RAY_MARKER"
"""Put in the environment of every process a test starts (they inherit it), so that exactly those
processes can be found afterwards, whatever Ray renamed them to, and none of anyone else's."""


def marked_processes(value: str) -> set[int]:
    """Live processes (not zombies) other than this one whose environment holds ``MARKER=value``."""
    needle = f"{MARKER}={value}".encode()
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            alive = (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if alive and needle in (d / "environ").read_bytes().split(b"\0"):
                found.add(int(d.name))
    return found


def wait_until_gone(value: str, seconds: float = 20) -> set[int]:
    """The marked processes still alive after up to ``seconds`` s."""
    deadline = time.monotonic() + seconds
    while (left := marked_processes(value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop_marked(value: str, grace: float = 20) -> set[int]:
    """Wait up to ``grace`` s for the marked processes to exit, then SIGKILL the rest (so one failure does
    not leak into the next test); returns those that had to be killed: a leak."""
    left = wait_until_gone(value, grace)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
