"""The hostile-input harness: run the real ``rlsynth`` CLI in a subprocess on a crafted input and check
that it is refused the way a trusted tool refuses one.

A refusal must: exit non-zero, print at most 3 lines and no traceback, write nothing under the watched
folders, import no foreign module (``EVIL_MODULE`` would create ``marker`` the moment it is imported),
and stay under a peak-memory bound (the child's own ``ru_maxrss``, read with ``os.wait4``; an address
space limit stops a runaway allocation before it can hurt the machine).
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from processes import cli_command

REPO = Path(__file__).resolve().parents[1]
EVIL_MODULE = "rlsynth_evil_marker"
# A hostile env id: ``gymnasium.make`` would import EVIL_MODULE for it.
EVIL_ENV_ID = f"{EVIL_MODULE}:Evil-v0"
PEAK_RSS_LIMIT = 2 * 1024**3
# torch and Ray reserve address space far beyond what they touch; this only stops a runaway allocation.
ADDRESS_SPACE_LIMIT = 16 * 1024**3
MAX_LINES = 3


@dataclass(frozen=True)
class Outcome:
    code: int
    output: str
    peak_rss: int
    seconds: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()]


def plant_marker(root: Path) -> tuple[Path, Path]:
    """Write EVIL_MODULE into ``root/evil`` (put on the child's PYTHONPATH); returns (folder, marker)."""
    folder = root / "evil"
    folder.mkdir(parents=True, exist_ok=True)
    marker = root / "evil-module-was-imported"
    (folder / f"{EVIL_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "import gymnasium\n"
        "class Evil(gymnasium.Env):\n    pass\n"
    )
    return folder, marker


def snapshot(paths: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``paths`` with its size and mtime (links are not followed)."""
    seen: dict[str, tuple[int, int]] = {}
    for root in paths:
        if not os.path.lexists(root):
            continue
        seen[str(root)] = _stat(root)
        if root.is_dir() and not root.is_symlink():
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    p = os.path.join(dirpath, name)
                    seen[p] = _stat(Path(p))
    return seen


def _stat(p: Path) -> tuple[int, int]:
    st = p.lstat()
    return (st.st_size if not p.is_dir() else 0, st.st_mtime_ns)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    evil_folder: Path | None = None,
    timeout: float = 180,
) -> Outcome:
    """The console entry point in a fresh interpreter, as a user runs it (standard input closed)."""
    child_env = {k: v for k, v in os.environ.items() if k != "RLSYNTH_DEBUG"}
    child_env |= env or {}
    extra = [str(REPO)] + ([str(evil_folder)] if evil_folder is not None else [])
    child_env["PYTHONPATH"] = os.pathsep.join([*extra, child_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.monotonic()
    proc = subprocess.Popen(
        cli_command(*args),
        cwd=cwd,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_limit_memory,
    )
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            raise AssertionError(f"rlsynth {' '.join(args)} ran past {timeout} s")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    return Outcome(proc.returncode, out, usage.ru_maxrss * 1024, time.monotonic() - start)


def assert_refused(
    args: Sequence[str],
    *,
    cwd: Path,
    watch: Sequence[Path] = (),
    expect: str | Sequence[str] = (),
    env: dict[str, str] | None = None,
    evil_root: Path | None = None,
    timeout: float = 180,
) -> Outcome:
    """Run ``rlsynth ARGS`` on a hostile input and check every property of a clean refusal.

    ``expect``: text(s) that must appear (case-insensitive) in the refusal, e.g. the offending file's name.
    ``watch``: folders (catalog root, output paths) in which nothing may appear, change or vanish.
    """
    evil_folder, marker = plant_marker(evil_root if evil_root is not None else cwd)
    before = snapshot(watch)
    outcome = run_cli(args, cwd=cwd, env=env, evil_folder=evil_folder, timeout=timeout)
    shown = f"rlsynth {' '.join(args)} -> exit {outcome.code}:\n{outcome.output}"
    assert outcome.code != 0, shown
    assert "Traceback" not in outcome.output, shown
    assert len(outcome.lines) <= MAX_LINES, shown
    assert "unexpected" not in outcome.output, shown
    assert not marker.exists(), f"foreign code ran: {shown}"
    assert outcome.peak_rss < PEAK_RSS_LIMIT, f"peak RSS {outcome.peak_rss / 2**20:.0f} MiB: {shown}"
    after = snapshot(watch)
    assert after == before, f"files changed {sorted(set(after.items()) ^ set(before.items()))}: {shown}"
    for text in [expect] if isinstance(expect, str) else expect:
        assert text.lower() in outcome.output.lower(), f"expected {text!r}: {shown}"
    return outcome
