"""The emulator's wire-level contract with a raw WebSocket client: bad input closes with the right code."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from tests.harness.emulator import Emulator, tone

PATH = "/ws/google.ai.generativelanguage.{v}.GenerativeService.BidiGenerateContent"


def url(emu: Emulator, version: str = "v1beta") -> str:
    return f"wss://{emu.host}:{emu.port}" + PATH.format(v=version)


async def open_ws(emu: Emulator, version: str = "v1beta") -> Any:
    return await connect(url(emu, version), ssl=emu.ssl_context(), compression=None,
                         additional_headers={"x-goog-api-key": emu.api_key}, max_size=None)


async def close_code_after(emu: Emulator, *frames: str | bytes) -> tuple[int, str]:
    ws = await open_ws(emu)
    try:
        for f in frames:
            await ws.send(f)
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None
        return exc.rcvd.code, exc.rcvd.reason
    finally:
        await ws.close()


SETUP = json.dumps({"setup": {"model": "models/x"}})


async def test_setup_must_come_first(emu: Emulator) -> None:
    code, reason = await close_code_after(emu, json.dumps({"realtime_input": {"activityStart": {}}}))
    assert (code, reason) == (1007, "setup must be the first message")


@pytest.mark.parametrize(
    ("frame", "expect"),
    [
        ("{not json", "Invalid JSON payload"),
        (json.dumps({"bogus_message": {}}), 'Unknown name "bogusMessage"'),
        (json.dumps({"realtime_input": {"audio": {"data": "AAAAA", "mime_type": "audio/pcm;rate=16000"}}}),
         "truncated base64"),
        (json.dumps({"realtime_input": {"audio": {"data": "AA==", "mime_type": "audio/pcm;rate=16000"}}}),
         "whole 16-bit samples"),
        (json.dumps({"realtime_input": {"audio": {"data": "AAAA", "mime_type": "video/mp4"}}}),
         "Unsupported mime type"),
        (json.dumps({"realtime_input": {"activityStart": {}}}), "automatic activity detection disabled"),
    ],
)
async def test_bad_input_closes_1007_with_a_reason(emu: Emulator, frame: str, expect: str) -> None:
    code, reason = await close_code_after(emu, SETUP, frame)
    assert code == 1007
    assert expect in reason


async def test_oversized_frame_closes_1009(emu: Emulator) -> None:
    code, _ = await close_code_after(emu, SETUP, "x" * (5 << 20))
    assert code == 1009


async def test_camel_case_and_standard_base64_are_accepted(emu: Emulator) -> None:
    pcm = tone(440, 0.2) + bytes([0xFB, 0xFF] * 8)  # bytes that differ between the base64 alphabets
    ws = await open_ws(emu, "v1alpha")
    try:
        await ws.send(json.dumps({"setup": {"model": "models/x", "realtimeInputConfig": {
            "automaticActivityDetection": {"disabled": True}}}}))
        done = json.loads(await ws.recv())
        sid = done["setupComplete"]["sessionId"]
        b64 = base64.b64encode(pcm).decode()
        assert "+" in b64 or "/" in b64
        mime = "audio/pcm;rate=16000"
        await ws.send(json.dumps({"realtimeInput": {"audio": {"data": b64, "mimeType": mime}}}))
        url_b64 = base64.urlsafe_b64encode(pcm).decode().rstrip("=")
        await ws.send(json.dumps({"realtime_input": {"audio": {"data": url_b64, "mime_type": mime}}}))
        await ws.send(json.dumps({"realtime_input": {"activity_start": {}}}))
        await ws.send(json.dumps({"realtimeInput": {"activityEnd": {}}}))
        kinds = set()
        while "turnComplete" not in kinds:
            msg = json.loads(await ws.recv())
            kinds |= set(msg.get("serverContent", {}))
    finally:
        await ws.close()
    assert emu.audio(sid) == pcm + pcm


async def test_unknown_paths_and_versions_are_404(emu: Emulator) -> None:
    for version in ("v1", "v2"):
        with pytest.raises(websockets.InvalidStatus) as info:
            await open_ws(emu, version)
        assert info.value.response.status_code == 404


async def test_refuse_new_connections_for_the_next_connection_only(emu: Emulator) -> None:
    emu.configure_next(refuse=True)
    with pytest.raises(websockets.InvalidStatus) as info:
        await open_ws(emu)
    assert info.value.response.status_code == 503
    ws = await open_ws(emu)
    await ws.close()


async def test_control_channel_rejects_bad_requests(emu: Emulator) -> None:
    with pytest.raises(RuntimeError, match="unknown setting"):
        emu.configure(nonsense=1)
    with pytest.raises(RuntimeError, match="404"):
        emu.fault("emu-nope", "close")
    assert emu.health()["ok"] is True


async def test_unknown_resumption_handle_closes_1007(emu: Emulator) -> None:
    setup = json.dumps({"setup": {"model": "models/x", "sessionResumption": {"handle": "no-such-handle"}}})
    code, reason = await close_code_after(emu, setup)
    assert code == 1007 and "handle" in reason
