"""The Live API's wire: outgoing items to websocket frames, server frames to one typed ``Inbound``.

Two implementations behind one interface (``Wire``), chosen per session:

- ``FastWire`` (the default): hand-built JSON written on the SDK's websocket, server frames parsed with
  ``json.loads`` — byte-identical to what google-genai 3.4.0 sends and accepts, at a fraction of its CPU
  (the SDK costs ~44 µs to send and ~62 µs to parse a message; docs/benchmarks.md).
  ``tests/ai/live/test_wire.py`` pins both directions against the SDK.
- ``SdkWire``: the SDK's own ``send_realtime_input`` and ``LiveServerMessage`` parser, kept as the
  reference and as a fallback (``fast_path=False``).

An unknown server message type is reported in ``Inbound.unknown`` (the session logs and ignores it; the
SDK's parser would crash on it). A frame that is not a JSON object raises ``ValueError``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from appliance.records.usage import usage_details
from shm.audio import UP_RATE
from workers.ai.live.events import FunctionCall, JsonValue, Transcript, Usage
from workers.ai.live.outbox import Item, Kind

if TYPE_CHECKING:
    from google.genai.live import AsyncSession

AUDIO_MIME = f"audio/pcm;rate={UP_RATE}"
KNOWN = frozenset({"serverContent", "usageMetadata", "toolCall", "toolCallCancellation",
                   "sessionResumptionUpdate", "goAway", "setupComplete", "voiceActivityDetectionSignal",
                   "voiceActivity"})


class WebSocket(Protocol):
    async def send(self, message: str) -> None: ...


@dataclass(slots=True)
class Inbound:
    """One server message, as the session needs it (fields in the order the session applies them).
    A message may carry several of them at once (3.8 sends audio parts, transcriptions, the turn's end,
    usage and a tool call in one frame): every field is filled, none excludes another."""

    parts: list[bytes | str] = field(default_factory=list)  # model audio (24 kHz PCM16) or model text
    input_transcript: tuple[str, bool] | None = None  # (text, finished)
    output_transcript: tuple[str, bool] | None = None
    interrupted: bool = False
    turn_complete: bool = False
    usage: Usage | None = None
    tool_calls: tuple[FunctionCall, ...] | None = None
    tool_cancellations: tuple[str, ...] | None = None
    handle: str | None = None  # a new resumable handle
    handle_index: int | None = None  # transparent resumption: the last client message the handle covers
    go_away: str | None = None  # timeLeft ("" if not given)
    unknown: tuple[str, ...] = ()


class Wire(Protocol):
    async def send(self, ws: WebSocket, session: AsyncSession | None, item: Item) -> None: ...

    def decode(self, raw: bytes) -> Inbound: ...


def encode(item: Item) -> str:
    """The realtime_input frame for one item, exactly as google-genai 3.4.0 writes it."""
    if item.kind is Kind.AUDIO:
        b64 = base64.urlsafe_b64encode(item.data).decode("ascii")
        return '{"realtime_input": {"audio": {"data": "' + b64 + '", "mime_type": "' + AUDIO_MIME + '"}}}'
    if item.kind is Kind.START:
        return '{"realtime_input": {"activityStart": {}}}'
    if item.kind is Kind.TEXT:
        return json.dumps({"realtime_input": {"text": item.data.decode()}})
    return '{"realtime_input": {"activityEnd": {}}}'


def encode_tool_response(responses: Sequence[Mapping[str, object]]) -> str:
    """``tool_response`` for ``[{"id", "name", "response"}]`` (the SDK's ``send_tool_response``)."""
    return json.dumps({"tool_response": {"functionResponses": list(responses)}})


def encode_client_content(history: Sequence[Transcript]) -> str:
    """``client_content`` seeding a fresh session with the conversation so far (no turn complete: the
    model answers nothing until the caller speaks), as the SDK's ``send_client_content`` writes it."""
    turns = [{"parts": [{"text": t.text}], "role": t.role} for t in history]
    return json.dumps({"client_content": {"turns": turns, "turnComplete": False}})


def _json_args(args: object) -> dict[str, JsonValue]:
    return dict(args) if isinstance(args, dict) else {}


class FastWire:
    async def send(self, ws: WebSocket, session: AsyncSession | None, item: Item) -> None:
        await ws.send(encode(item))

    def decode(self, raw: bytes) -> Inbound:
        """Hand parsing of one server message (camelCase, as the service sends)."""
        msg = json.loads(raw)
        if not isinstance(msg, dict):
            raise ValueError("server frame is not a JSON object")
        out = Inbound()
        sc = msg.get("serverContent")
        if sc is not None:
            turn = sc.get("modelTurn")
            if turn:
                for part in turn.get("parts") or ():
                    inline = part.get("inlineData")
                    if inline and inline.get("data"):
                        out.parts.append(base64.b64decode(inline["data"]))
                    elif part.get("text"):
                        out.parts.append(str(part["text"]))
            it = sc.get("inputTranscription")
            if it:
                out.input_transcript = (it.get("text") or "", bool(it.get("finished")))
            ot = sc.get("outputTranscription")
            if ot:
                out.output_transcript = (ot.get("text") or "", bool(ot.get("finished")))
            out.interrupted = bool(sc.get("interrupted"))
            out.turn_complete = bool(sc.get("turnComplete"))
        um = msg.get("usageMetadata")
        if um:
            # Developer API: responseTokenCount; Vertex AI: candidatesTokenCount (same meaning)
            r = int(um.get("responseTokenCount") or um.get("candidatesTokenCount") or 0)
            p = int(um.get("promptTokenCount") or 0)
            out.usage = Usage(p, r, int(um.get("totalTokenCount") or p + r), usage_details(um))
        tc = msg.get("toolCall")
        if tc:
            out.tool_calls = tuple(FunctionCall(str(c.get("id")), str(c.get("name") or ""),
                                                _json_args(c.get("args")))
                                   for c in tc.get("functionCalls") or ())
        tcc = msg.get("toolCallCancellation")
        if tcc:
            out.tool_cancellations = tuple(str(i) for i in tcc.get("ids") or ())
        sru = msg.get("sessionResumptionUpdate")
        if sru and sru.get("newHandle") and sru.get("resumable"):
            out.handle = str(sru["newHandle"])
            if sru.get("lastConsumedClientMessageIndex") is not None:
                out.handle_index = int(sru["lastConsumedClientMessageIndex"])
        if "goAway" in msg:
            out.go_away = str((msg["goAway"] or {}).get("timeLeft") or "")
        if not KNOWN.issuperset(msg):
            out.unknown = tuple(sorted(set(msg) - KNOWN))
        return out


class SdkWire:
    def __init__(self, vertex: bool = False) -> None:
        self.vertex = vertex

    async def send(self, ws: WebSocket, session: AsyncSession | None, item: Item) -> None:
        from google.genai import types

        assert session is not None
        if item.kind is Kind.AUDIO:
            await session.send_realtime_input(audio=types.Blob(data=item.data, mime_type=AUDIO_MIME))
        elif item.kind is Kind.START:
            await session.send_realtime_input(activity_start=types.ActivityStart())
        elif item.kind is Kind.TEXT:
            await session.send_realtime_input(text=item.data.decode())
        else:
            await session.send_realtime_input(activity_end=types.ActivityEnd())

    def decode(self, raw: bytes) -> Inbound:
        """The same, through the SDK's converters and pydantic models."""
        from google.genai import _live_converters, types

        resp = json.loads(raw)
        if not isinstance(resp, dict):
            raise ValueError("server frame is not a JSON object")
        convert = (_live_converters._LiveServerMessage_from_vertex if self.vertex
                   else _live_converters._LiveServerMessage_from_mldev)
        msg = types.LiveServerMessage._from_response(response=convert(resp), kwargs={})
        out = Inbound()
        sc = msg.server_content
        if sc is not None:
            for part in (sc.model_turn.parts or ()) if sc.model_turn else ():
                if part.inline_data and part.inline_data.data:
                    out.parts.append(part.inline_data.data)
                elif part.text:
                    out.parts.append(part.text)
            if sc.input_transcription:
                it = sc.input_transcription
                out.input_transcript = (it.text or "", bool(it.finished))
            if sc.output_transcription:
                out.output_transcript = (sc.output_transcription.text or "",
                                         bool(sc.output_transcription.finished))
            out.interrupted = bool(sc.interrupted)
            out.turn_complete = bool(sc.turn_complete)
        if msg.usage_metadata:
            um = msg.usage_metadata
            p, r = um.prompt_token_count or 0, um.response_token_count or 0
            out.usage = Usage(p, r, um.total_token_count or p + r, usage_details(um))
        if msg.tool_call:
            out.tool_calls = tuple(FunctionCall(str(c.id), c.name or "", _json_args(c.args))
                                   for c in msg.tool_call.function_calls or ())
        if msg.tool_call_cancellation:
            out.tool_cancellations = tuple(str(i) for i in msg.tool_call_cancellation.ids or ())
        u = msg.session_resumption_update
        if u and u.new_handle and u.resumable:
            out.handle = u.new_handle
            if u.last_consumed_client_message_index is not None:
                out.handle_index = int(u.last_consumed_client_message_index)
        if msg.go_away is not None:
            out.go_away = str(msg.go_away.time_left or "")
        if not KNOWN.issuperset(resp):
            out.unknown = tuple(sorted(set(resp) - KNOWN))
        return out


def wire(fast_path: bool, *, vertex: bool = False) -> Wire:
    return FastWire() if fast_path else SdkWire(vertex)
