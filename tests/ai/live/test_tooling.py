"""Gemini 3.8 semantics in the Live layer and the emulator: NON_BLOCKING tools whose responses carry
``scheduling`` (SILENT / WHEN_IDLE / INTERRUPT, told apart here by what the caller's side receives),
server messages with several parts at once, and proactive audio that is always on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from google.genai import types

from appliance.model_profiles import BEHAVIORS, DEFAULT_SCHEDULING, SCHEDULINGS
from tests.ai.live.test_session import Recorder, speak
from tests.ai.live.test_wire import sdk_session
from tests.harness.emulator import start_emulator, tone
from workers.ai.live import events as L
from workers.ai.live.client import live_config
from workers.ai.live.session import LiveSession
from workers.ai.live.settings import LiveOptions
from workers.ai.live.tooling import tool_plan
from workers.ai.live.wire import FastWire, SdkWire, encode_tool_response

pytestmark = pytest.mark.timeout(90)

M38 = "gemini-3.8-live-preview"
M25 = "gemini-2.5-flash-native-audio-preview-09-2025"


def test_vocabulary_is_the_sdks() -> None:
    assert set(BEHAVIORS) <= {b.value for b in types.Behavior}
    assert set(SCHEDULINGS) <= {s.value for s in types.FunctionResponseScheduling}
    assert DEFAULT_SCHEDULING in SCHEDULINGS


def test_plan_declares_non_blocking_on_38_and_strips_scheduling() -> None:
    decls = [{"name": "lookup", "scheduling": "interrupt"}, {"name": "note", "scheduling": "SILENT"},
             {"name": "pay", "behavior": "BLOCKING"}, {"name": "plain"}]
    p38 = tool_plan(decls, f"models/{M38}")
    assert [d.get("behavior") for d in p38.declarations] == ["NON_BLOCKING", "NON_BLOCKING", "BLOCKING",
                                                            "NON_BLOCKING"]
    assert all("scheduling" not in d for d in p38.declarations)
    assert dict(p38.scheduling) == {"lookup": "INTERRUPT", "note": "SILENT", "plain": "WHEN_IDLE"}
    p25 = tool_plan(decls, M25)  # older models: nothing implied, the wire of a BLOCKING tool unchanged
    assert [d.get("behavior") for d in p25.declarations] == [None, None, "BLOCKING", None]
    assert p25.scheduling == {}
    assert p25.schedule([{"id": "c", "name": "lookup", "response": {}}]) == [
        {"id": "c", "name": "lookup", "response": {}}]
    # the SDK takes every planned declaration as it is (no key of ours leaks into the setup)
    setup = live_config(_model(M38), LiveOptions("Puck", "en-US", "x", tools=decls), manual=True)
    fds = setup["tools"][0].function_declarations
    assert [fd.behavior for fd in fds] == [types.Behavior.NON_BLOCKING] * 2 + [types.Behavior.BLOCKING,
                                                                               types.Behavior.NON_BLOCKING]
    assert setup["proactivity"].proactive_audio is True
    assert "proactivity" not in live_config(_model(M25), LiveOptions("Puck", "en-US", "x"), manual=True)


@pytest.mark.parametrize("vertex", [False, True], ids=["developer", "vertex"])
@pytest.mark.parametrize("scheduling", SCHEDULINGS)
async def test_scheduled_tool_response_matches_the_sdk(scheduling: str, vertex: bool) -> None:
    """The fast path's tool_response with ``scheduling`` is what ``send_tool_response`` writes for
    ``types.FunctionResponse(scheduling=…)`` on both platforms."""
    from google import genai
    from google.genai.live import AsyncSession

    from tests.ai.live.test_wire import CaptureWs

    if vertex:
        client = genai.Client(vertexai=True, project="p", location="europe-west4",
                              credentials=_NoCreds())  # type: ignore[arg-type]
        ws = CaptureWs()
        sdk = AsyncSession(api_client=client._api_client, websocket=ws)  # type: ignore[arg-type]
    else:
        sdk, ws = sdk_session()
    plan = tool_plan([{"name": "lookup", "scheduling": scheduling}], M38)
    response = {"output": "42", "status": "ok"}
    await sdk.send_tool_response(function_responses=[types.FunctionResponse(
        id="c1", name="lookup", response=response,
        scheduling=types.FunctionResponseScheduling(scheduling))])
    ours = encode_tool_response(plan.schedule([{"id": "c1", "name": "lookup", "response": response}]))
    assert json.loads(ours) == json.loads(ws.sent[0])
    assert json.loads(ours)["tool_response"]["functionResponses"][0]["scheduling"] == scheduling


class _NoCreds:
    """Stands in for google-auth credentials: the SDK only stores them (nothing is sent here)."""

    token = "t"
    valid = True
    expired = False
    quota_project_id = None

    def before_request(self, *_a: object) -> None: ...


MULTIPART: dict[str, Any] = {
    "serverContent": {
        "modelTurn": {"parts": [
            {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": "AAABAA=="}},
            {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": "AgADAA=="}},
            {"text": "and some text"}]},
        "inputTranscription": {"text": "where is my order", "finished": True},
        "outputTranscription": {"text": "let me look", "finished": True},
        "generationComplete": True,
        "turnComplete": True},
    "toolCall": {"functionCalls": [{"id": "c9", "name": "lookup", "args": {"order": "1234"}}]},
    "usageMetadata": {"promptTokenCount": 3, "responseTokenCount": 2, "totalTokenCount": 5},
}


@pytest.mark.parametrize("vertex", [False, True], ids=["developer", "vertex"])
def test_multipart_message_decodes_every_part(vertex: bool) -> None:
    msg = json.loads(json.dumps(MULTIPART))
    if vertex:
        um = msg["usageMetadata"]
        um["candidatesTokenCount"] = um.pop("responseTokenCount")
    raw = json.dumps(msg).encode()
    fast = FastWire().decode(raw)
    assert fast == SdkWire(vertex).decode(raw)
    assert fast.parts == [b"\x00\x00\x01\x00", b"\x02\x00\x03\x00", "and some text"]
    assert fast.input_transcript == ("where is my order", True)
    assert fast.output_transcript == ("let me look", True)
    assert fast.turn_complete and fast.usage is not None and fast.usage.total_tokens == 5
    assert fast.tool_calls == (L.FunctionCall("c9", "lookup", {"order": "1234"}),)


async def test_multipart_message_becomes_every_event_in_order(tmp_path: Path) -> None:
    """The session turns one multipart message into all its events: audio and text first, then the
    transcriptions, the turn's end, usage and the tool call."""
    rec = Recorder()
    live = LiveSession(_model(M38), "mp", LiveOptions("Puck", "en-US", "x"), rec)
    live._apply(_FakeConn(), FastWire().decode(json.dumps(MULTIPART).encode()))  # type: ignore[arg-type]
    kinds = [type(e).__name__ for e in rec.events]
    assert kinds == ["AudioOut", "AudioOut", "Transcript", "Transcript", "Transcript", "TurnComplete",
                     "Usage", "ToolCall"]
    finals = [(e.role, e.text) for e in rec.of(L.Transcript) if e.final]
    assert finals == [("user", "where is my order"), ("model", "let me look")]


