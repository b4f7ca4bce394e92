"""`voice-appliance emulator` as shipped: its help, its start-up line, its CA, and run-wide fault flags."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from google.genai import errors, types

from tests.harness.emulator import start_emulator, tone
from workers.ai.live import events as L
from workers.ai.live.session import LiveSession
from workers.ai.live.settings import LiveOptions

CLI = [str(Path(sys.executable).parent / "voice-appliance"), "emulator"]


def test_help_documents_the_flags() -> None:
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for flag in ("--host", "--port", "--api-key", "--state-dir", "--reply", "--pacing",
                 "--first-byte-delay-ms", "--goaway-after-s", "--close-after-s", "--close-code", "--refuse",
                 "--stop-reading-after-s", "--tool-calls"):
        assert flag in out


def test_start_prints_one_line_naming_the_ca(tmp_path: Path) -> None:
    with start_emulator(tmp_path) as emu:
        ca = Path(emu.ca_file)
        assert ca.parent == tmp_path / "emulator-state" and ca.exists()
        ssl.create_default_context(cafile=str(ca))  # a usable CA certificate
        assert emu.health()["ok"]
        pid = emu.pid
    assert emu.proc.returncode == 0  # SIGTERM is a clean stop
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    second = subprocess.Popen([*CLI, "--port", "0", "--state-dir", str(tmp_path / "emulator-state")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert second.stdout is not None
        line = second.stdout.readline()
        assert line.startswith("emulator listening on wss://127.0.0.1:") and line.rstrip().endswith(str(ca))
    finally:
        second.terminate()
        second.wait(10)


def test_bad_port_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "--port", "1", "--host", "203.0.113.1", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot listen on 203.0.113.1:1" in r.stderr


async def until(pred: Any, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)


async def _turn(live: LiveSession, rec: list[Any]) -> float:
    live.activity_start()
    live.send_audio(tone(440, 0.2))
    live.activity_end()
    t0 = time.monotonic()
    await until(lambda: any(isinstance(e, L.AudioOut) for e in rec))
    return time.monotonic() - t0


async def test_first_byte_delay_flag(tmp_path: Path) -> None:
    with start_emulator(tmp_path, first_byte_delay_ms=400, pacing="burst") as emu:
        rec: list[Any] = []
        live = LiveSession(emu.model_config(), "fbd", LiveOptions("Puck", "en-US", "x"), rec.append,
                             ssl_context=emu.ssl_context())
        await live.start()
        try:
            assert await asyncio.wait_for(_turn(live, rec), 10) >= 0.4
        finally:
            await live.close()


async def test_goaway_after_flag_makes_the_layer_resume(tmp_path: Path) -> None:
    with start_emulator(tmp_path, goaway_after_s=0.3, goaway_time_left_s=0.5) as emu:
        rec: list[Any] = []
        live = LiveSession(emu.model_config(), "ga", LiveOptions("Puck", "en-US", "x"), rec.append,
                             ssl_context=emu.ssl_context())
        await live.start()
        try:
            await until(lambda: live.stats.reconnects >= 2)  # every new connection gets its goAway too
            await until(lambda: live.state == "live")
            assert {e.reason for e in rec if isinstance(e, L.StateChanged)} >= {"goAway", "connected"}
        finally:
            await live.close()


async def test_refuse_flag_rejects_connections(tmp_path: Path) -> None:
    with start_emulator(tmp_path, refuse=True) as emu:
        with pytest.raises(Exception, match="503"):
            async with emu.genai_client().aio.live.connect(model="m", config=types.LiveConnectConfig()):
                pass
        assert emu.health()["refused"] == 1


async def test_close_after_flag_closes_with_the_code(tmp_path: Path) -> None:
    with start_emulator(tmp_path, close_after_s=0.2, close_code=1013) as emu:
        async with emu.genai_client().aio.live.connect(model="m", config=types.LiveConnectConfig()) as s:
            with pytest.raises(errors.APIError) as info:
                async for _ in s.receive():
                    pass
        assert info.value.code == 1013
