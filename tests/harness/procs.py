"""Stopping what a test started: SIGTERM, a grace period, then SIGKILL (by the Popen's own PID)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Stop ``proc`` if it still runs: SIGTERM, ``timeout`` s to exit, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
