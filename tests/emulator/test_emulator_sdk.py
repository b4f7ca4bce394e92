"""The emulator against the real google-genai SDK: turns, replies, transcription, usage, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import soxr
from google.genai import errors, types

from tests.harness.emulator import (
    Emulator,
    chirp,
    dominant_frequency,
    max_normalized_correlation,
    silence,
    tone,
)

MODEL = "gemini-emulated"
CHUNK = 16000 * 40 // 1000 * 2  # 40 ms at 16 kHz


def manual_config(**kw: Any) -> types.LiveConnectConfig:
    return types.LiveConnectConfig(
        response_modalities=["AUDIO"],
        realtime_input_config=types.RealtimeInputConfig(
            automatic_activity_detection=types.AutomaticActivityDetection(disabled=True)
        ),
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
        **kw,
    )


async def send_pcm(session: Any, data: bytes) -> None:
    for off in range(0, len(data), CHUNK):
        await session.send_realtime_input(
            audio=types.Blob(data=data[off : off + CHUNK], mime_type="audio/pcm;rate=16000")
        )


async def collect_turn(session: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"audio": bytearray(), "in": [], "out": [], "usage": None, "interrupted": False}
    async for msg in session.receive():
        sc = msg.server_content
        if msg.data:
            out["audio"] += msg.data
        if sc and sc.input_transcription:
            out["in"].append(sc.input_transcription.text)
        if sc and sc.output_transcription:
            out["out"].append(sc.output_transcription.text)
        if sc and sc.interrupted:
            out["interrupted"] = True
        if msg.usage_metadata:
            out["usage"] = msg.usage_metadata
    return out


async def test_manual_turn_echoes_the_utterance(emu: Emulator) -> None:
    said = chirp(1.0)
    async with emu.genai_client().aio.live.connect(model=MODEL, config=manual_config()) as s:
        assert s.session_id and s.session_id.startswith("emu-")
        await s.send_realtime_input(activity_start=types.ActivityStart())
        await send_pcm(s, said)
        await s.send_realtime_input(activity_end=types.ActivityEnd())
        turn = await asyncio.wait_for(collect_turn(s), 10)
    expected = soxr.resample(np.frombuffer(said, "<i2"), 16000, 24000).astype("<i2").tobytes()
    assert abs(len(turn["audio"]) - len(expected)) < 24000 * 2 * 0.05
    assert max_normalized_correlation(bytes(turn["audio"]), expected) > 0.95
    assert turn["in"] == ["heard 1.00 seconds of audio"]
    assert turn["out"] == ["echo reply"]
    assert turn["usage"].prompt_token_count == 26 and turn["usage"].response_token_count == 25
    assert emu.audio(s.session_id) == said


async def test_automatic_detection_ends_the_turn_after_silence(emu: Emulator) -> None:
    config = types.LiveConnectConfig(
        response_modalities=["AUDIO"],
        realtime_input_config=types.RealtimeInputConfig(
            automatic_activity_detection=types.AutomaticActivityDetection(silence_duration_ms=300)
        ),
    )
    async with emu.genai_client().aio.live.connect(model=MODEL, config=config) as s:
        await send_pcm(s, silence(0.2) + tone(660, 0.8) + silence(0.5))
        turn = await asyncio.wait_for(collect_turn(s), 10)
    assert abs(dominant_frequency(bytes(turn["audio"]), 24000) - 660) < 5
    seconds = len(turn["audio"]) / 2 / 24000
    assert 0.8 <= seconds <= 0.9  # the tone plus the prefix padding, trailing silence trimmed


async def test_audio_stream_end_flushes_an_automatic_turn(emu: Emulator) -> None:
    config = types.LiveConnectConfig(response_modalities=["AUDIO"])
    async with emu.genai_client().aio.live.connect(model=MODEL, config=config) as s:
        await send_pcm(s, tone(500, 0.6))
        await s.send_realtime_input(audio_stream_end=True)
        turn = await asyncio.wait_for(collect_turn(s), 10)
    assert abs(dominant_frequency(bytes(turn["audio"]), 24000) - 500) < 5


async def test_wrong_api_key_is_a_clear_error(emu: Emulator) -> None:
    with pytest.raises(errors.APIError) as info:
        async with emu.genai_client(api_key="wrong").aio.live.connect(model=MODEL, config=manual_config()):
            pass
    assert info.value.code == 1008
    assert "API key not valid" in str(info.value)


async def test_tool_call_round_trip(tmp_path: Any) -> None:
    from tests.harness.emulator import start_emulator

    with start_emulator(tmp_path, pacing="burst", tool_calls=True, reply="tone") as e:
        decl = types.FunctionDeclaration(name="lights", description="x")
        tools = [types.Tool(function_declarations=[decl])]
        async with e.genai_client().aio.live.connect(model=MODEL, config=manual_config(tools=tools)) as s:
            await s.send_realtime_input(activity_start=types.ActivityStart())
            await send_pcm(s, tone(300, 0.4))
            await s.send_realtime_input(activity_end=types.ActivityEnd())
            call = None
            async for msg in s.receive():
                if msg.tool_call:
                    call = msg.tool_call.function_calls[0]
                    break
            assert call is not None and call.name == "lights"
            assert call.args == {"heard": "heard 0.40 seconds of audio"}
            await s.send_tool_response(
                function_responses=[types.FunctionResponse(id=call.id, name="lights", response={"on": True})]
            )
            turn = await asyncio.wait_for(collect_turn(s), 10)
    assert turn["out"] == ['tool lights said {"on": true}']
    assert abs(dominant_frequency(bytes(turn["audio"]), 24000) - 440) < 5


async def test_text_turn_gets_a_reply(emu: Emulator) -> None:
    async with emu.genai_client().aio.live.connect(model=MODEL, config=manual_config()) as s:
        await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="hello")]))
        turn = await asyncio.wait_for(collect_turn(s), 10)
        assert len(turn["audio"]) == 24000 * 2  # one second of tone for a text prompt
        assert "user: hello" in emu.session(s.session_id)["history"]


async def test_realtime_text_inside_an_activity_belongs_to_that_turn(emu: Emulator) -> None:
    """What the AI worker sends for keypad digits, sent by the SDK itself: the emulator records the text
    and answers it once, at the activity's end, with the text in both transcriptions."""
    async with emu.genai_client().aio.live.connect(model=MODEL, config=manual_config()) as s:
        await s.send_realtime_input(activity_start=types.ActivityStart())
        await send_pcm(s, tone(440, 0.2))
        await s.send_realtime_input(text="keys: 1234#")
        await s.send_realtime_input(activity_end=types.ActivityEnd())
        turn = await asyncio.wait_for(collect_turn(s), 10)
        assert turn["in"] == ["heard 0.20 seconds of audio and text: keys: 1234#"]
        assert turn["out"] == ["echo reply to text: keys: 1234#"]
        state = emu.session(s.session_id)
        assert state["texts"] == ["keys: 1234#"]
        assert "user: text: keys: 1234#" in state["history"]
