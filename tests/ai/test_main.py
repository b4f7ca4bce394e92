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


def test_event_loop_is_uvloop_unless_forced_to_asyncio(monkeypatch) -> None:
    """uvloop (a dependency) carries the worker's websockets; VA_AI_EVENT_LOOP=asyncio is the fallback."""
    import asyncio

    from workers.ai.main import loop_factory

    monkeypatch.delenv("VA_AI_EVENT_LOOP", raising=False)
    name, factory = loop_factory()
    assert name == "uvloop" and factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(asyncio.sleep(0, "ok")) == "ok"
        assert type(runner.get_loop()).__module__.startswith("uvloop")
    monkeypatch.setenv("VA_AI_EVENT_LOOP", "asyncio")
    assert loop_factory() == ("asyncio", None)
