"""The fast path of workers.ai.live is pinned to google-genai 3.4.0: it must write the very bytes the SDK
writes, and turn every server message into the same events as the SDK's own parser. If the SDK is
upgraded these tests say exactly what changed."""

from __future__ import annotations

import base64
import importlib.metadata
import json
from typing import Any

import pytest
from google.genai import types
from google.genai.live import AsyncSession

from appliance.config import ModelConfig
from tests.harness.emulator import tone
from workers.ai import live as L


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


def layer(events: list[Any]) -> tuple[L.LiveSession, Any]:
    s = L.LiveSession(ModelConfig(api_key="k"), "contract",
                      L.LiveOptions("Puck", "en-US", "x"), events.append)
    conn = L._Conn(stack=None, session=None, ws=CaptureWs())  # type: ignore[arg-type]
    s._conn = conn
    return s, conn


def test_sdk_version_is_the_pinned_one() -> None:
    assert importlib.metadata.version("google-genai") == "3.4.0"
    assert "_ws" in AsyncSession.__init__.__code__.co_names or hasattr(sdk_session()[0], "_ws")


@pytest.mark.parametrize("kind", [L.AUDIO, L.START, L.END, L.TEXT])
async def test_fast_path_sends_the_bytes_the_sdk_sends(kind: int) -> None:
    sdk, ws = sdk_session()
    data = tone(440, 0.04) + bytes([0xFB, 0xFF, 0xFE, 0xFF])  # hits both base64 alphabets' differences
    text = 'The caller pressed: 1234#, "quoted" é'
    if kind == L.AUDIO:
        await sdk.send_realtime_input(audio=types.Blob(data=data, mime_type=L.AUDIO_MIME))
    elif kind == L.START:
        await sdk.send_realtime_input(activity_start=types.ActivityStart())
    elif kind == L.TEXT:
        await sdk.send_realtime_input(text=text)
        data = text.encode()
    else:
        await sdk.send_realtime_input(activity_end=types.ActivityEnd())
    s, _ = layer([])
    assert s._encode(L._Item(1, kind, data if kind in (L.AUDIO, L.TEXT) else b"", 0.0)) == ws.sent[0]


async def test_tool_response_matches_the_sdk() -> None:
    sdk, ws = sdk_session()
    responses = [{"id": "c1", "name": "lights", "response": {"on": True}}]
    await sdk.send_tool_response(function_responses=[types.FunctionResponse(**responses[0])])
    s, conn = layer([])
    await s._send_raw(conn, json.dumps({"tool_response": {"functionResponses": responses}}))
    assert json.loads(conn.ws.sent[0]) == json.loads(ws.sent[0])


AUDIO_B64 = base64.b64encode(tone(440, 0.02, rate=24000)).decode()
SERVER_MESSAGES: list[dict[str, Any]] = [
    {"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000",
                                                               "data": AUDIO_B64}}]}}},
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
]


@pytest.mark.parametrize("msg", SERVER_MESSAGES, ids=lambda m: "+".join(m) + ":" + ",".join(
    m.get("serverContent", {})))
def test_fast_parser_matches_the_sdk_parser(msg: dict[str, Any]) -> None:
    fast: list[Any] = []
    sdk: list[Any] = []
    s1, c1 = layer(fast)
    s2, c2 = layer(sdk)
    s2.fast_path = False
    for conn in (c1, c2):
        conn.ends.append((7, 0.0))  # one unanswered activity, so interrupted/turnComplete resolve it
    s1._dispatch(c1, json.loads(json.dumps(msg)))
    s2._dispatch_sdk(c2, json.dumps(msg).encode())
    assert fast == sdk
    silent = "generationComplete" in msg.get("serverContent", {}) or msg.get(
        "sessionResumptionUpdate", {}).get("resumable") is False
    assert bool(fast) != silent  # events exactly when the message carries something for the worker
    assert s1._answered == s2._answered and s1.resume_handle == s2.resume_handle


def test_go_away_replaces_the_connection_in_both_parsers() -> None:
    msg = {"goAway": {"timeLeft": "1.5s"}}
    s1, c1 = layer([])
    s2, c2 = layer([])
    s1._dispatch(c1, msg)
    s2._dispatch_sdk(c2, json.dumps(msg).encode())
    assert s1._replace.is_set() and s2._replace.is_set()


def test_unknown_server_message_is_ignored_by_the_fast_path() -> None:
    events: list[Any] = []
    s, c = layer(events)
    s._dispatch(c, {"someFutureMessage": {"x": 1}})
    assert events == []
