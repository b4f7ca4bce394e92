"""The fast path (workers/ai/live/wire.py) is pinned to google-genai 3.4.0: it must write the very bytes
the SDK writes, and decode every server message exactly as the SDK's own parser does. If the SDK is
upgraded these tests say exactly what changed."""

from __future__ import annotations

import base64
import importlib.metadata
import json
from typing import Any

import pytest
from google.genai import types
from google.genai.live import AsyncSession

from tests.harness.emulator import tone
from workers.ai.live.events import Usage
from workers.ai.live.outbox import Item, Kind
from workers.ai.live.wire import AUDIO_MIME, FastWire, SdkWire, encode, encode_tool_response


class CaptureWs:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, msg: str) -> None:
        self.sent.append(msg)


def sdk_session() -> tuple[AsyncSession, CaptureWs]:
    from google import genai

    client = genai.Client(api_key="k", http_options=types.HttpOptions(api_version="v1beta"))
    ws = CaptureWs()
    return AsyncSession(api_client=client._api_client, websocket=ws), ws  # type: ignore[arg-type]


def test_sdk_version_is_the_pinned_one() -> None:
    assert importlib.metadata.version("google-genai") == "3.4.0"
    assert "_ws" in AsyncSession.__init__.__code__.co_names or hasattr(sdk_session()[0], "_ws")


@pytest.mark.parametrize("kind", list(Kind))
async def test_fast_path_sends_the_bytes_the_sdk_sends(kind: Kind) -> None:
    sdk, ws = sdk_session()
    data = tone(440, 0.04) + bytes([0xFB, 0xFF, 0xFE, 0xFF])  # hits both base64 alphabets' differences
    text = 'The caller pressed: 1234#, "quoted" é'
    if kind is Kind.AUDIO:
        await sdk.send_realtime_input(audio=types.Blob(data=data, mime_type=AUDIO_MIME))
    elif kind is Kind.START:
        await sdk.send_realtime_input(activity_start=types.ActivityStart())
    elif kind is Kind.TEXT:
        await sdk.send_realtime_input(text=text)
        data = text.encode()
    else:
        await sdk.send_realtime_input(activity_end=types.ActivityEnd())
    item = Item(1, kind, data if kind in (Kind.AUDIO, Kind.TEXT) else b"", 0.0)
    assert encode(item) == ws.sent[0]
    fast, slow = CaptureWs(), CaptureWs()
    await FastWire().send(fast, None, item)
    sdk2, slow = sdk_session()
    await SdkWire().send(CaptureWs(), sdk2, item)
    assert fast.sent == slow.sent == ws.sent


async def test_tool_response_matches_the_sdk() -> None:
    sdk, ws = sdk_session()
    responses = [{"id": "c1", "name": "lights", "response": {"on": True}}]
    await sdk.send_tool_response(function_responses=[types.FunctionResponse(**responses[0])])
    assert json.loads(encode_tool_response(responses)) == json.loads(ws.sent[0])


AUDIO_B64 = base64.b64encode(tone(440, 0.02, rate=24000)).decode()
SERVER_MESSAGES: list[dict[str, Any]] = [
    {"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000",
                                                               "data": AUDIO_B64}}]}}},
    {"serverContent": {"modelTurn": {"parts": [{"text": "thinking"}]}}},
    {"serverContent": {"inputTranscription": {"text": "hello there", "finished": True}}},
    {"serverContent": {"outputTranscription": {"text": "partial"}}},
    {"serverContent": {"interrupted": True}},
    {"serverContent": {"generationComplete": True}},
    {"serverContent": {"turnComplete": True},
     "usageMetadata": {"promptTokenCount": 26, "responseTokenCount": 25, "totalTokenCount": 51}},
    {"toolCall": {"functionCalls": [{"id": "c1", "name": "lights", "args": {"room": "hall"}}]}},
    {"toolCallCancellation": {"ids": ["c1"]}},
    {"sessionResumptionUpdate": {"newHandle": "h-1", "resumable": True}},
    {"sessionResumptionUpdate": {"newHandle": "h-2", "resumable": False}},
    {"sessionResumptionUpdate": {"newHandle": "h-3", "resumable": True,
                                 "lastConsumedClientMessageIndex": "41"}},
    {"setupComplete": {"sessionId": "s-1"}},
]


def test_vertex_usage_field_is_decoded_like_the_sdk_does() -> None:
    """Vertex names the answer's tokens candidatesTokenCount (the SDK maps it to response_token_count)."""
    raw = json.dumps({"usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 5,
                                        "totalTokenCount": 12}}).encode()
    assert FastWire().decode(raw).usage == SdkWire(vertex=True).decode(raw).usage == Usage(7, 5, 12)


@pytest.mark.parametrize("vertex", [False, True], ids=["developer", "vertex"])
@pytest.mark.parametrize("msg", SERVER_MESSAGES, ids=lambda m: "+".join(m) + ":" + ",".join(
    m.get("serverContent", {})))
def test_fast_decoder_matches_the_sdk_decoder(msg: dict[str, Any], vertex: bool) -> None:
    """Every server message type we use, through the SDK's own converter for each platform (Vertex
    names the answer's tokens candidatesTokenCount)."""
    if vertex and "usageMetadata" in msg:
        um = dict(msg["usageMetadata"])
        um["candidatesTokenCount"] = um.pop("responseTokenCount")
        msg = {**msg, "usageMetadata": um}
    raw = json.dumps(msg).encode()
    fast, sdk = FastWire().decode(raw), SdkWire(vertex).decode(raw)
    assert fast == sdk
    silent = "generationComplete" in msg.get("serverContent", {}) or "setupComplete" in msg or msg.get(
        "sessionResumptionUpdate", {}).get("resumable") is False
    carries = (fast.parts or fast.input_transcript or fast.output_transcript or fast.interrupted
               or fast.turn_complete or fast.usage or fast.tool_calls or fast.tool_cancellations
               or fast.handle)
    assert bool(carries) != silent  # something for the session exactly when the message carries it


def test_go_away_is_decoded_by_both() -> None:
    raw = json.dumps({"goAway": {"timeLeft": "1.5s"}}).encode()
    assert FastWire().decode(raw).go_away == SdkWire().decode(raw).go_away == "1.5s"


def test_unknown_server_message_is_reported_not_fatal() -> None:
    got = FastWire().decode(b'{"someFutureMessage": {"x": 1}}')
    assert got.unknown == ("someFutureMessage",) and not got.parts
    with pytest.raises(ValueError):
        FastWire().decode(b"[1, 2]")


async def test_seed_client_content_matches_the_sdk() -> None:
    from workers.ai.live.events import Transcript
    from workers.ai.live.wire import encode_client_content

    sdk, ws = sdk_session()
    history = [Transcript("user", "my order is 1234"), Transcript("model", "Found it, it ships today.")]
    await sdk.send_client_content(turns=[types.Content(role=t.role, parts=[types.Part(text=t.text)])
                                         for t in history], turn_complete=False)
    assert json.loads(encode_client_content(history)) == json.loads(ws.sent[0])
