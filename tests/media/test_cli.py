"""`voice-appliance media-worker` exit codes: bad input ends the process with 2 and a clear message."""

from __future__ import annotations

import os
import subprocess
import sys

from shm.segment import ShardSegment


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "media-worker", "--shard", "0", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_missing_segment() -> None:
    r = _run("--segment", "/va-nonexistent-s0", "--config", os.devnull)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_bad_cpu(segment: ShardSegment) -> None:
    r = _run("--segment", segment.name, "--cpu", "4096", "--config", os.devnull)
    assert r.returncode == 2 and "cannot pin to CPU 4096" in r.stderr


def test_bad_config(segment: ShardSegment) -> None:
    r = _run("--segment", segment.name, "--config", os.devnull, env={"VA_MEDIA_JITTER_TARGET_MS": "500"})
    assert r.returncode == 2 and "media.jitter_target_ms" in r.stderr
