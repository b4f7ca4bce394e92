"""`voice-appliance ai-worker` as a real subprocess: bad input gives a clear error and an exit code."""

from __future__ import annotations

import subprocess
import sys

VA = [sys.executable, "-m", "appliance.cli"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*VA, *args], capture_output=True, text=True, timeout=60, env=env)


def test_missing_segment_exits_3_naming_it() -> None:
    r = run("ai-worker", "--shard", "0", "--segment", "/va-nonexistent-test-s0")
    assert r.returncode == 3
    assert "/va-nonexistent-test-s0" in r.stderr and "does not exist" in r.stderr


def test_bad_config_and_cpu_exit_2(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[vad]\nhangover_ms = -5\n")
    r = run("ai-worker", "--shard", "0", "--segment", "/x", "--config", str(bad))
    assert r.returncode == 2 and "vad.hangover_ms" in r.stderr
    r = run("ai-worker", "--shard", "0", "--segment", "/x", "--cpu", "4096")
    assert r.returncode == 2 and "cannot pin" in r.stderr


def test_help_lists_flags() -> None:
    r = run("ai-worker", "--help")
    assert r.returncode == 0
    for flag in ("--shard", "--segment", "--cpu", "--config"):
        assert flag in r.stdout