class _FakeConn:
    """Only what ``_apply`` reads of a connection for a message without a handle or goAway."""

    closing = False


def _model(name: str, **kw: Any) -> Any:
    from appliance.config import ModelConfig

    return ModelConfig(model=name, api_key="k", **kw)


# --- against the emulator's 3.8 profile ---------------------------------------------------------
@pytest.fixture(scope="module")
def emu38(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with start_emulator(tmp_path_factory.mktemp("emu38"), reply="tone", tool_calls=True) as e:
        yield e


PLATFORMS = pytest.mark.parametrize("platform", ["developer", "vertex"])


async def _tool_turn(emu: Any, scheduling: str, platform: str) -> tuple[Recorder, LiveSession, str]:
    """One caller turn of 1 s on a 3.8 session (Vertex: express mode) whose tool is answered the moment
    it is called, while the model's 1 s answer (realtime pacing) is still playing."""
    from tests.ai.live.test_vertex import vertex_model

    rec = Recorder()
    m = emu.model_config(model=M38) if platform == "developer" else vertex_model(emu, None, model=M38)
    live = LiveSession(m, f"t-{scheduling}", LiveOptions("Puck", "en-US", "x", tools=[
        {"name": "lookup", "description": "order status", "scheduling": scheduling}]), rec)

    def answer(ev: Any) -> None:
        if isinstance(ev, L.ToolCall):
            assert live.send_tool_response([{"id": c.id, "name": c.name,
                                             "response": {"output": "shipped", "status": "ok"}}
                                            for c in ev.calls])

    rec.hook = answer
    await live.start()
    live.activity_start()
    await speak(live, tone(440, 1.0))
    live.activity_end()
    return rec, live, str(live.server_session_id)


def _model_finals(rec: Recorder) -> list[str]:
    return [e.text for e in rec.of(L.Transcript) if e.final and e.role == "model"]


TOOL_SAID = 'tool lookup said {"output": "shipped", "status": "ok"}'


@PLATFORMS
async def test_38_silent_result_goes_into_the_context_without_speech(emu38: Any, platform: str) -> None:
    rec, live, sid = await _tool_turn(emu38, "SILENT", platform)
    try:
        await rec.turns(1)
        await rec.handle_after_turn()
        await asyncio.sleep(0.4)  # a spoken result would have started by now
        assert len(rec.of(L.TurnComplete)) == 1 and not rec.of(L.Interrupted)
        assert _model_finals(rec) == ["tone reply"]
        info = emu38.session(sid)
        assert info["tool_responses"][0]["scheduling"] == "SILENT"
        assert f"tool: {TOOL_SAID}" in info["history"]
        assert info["setup"]["behaviors"] == {"lookup": "NON_BLOCKING"}
        assert info["setup"]["proactive_audio"] is True
        assert info["live"]["platform"] == platform
    finally:
        await live.close()


@PLATFORMS
async def test_38_when_idle_result_is_spoken_after_the_answer(emu38: Any, platform: str) -> None:
    rec, live, sid = await _tool_turn(emu38, "WHEN_IDLE", platform)
    try:
        await rec.turns(2)
        assert not rec.of(L.Interrupted)
        assert _model_finals(rec) == ["tone reply", TOOL_SAID]  # the answer whole, then the result
        first_end = rec.events.index(rec.of(L.TurnComplete)[0])
        assert len(rec.audio(0)) - len(rec.audio(first_end)) == 2 * 24000  # the 1 s answer uncut
        assert emu38.session(sid)["tool_responses"][0]["scheduling"] == "WHEN_IDLE"
    finally:
        await live.close()


@PLATFORMS
async def test_38_interrupt_result_cuts_the_answer(emu38: Any, platform: str) -> None:
    rec, live, sid = await _tool_turn(emu38, "INTERRUPT", platform)
    try:
        await rec.wait(lambda: bool(rec.of(L.Interrupted)), what="the answer cut")
        await rec.turns(1)
        cut = rec.events.index(rec.of(L.Interrupted)[0])
        assert len(rec.audio(0)) - len(rec.audio(cut)) < 2 * 24000  # less than the 1 s answer played
        assert _model_finals(rec) == [TOOL_SAID]  # the cut answer never finished; the result did
        assert rec.events.index(rec.of(L.TurnComplete)[0]) > cut
        assert emu38.session(sid)["tool_responses"][0]["scheduling"] == "INTERRUPT"
    finally:
        await live.close()


async def test_38_sends_multipart_messages(emu38: Any) -> None:
    """The real SDK sees the 3.8 profile's multipart messages: the tool call and the input transcription
    on the first audio message, two audio parts per message, transcription on the last one."""
    client = emu38.genai_client()
    seen: list[types.LiveServerMessage] = []
    config = types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO],
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
        realtime_input_config=types.RealtimeInputConfig(
            automatic_activity_detection=types.AutomaticActivityDetection(disabled=True)),
        tools=[types.Tool(function_declarations=[types.FunctionDeclaration(name="lookup")])])
    async with client.aio.live.connect(model=M38, config=config) as s:
        await s.send_realtime_input(activity_start=types.ActivityStart())
        await s.send_realtime_input(audio=types.Blob(data=tone(440, 0.3), mime_type="audio/pcm;rate=16000"))
        await s.send_realtime_input(activity_end=types.ActivityEnd())
        async for msg in s.receive():
            seen.append(msg)
            if msg.server_content and msg.server_content.turn_complete:
                break
    audio_msgs = [m for m in seen if m.server_content and m.server_content.model_turn]
    first = audio_msgs[0]
    assert first.tool_call is not None and first.server_content is not None
    assert first.server_content.input_transcription is not None
    assert len(first.server_content.model_turn.parts or []) == 2  # type: ignore[union-attr]
    assert audio_msgs[-1].server_content.output_transcription is not None  # type: ignore[union-attr]
    assert seen[-1].usage_metadata is not None


async def test_38_refuses_proactive_audio_off(emu38: Any) -> None:
    from google.genai import errors

    config = types.LiveConnectConfig(proactivity=types.ProactivityConfig(proactive_audio=False))
    with pytest.raises(errors.APIError) as err:
        async with emu38.genai_client().aio.live.connect(model=M38, config=config) as s:
            async for _msg in s.receive():
                await asyncio.sleep(0)
    assert err.value.code == 1007 and "always on" in str(err.value)
