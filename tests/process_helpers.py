"""Helpers for tests that kill a bench run part-way (imported by test modules; not collected: no test_ prefix)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_lines(argv: list[str], log: Path, lines: int, cwd: Path, env: dict | None = None,
                     timeout: float = 300) -> list[str]:
    """Start ``argv`` in its own process group, SIGKILL the whole group once ``log`` has ``lines`` lines, and
    return the log's lines as they were left."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < lines):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return log.read_text().splitlines()
