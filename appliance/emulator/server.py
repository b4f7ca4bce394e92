"""A protocol-faithful Gemini Live (BidiGenerateContent) server, so the real SDK runs unchanged offline.

Wire protocol (google-genai 3.4 against ``wss://HOST/ws/google.ai.generativelanguage.{v1alpha,v1beta}
.GenerativeService.BidiGenerateContent``):

- the API key comes in ``x-goog-api-key`` (or ``?key=``); a wrong key is accepted at HTTP level and then
  closed with 1008, exactly like the service, so the SDK raises ``APIError`` with a clear message;
- the first frame must be ``setup`` (anything else: close 1007); answered by ``setupComplete{sessionId}``
  where ``sessionId`` is the *conversation* id (stable across resumptions — the key for the audio record);
- client frames may use either key casing and either base64 alphabet (see :mod:`.protocol`); bad JSON,
  unknown message types, truncated base64 or odd-length PCM close the connection with 1007 and a reason;
  frames above ``max_frame_bytes`` close it with 1009 (websockets does that);
- turns: automatic (energy + ``silenceDurationMs``) unless ``automaticActivityDetection.disabled``, then
  ``activityStart``/``activityEnd``; ``audioStreamEnd`` flushes an automatic turn;
- replies: ``inputTranscription``, optional model first-byte delay, 24 kHz PCM chunks (``echo`` of the
  caller's last utterance, a ``tone`` or ``silence``) paced in real time or in a burst,
  ``outputTranscription``, ``generationComplete``, ``turnComplete`` + ``usageMetadata`` (25 tokens/s of
  audio). Caller speech during a reply cancels it and sends ``interrupted``;
- realtime text (``realtimeInput.text``, the appliance's keypad digits): recorded per conversation in
  order (``texts`` in ``/emulator/sessions``; handles snapshot it like the audio record). Inside a manual
  activity it belongs to that turn — its reply's ``inputTranscription`` says ``… and text: T`` and its
  ``outputTranscription`` ``<reply> reply to text: T``; otherwise it is a turn of its own, answered at once;
- tool responses received are recorded per conversation (``tool_responses``), answered or not;
- tools: with ``tool_calls`` on and functions declared in setup, a turn first sends ``toolCall`` and waits
  for the matching ``toolResponse`` (barge-in meanwhile sends ``toolCallCancellation``); a NON_BLOCKING
  function (declared so, or any without ``behavior`` on a 3.8 model) does not wait: the answer goes on
  and the response's ``scheduling`` decides (SILENT: history only; WHEN_IDLE: spoken as a turn after
  the current answer; INTERRUPT: ``interrupted``, then spoken at once);
- model profiles by name (appliance/model_profiles.py): 3.1 refuses client content after the first turn
  (1007); 3.8 closes with 1011 at its session limit and forgets the handles, refuses
  ``proactivity.proactiveAudio: false`` (1007) and sends multipart messages (see ``_answer``);
- session resumption (when ``sessionResumption`` is in setup): ``sessionResumptionUpdate{newHandle,
  resumable}`` after setup and after each completed turn. A handle snapshots the conversation as of the
  *end of the caller's turn it answered* (the ``activityEnd``, or the detected end of speech): history,
  last utterance and the length of the received-audio record; input received after that point is not
  part of it. With ``transparent`` the update carries ``lastConsumedClientMessageIndex`` (0-based index
  of the client frames of *this connection*, the setup being 0) of that same point. Resuming restores
  exactly that snapshot, so audio sent after the turn end is lost unless the client replays it.
  That makes the record a proof: it is continuous only if the client replayed correctly.
  An unknown handle closes with 1007;
- ``goAway{timeLeft}`` then a close after ``timeLeft``; context window compression config is accepted.

Faults (run-wide from flags, for the next connection, or for one live session through the control
channel): first-byte delay, pacing, abrupt close (any code; 1006 = drop TCP without a close frame),
refuse new connections (HTTP 503), goAway after N seconds, stop reading (a slow consumer), a garbage
frame, tool calls.

Control channel: plain HTTPS GET on the same port under ``/emulator/`` (same API key), because the
websockets server can answer ordinary GETs and tests need no second listener:
``health``, ``sessions`` (JSON), ``audio?session=ID`` (raw PCM record), ``config?k=v`` (run-wide),
``next?k=v`` (the next connection only), ``fault?session=ID&action=…`` (one live session:
close[&code], goaway[&time_left_s], stop_reading, resume_reading, garbage[&kind=json|unknown|b64|big],
set&<behaviour fields>).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http
import itertools
import json
import logging
import math
import secrets
import ssl
import time
import urllib.parse
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import soxr
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from appliance.emulator.protocol import (
    ProtocolError,
    decode_b64,
    dumps,
    duration,
    parse_client_frame,
    pcm_rate,
)
from appliance.emulator.turns import TurnDetector
from appliance.emulator.vertex import VERSIONS as VERTEX_VERSIONS
from appliance.emulator.vertex import TokenIssuer, connection_class, parse_model, vertex_version
from appliance.model_profiles import model_profile, non_blocking_by_default, proactive_audio_always_on

log = logging.getLogger("appliance.emulator")

PATH_PREFIX = "/ws/google.ai.generativelanguage."
PATH_SUFFIX = ".GenerativeService.BidiGenerateContent"
API_VERSIONS = ("v1alpha", "v1beta")
OUT_RATE = 24000
TOKENS_PER_SECOND = 25
MAX_HISTORY = 200
PROFILE_38_LIMIT_S = 58 * 60


@dataclass
class Behaviour:
    """What a connection does: reply mode and faults. Run-wide defaults; overridable per connection."""

    reply: str = "echo"  # echo | tone | silence
    tone_hz: float = 440.0
    pacing: str = "realtime"  # realtime | burst
    chunk_ms: int = 40
    first_byte_delay_ms: int = 0
    setup_delay_ms: int = 0  # a slow model: setupComplete only after this (tests hold a probe in flight)
    goaway_after_s: float = 0.0  # 0: never
    goaway_time_left_s: float = 1.0
    close_after_s: float = 0.0  # 0: never
    close_code: int = 1011
    stop_reading_after_s: float = 0.0
    refuse: bool = False
    tool_calls: bool = False
    threshold_dbfs: float = -45.0
    silence_ms: int = 500  # automatic detection default when setup gives none
    session_limit_s: float = 0.0  # "3.8" models: hard close after this (0: their 58 min), handles dead after


def _coerce_behaviour(base: Behaviour, values: dict[str, str]) -> Behaviour:
    kinds = {f.name: f.type for f in fields(Behaviour)}
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k not in kinds:
            raise ValueError(f"unknown setting {k!r} (known: {', '.join(kinds)})")
        kind = kinds[k]
        if kind in ("bool", bool):
            out[k] = v.lower() in ("1", "true", "yes", "on")
        elif kind in ("int", int):
            out[k] = int(v)
        elif kind in ("float", float):
            out[k] = float(v)
        else:
            out[k] = v
    new = replace(base, **out)
    if new.reply not in ("echo", "tone", "silence"):
        raise ValueError("reply must be echo, tone or silence")
    if new.pacing not in ("realtime", "burst"):
        raise ValueError("pacing must be realtime or burst")
    return new


def setup_summary(setup: dict[str, Any]) -> dict[str, Any]:
    """The parts of a setup message tests assert on: model, voice, language, system instruction text and
    declared function names (the SDK sends camelCase; snake_case is accepted too)."""
    def get(d: Any, *names: str) -> Any:
        for n in names:
            if isinstance(d, dict) and n in d:
                return d[n]
        return None

    gen = get(setup, "generationConfig", "generation_config") or {}
    speech = get(gen, "speechConfig", "speech_config") or {}
    voice = get(get(get(speech, "voiceConfig", "voice_config"), "prebuiltVoiceConfig",
                    "prebuilt_voice_config"), "voiceName", "voice_name")
    si = get(setup, "systemInstruction", "system_instruction")
    parts = get(si, "parts") if isinstance(si, dict) else None
    text = "".join(str(p.get("text") or "") for p in parts or [] if isinstance(p, dict)) if parts else (
        si if isinstance(si, str) else "")
    functions = [fd.get("name") for tool in setup.get("tools") or [] if isinstance(tool, dict)
                 for fd in get(tool, "functionDeclarations", "function_declarations") or []
                 if isinstance(fd, dict)]
    behaviors = {fd.get("name"): fd.get("behavior") for tool in setup.get("tools") or []
                 if isinstance(tool, dict)
                 for fd in get(tool, "functionDeclarations", "function_declarations") or []
                 if isinstance(fd, dict) and fd.get("behavior")}
    proactive = get(get(setup, "proactivity"), "proactiveAudio", "proactive_audio")
    return {"model": setup.get("model"), "voice": voice, "language": get(speech, "languageCode",
                                                                          "language_code"),
            "system_instruction": text, "functions": functions, "behaviors": behaviors,
            "proactive_audio": proactive}


@dataclass
class Conversation:
    """The model-side state a handle restores: history and the record of caller audio received."""

    id: str
    record: bytearray = field(default_factory=bytearray)
    base: int = 0  # bytes dropped from the front of the record (it keeps the last max_record_bytes)
    rate: int = 16000
    history: list[str] = field(default_factory=list)
    last_utterance: bytes = b""
    texts: list[str] = field(default_factory=list)  # realtime text received (e.g. keypad digits), in order
    tool_responses: list[dict[str, Any]] = field(default_factory=list)  # functionResponses received
    setup: dict[str, Any] = field(default_factory=dict)  # what the last setup asked for (setup_summary)
    resumes: int = 0
    touched: float = field(default_factory=time.monotonic)

    @property
    def end(self) -> int:
        """Absolute length of all caller audio received (what snapshots record)."""
        return self.base + len(self.record)

    def add_audio(self, pcm: bytes, limit: int) -> None:
        self.record += pcm
        excess = len(self.record) - limit
        if excess > 0:
            del self.record[:excess]
            self.base += excess


@dataclass(frozen=True)
class Snapshot:
    conversation_id: str
    record_len: int  # absolute (Conversation.end) at the snapshot point
    history: tuple[str, ...]
    last_utterance: bytes
    texts: int = 0  # len(Conversation.texts) at the snapshot point
    created: float = field(default_factory=time.monotonic)


class _Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Connection:
    """One WebSocket connection: a receive loop, turn detection and reply tasks."""

    def __init__(self, server: EmulatorServer, ws: ServerConnection, behaviour: Behaviour, conn_id: int):
        self.server = server
        self.ws = ws
        self.profile = ""  # model generation whose documented quirks apply: "3.1", "3.8" or ""
        self.turns_done = 0
        self.platform = "developer"
        self.model: dict[str, str] = {}
        self.b = behaviour
        self.id = conn_id
        self.conv: Conversation | None = None
        self.detector = TurnDetector()
        self.msg_index = -1
        self.resumption = False
        self.transparent = False
        self.transcribe_in = False
        self.transcribe_out = False
        self.functions: list[str] = []
        self.non_blocking: set[str] = set()  # functions the model does not wait for (3.8 by default)
        self.async_calls: dict[str, str] = {}  # open NON_BLOCKING call id → function name
        self.when_idle: list[str] = []  # WHEN_IDLE tool results, spoken after the current answer
        self.reply_task: asyncio.Task[None] | None = None
        self.pending_tool: tuple[str, asyncio.Future[dict[str, Any]]] | None = None
        self.reading = asyncio.Event()
        self.reading.set()
        self.timers: list[asyncio.Task[None]] = []
        self.state = "setup"
        # (record length, client message index, texts received) at the last caller-turn end
        self.boundary = (0, 0, 0)
        self.turn_texts: list[str] = []  # realtime text inside the open (manual) caller activity
        self.bytes_in = 0
        self.started = time.monotonic()

    # --- sending -------------------------------------------------------------------------------
    async def send(self, msg: dict[str, Any] | bytes) -> None:
        await self.ws.send(msg if isinstance(msg, bytes) else dumps(msg))

    async def close(self, code: int, reason: str = "") -> None:
        self.state = "closed"
        if code == 1006:
            self.ws.transport.abort()
            return
        await self.ws.close(code, reason[:120])

    # --- main loop -----------------------------------------------------------------------------
    async def run(self, api_key_ok: bool) -> None:
        if not api_key_ok:
            # Like the service: the handshake succeeds, the first frame (setup) is read, then 1008.
            log.info("rejected: bad API key", extra={"conn": self.id})
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await asyncio.wait_for(self.ws.recv(), 5)
            await self.close(1008, "API key not valid. Please pass a valid API key.")
            return
        try:
            await self._loop()
        except _Closed as exc:
            log.info("closing", extra={"conn": self.id, "code": exc.code, "reason": exc.reason})
            await self.close(exc.code, exc.reason)
        except ProtocolError as exc:
            log.info("protocol error", extra={"conn": self.id, "reason": exc.reason})
            await self.close(exc.code, exc.reason)
        except ConnectionClosed:
            pass
        finally:
            self.state = "closed"
            for t in [*self.timers, self.reply_task]:
                if t and not t.done():
                    t.cancel()

    async def _loop(self) -> None:
        while True:
            if not self.reading.is_set():
                await self.reading.wait()
            frame = await self.ws.recv()
            self.msg_index += 1
            kind, body = parse_client_frame(frame)
            if self.state == "setup":
                if kind != "setup":
                    raise ProtocolError("setup must be the first message")
                await self._setup(body)
                continue
            if kind == "setup":
                raise ProtocolError("setup may be sent only once")
            if kind == "realtimeInput":
                await self._realtime(body)
            elif kind == "clientContent":
                await self._client_content(body)
            elif kind == "toolResponse":
                self._tool_response(body)

    # --- setup and resumption ------------------------------------------------------------------
    async def _setup(self, setup: dict[str, Any]) -> None:
        if not isinstance(setup.get("model"), str) or not setup["model"]:
            raise ProtocolError("setup.model is required")
        if self.platform == "vertex":
            parsed = parse_model(setup["model"])
            if parsed is None:
                raise ProtocolError("setup.model: expected "
                                    "projects/<p>/locations/<l>/publishers/google/models/<m>")
            self.model = parsed
        self.profile = model_profile(setup["model"])
        rt = setup.get("realtimeInputConfig") or {}
        aad = rt.get("automaticActivityDetection") or {}
        self.detector = TurnDetector(
            manual=bool(aad.get("disabled")),
            silence_ms=int(aad.get("silenceDurationMs") or self.b.silence_ms),
            prefix_ms=int(aad.get("prefixPaddingMs") or 40),
            threshold_dbfs=self.b.threshold_dbfs,
        )
        self.transcribe_in = "inputAudioTranscription" in setup
        self.transcribe_out = "outputAudioTranscription" in setup
        for tool in setup.get("tools") or []:
            for fd in tool.get("functionDeclarations") or []:
                if isinstance(fd, dict) and fd.get("name"):
                    self.functions.append(fd["name"])
                    behavior = str(fd.get("behavior") or "").upper()
                    if behavior == "NON_BLOCKING" or (not behavior and non_blocking_by_default(self.profile)):
                        self.non_blocking.add(fd["name"])
        proactivity = setup.get("proactivity") or {}
        if proactive_audio_always_on(self.profile) and proactivity.get("proactiveAudio") is False:
            raise ProtocolError("proactive audio is always on for this model; do not set it to false")
        resumption = setup.get("sessionResumption")
        self.resumption = resumption is not None
        handle = (resumption or {}).get("handle")
        self.transparent = bool((resumption or {}).get("transparent"))
        if handle:
            snap = self.server.handles.get(handle)
            if snap is None:
                raise ProtocolError("session resumption handle not found or expired")
            self.conv = self.server.restore(snap)
        else:
            self.conv = self.server.new_conversation()
        self.conv.setup = setup_summary(setup)
        self.server.live[self.conv.id] = self
        self.boundary = (self.conv.end, 0, len(self.conv.texts))
        self.conv.touched = time.monotonic()
        self.state = "live"
        log.info(
            "session live",
            extra={"conn": self.id, "session": self.conv.id, "resumed": bool(handle),
                   "manual": self.detector.manual},
        )
        if self.b.setup_delay_ms:
            await asyncio.sleep(self.b.setup_delay_ms / 1000)
        await self.send({"setupComplete": {"sessionId": self.conv.id}})
        await self._handle_update(self.boundary)
        self._arm_timers()

    async def _handle_update(self, boundary: tuple[int, int, int]) -> None:
        if not self.resumption or self.conv is None:
            return
        handle = self.server.snapshot(self.conv, boundary[0], boundary[2])
        update: dict[str, Any] = {"newHandle": handle, "resumable": True}
        if self.transparent:
            update["lastConsumedClientMessageIndex"] = boundary[1]
        await self.send({"sessionResumptionUpdate": update})

    def _arm_timers(self) -> None:
        b = self.b
        if b.goaway_after_s > 0:
            self.timers.append(asyncio.create_task(self._later(b.goaway_after_s, self.go_away)))
        if b.close_after_s > 0:
            self.timers.append(asyncio.create_task(self._later(b.close_after_s, self.abrupt_close)))
        if self.profile == "3.8":
            limit = b.session_limit_s or PROFILE_38_LIMIT_S
            self.timers.append(asyncio.create_task(self._later(limit, self.session_limit)))
        if b.stop_reading_after_s > 0:
            self.timers.append(
                asyncio.create_task(self._later(b.stop_reading_after_s, self.stop_reading))
            )

    async def _later(self, delay: float, fn: Any) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(ConnectionClosed):
            await fn()

    # --- faults --------------------------------------------------------------------------------
    async def go_away(self, time_left_s: float | None = None) -> None:
        left = self.b.goaway_time_left_s if time_left_s is None else time_left_s
        log.info("goAway", extra={"conn": self.id, "time_left_s": left})
        await self.send({"goAway": {"timeLeft": duration(left)}})
        await asyncio.sleep(left)
        await self.close(1000, "session duration limit reached")

    async def session_limit(self) -> None:
        """What field reports show for 3.8: a hard 1011 close at the limit, and every handle of the
        conversation refused (1007) afterwards."""
        assert self.conv is not None
        self.server.handles = {h: s for h, s in self.server.handles.items()
                               if s.conversation_id != self.conv.id}
        await self.close(1011, "session limit reached")

    async def abrupt_close(self, code: int | None = None) -> None:
        await self.close(self.b.close_code if code is None else code, "injected fault")

    async def stop_reading(self) -> None:
        self.reading.clear()

    async def garbage(self, kind: str = "json") -> None:
        """Send a bad frame: ``json`` (not JSON), ``unknown`` (an unknown message type), ``b64``
        (audio with truncated base64) or ``big`` (a 2 MiB frame, above the SDK's 1 MiB limit)."""
        if kind == "json":
            await self.ws.send(b"\x00\xffthis is not json{")
        elif kind == "unknown":
            await self.send({"someFutureMessage": {"hello": 1}})
        elif kind == "b64":
            await self.send({"serverContent": {"modelTurn": {"parts": [{"inlineData": {
                "mimeType": "audio/pcm;rate=24000", "data": "AAAAA"}}]}}})
        elif kind == "big":
            await self.ws.send(b" " * (2 << 20))
        else:
            raise ValueError("garbage kind must be json, unknown, b64 or big")

    # --- input ---------------------------------------------------------------------------------
    async def _realtime(self, body: dict[str, Any]) -> None:
        chunks: list[dict[str, Any]] = []
        if "audio" in body:
            chunks.append(body["audio"])
        chunks.extend(body.get("mediaChunks") or [])
        for blob in chunks:
            if not isinstance(blob, dict):
                raise ProtocolError("Invalid audio blob")
            rate = pcm_rate(blob.get("mimeType"))
            pcm = decode_b64(blob.get("data"))
            if len(pcm) % 2:
                raise ProtocolError("audio/pcm data must hold whole 16-bit samples")
            assert self.conv is not None
            self.conv.rate = rate
            self.detector.rate = rate
            self.conv.add_audio(pcm, self.server.max_record_bytes)
            self.bytes_in += len(pcm)
            for ev in self.detector.feed(pcm):
                await self._turn_event(ev.kind, ev.utterance)
        if "activityStart" in body:
            if not self.detector.manual:
                raise ProtocolError("activityStart requires automatic activity detection disabled")
            for ev in self.detector.activity_start():
                await self._turn_event(ev.kind, ev.utterance)
        if "activityEnd" in body:
            if not self.detector.manual:
                raise ProtocolError("activityEnd requires automatic activity detection disabled")
            for ev in self.detector.activity_end():
                await self._turn_event(ev.kind, ev.utterance)
        if body.get("audioStreamEnd"):
            for ev in self.detector.stream_end():
                await self._turn_event(ev.kind, ev.utterance)
        text = body.get("text")
        if text is not None and not isinstance(text, str):
            raise ProtocolError("realtimeInput.text must be a string")
        if text:
            assert self.conv is not None
            self.conv.texts.append(text)
            if self.detector.manual and self.detector.speaking:
                self.turn_texts.append(text)  # part of the open activity: answered at its activityEnd
            else:
                self.conv.history.append(f"user: text: {text}")
                self.boundary = (self.conv.end, self.msg_index, len(self.conv.texts))
                await self._start_reply(b"", f"text: {text}", text)

    async def _client_content(self, body: dict[str, Any]) -> None:
        if self.profile == "3.1" and self.turns_done:
            raise ProtocolError("client content is accepted only before the first turn")
        turns = [t for t in body.get("turns") or [] if isinstance(t, dict)]
        texts = [p.get("text", "") for turn in turns for p in (turn.get("parts") or [])
                 if isinstance(p, dict)]
        assert self.conv is not None
        for turn in turns:
            role = "model" if turn.get("role") == "model" else "user"
            self.conv.history.extend(f"{role}: {p['text']}" for p in turn.get("parts") or []
                                     if isinstance(p, dict) and p.get("text"))
        if body.get("turnComplete"):
            self.boundary = (self.conv.end, self.msg_index, len(self.conv.texts))
            await self._start_reply(b"", " ".join(texts))

    def _tool_response(self, body: dict[str, Any]) -> None:
        responses = body.get("functionResponses") or []
        if not isinstance(responses, list):
            raise ProtocolError("toolResponse.functionResponses must be a list")
        assert self.conv is not None
        for r in responses:
            if isinstance(r, dict):
                self.conv.tool_responses.append(r)
                del self.conv.tool_responses[:-MAX_HISTORY]
                name = self.async_calls.pop(str(r.get("id")), None)
                if name is not None:
                    self._async_result(name, r)
            if self.pending_tool and isinstance(r, dict) and r.get("id") == self.pending_tool[0]:
                fut = self.pending_tool[1]
                if not fut.done():
                    fut.set_result(r)

    async def _turn_event(self, kind: str, utterance: bytes) -> None:
        if kind == "start":
            self.turn_texts = []
            await self._barge_in()
            return
        assert self.conv is not None
        self.boundary = (self.conv.end, self.msg_index, len(self.conv.texts))
        self.conv.last_utterance = utterance
        seconds = len(utterance) / 2 / self.conv.rate
        heard = f"heard {seconds:.2f} seconds of audio"
        self.conv.history.append(f"user: <{seconds:.2f} s of audio>")
        text = " | ".join(self.turn_texts)
        if text:
            heard += f" and text: {text}"
            self.conv.history.append(f"user: text: {text}")
            self.turn_texts = []
        await self._start_reply(utterance, heard, text)

    async def _barge_in(self) -> None:
        task = self.reply_task
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task
        if self.pending_tool:
            call_id = self.pending_tool[0]
            self.pending_tool = None
            await self.send({"toolCallCancellation": {"ids": [call_id]}})
        await self.send({"serverContent": {"interrupted": True}})

    async def _start_reply(self, utterance: bytes, heard: str, text: str = "") -> None:
        await self._barge_in()
        self.reply_task = asyncio.create_task(self._reply(utterance, heard, self.boundary, text))

    # --- output --------------------------------------------------------------------------------
    def _reply_audio(self, utterance: bytes) -> bytes:
        assert self.conv is not None
        mode = self.b.reply
        in_seconds = len(utterance) / 2 / self.conv.rate
        if mode == "echo" and utterance:
            x = np.frombuffer(utterance, dtype="<i2")
            return soxr.resample(x, self.conv.rate, OUT_RATE).astype("<i2").tobytes()
        seconds = max(in_seconds, 0.5) if utterance else 1.0
        n = int(seconds * OUT_RATE)
        if mode == "silence":
            return bytes(2 * n)
        t = np.arange(n) / OUT_RATE
        return (0.3 * 32767 * np.sin(2 * math.pi * self.b.tone_hz * t)).astype("<i2").tobytes()

    async def _reply(self, utterance: bytes, heard: str, boundary: tuple[int, int, int],
                     text: str = "") -> None:
        assert self.conv is not None
        try:
            head: list[dict[str, Any]] = []  # messages before the audio (one multipart message on 3.8)
            if self.transcribe_in:
                head.append({"serverContent": {"inputTranscription": {"text": heard, "finished": True}}})
            said = f"{self.b.reply} reply" + (f" to text: {text}" if text else "")
            if self.b.tool_calls and self.functions:
                call_id = f"call-{secrets.token_hex(4)}"
                name = self.functions[0]
                fc = {"id": call_id, "name": name, "args": {"heard": heard}}
                call = {"toolCall": {"functionCalls": [fc]}}
                if name in self.non_blocking:  # the model goes on talking; the result comes when it comes
                    self.async_calls[call_id] = name
                    head.append(call)
                else:
                    for msg in head:
                        await self.send(msg)
                    head = []
                    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                    self.pending_tool = (call_id, fut)
                    await self.send(call)
                    result = await fut
                    self.pending_tool = None
                    said = f"tool {result.get('name')} said {json.dumps(result.get('response'))}"
            if self.b.first_byte_delay_ms:
                for msg in head:
                    await self.send(msg)
                head = []
                await asyncio.sleep(self.b.first_byte_delay_ms / 1000)
            await self._answer(self._reply_audio(utterance), said, len(utterance), boundary, head)
            await self._idle()
        except ConnectionClosed:
            pass

    async def _answer(self, audio: bytes, said: str, heard_bytes: int, boundary: tuple[int, int, int],
                      head: list[dict[str, Any]]) -> None:
        """One model turn: audio paced in chunks, its transcription, turnComplete with usage, a handle.
        Generic profile: one message per thing, ``head`` first. 3.8 sends several parts per message:
        ``head`` (input transcription, a NON_BLOCKING tool call) rides on the first audio message, two
        audio chunks per message, the output transcription on the last audio message, generation and
        turn complete together with the usage."""
        assert self.conv is not None
        multipart = self.profile == "3.8"
        if not multipart:
            for first in head:
                await self.send(first)
            head = []
        step = OUT_RATE * self.b.chunk_ms // 1000 * 2
        chunks = [audio[off : off + step] for off in range(0, len(audio), step)]
        per_msg = 2 if multipart else 1
        groups = [chunks[i : i + per_msg] for i in range(0, len(chunks), per_msg)]
        out_t = {"outputTranscription": {"text": said, "finished": True}} if self.transcribe_out else {}
        t0 = time.monotonic()
        sent = 0
        for i, group in enumerate(groups):
            msg: dict[str, Any] = {"serverContent": {"modelTurn": {"parts": [
                {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": base64.b64encode(c).decode()}}
                for c in group]}}}
            if multipart and i == 0:
                msg = _merge(msg, *head)
                head = []
            if multipart and i == len(groups) - 1 and out_t:
                msg["serverContent"].update(out_t)
                out_t = {}
            await self.send(msg)
            sent += len(group)
            if self.b.pacing == "realtime":
                delay = t0 + sent * self.b.chunk_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
        for rest in head:  # no audio at all (multipart): still deliver what rode on it
            await self.send(rest)
        prompt = math.ceil(heard_bytes / 2 / self.conv.rate * TOKENS_PER_SECOND) + 1
        response = math.ceil(len(audio) / 2 / OUT_RATE * TOKENS_PER_SECOND)
        usage = {"usageMetadata": {
            "promptTokenCount": prompt, "responseTokenCount": response, "totalTokenCount": prompt + response,
            "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": prompt}],
            "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": response}]}}
        if multipart:
            await self.send({"serverContent": {**out_t, "generationComplete": True, "turnComplete": True},
                             **usage})
        else:
            if out_t:
                await self.send({"serverContent": out_t})
            await self.send({"serverContent": {"generationComplete": True}})
            await self.send({"serverContent": {"turnComplete": True}, **usage})
        self.conv.history.append(f"model: {said}")
        self.turns_done += 1
        del self.conv.history[:-MAX_HISTORY]
        await self._handle_update(boundary)

    # --- NON_BLOCKING tool results (FunctionResponse.scheduling) --------------------------------
    def _async_result(self, name: str, r: dict[str, Any]) -> None:
        """A NON_BLOCKING call's response: into the context always; SILENT says nothing, WHEN_IDLE
        speaks it after the current answer (at once when idle), INTERRUPT cuts the current answer
        (``interrupted``) and speaks it now."""
        assert self.conv is not None
        scheduling = str(r.get("scheduling") or "WHEN_IDLE").upper()
        said = f"tool {name} said {json.dumps(r.get('response'))}"
        self.conv.history.append(f"tool: {said}")
        if scheduling == "SILENT":
            return
        busy = self.reply_task is not None and not self.reply_task.done()
        if scheduling == "WHEN_IDLE" and busy:
            self.when_idle.append(said)
            return
        self.timers.append(asyncio.create_task(self._speak_result(said, cut=busy)))

    async def _speak_result(self, said: str, *, cut: bool) -> None:
        with contextlib.suppress(ConnectionClosed):
            if cut:
                await self._barge_in()
            self.when_idle.insert(0, said)
            self.reply_task = asyncio.create_task(self._idle())

    async def _idle(self) -> None:
        """The model is idle: speak the WHEN_IDLE results that waited (each a model turn of its own)."""
        try:
            while self.when_idle:
                said = self.when_idle.pop(0)
                await self._answer(self._reply_audio(b""), said, 0, self.boundary, [])
        except ConnectionClosed:
            pass

    def info(self) -> dict[str, Any]:
        return {
            "connection": self.id,
            "state": self.state,
            "platform": self.platform,
            "model": self.model,
            "manual": self.detector.manual,
            "bytes_received": self.bytes_in,
            "messages_received": self.msg_index + 1,
            "reading": self.reading.is_set(),
            "replying": bool(self.reply_task and not self.reply_task.done()),
        }


class EmulatorServer:
    """Owns the listener, conversations, handles, run-wide behaviour and the control channel."""

    def __init__(self, api_key: str, behaviour: Behaviour | None = None, *, max_frame_bytes: int = 4 << 20,
                 control: bool = True, max_record_seconds: float = 60.0,
                 handle_ttl_s: float = 7200.0, platforms: tuple[str, ...] = ("developer", "vertex"),
                 vertex_keys: list[bytes] | None = None) -> None:
        self.api_key = api_key
        self.platforms = platforms
        self.issuer = TokenIssuer(list(vertex_keys or ()))
        self.max_record_bytes = int(max_record_seconds * 16000 * 2)
        self.handle_ttl_s = handle_ttl_s
        self._janitor: asyncio.Task[None] | None = None
        self.behaviour = behaviour or Behaviour()
        self.next_behaviour: Behaviour | None = None
        self.max_frame_bytes = max_frame_bytes
        self.control = control
        self.conversations: dict[str, Conversation] = {}
        self.handles: dict[str, Snapshot] = {}
        self.live: dict[str, Connection] = {}
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self.stats = {"connections": 0, "refused": 0, "rejected_key": 0}

    # --- conversations -------------------------------------------------------------------------
    def new_conversation(self) -> Conversation:
        conv = Conversation(id=f"emu-{secrets.token_hex(6)}")
        self.conversations[conv.id] = conv
        return conv

    def snapshot(self, conv: Conversation, record_len: int, texts: int = 0) -> str:
        handle = secrets.token_urlsafe(18)
        self.handles[handle] = Snapshot(conv.id, record_len, tuple(conv.history), conv.last_utterance,
                                        texts)
        return handle

    def restore(self, snap: Snapshot) -> Conversation:
        old = self.conversations.get(snap.conversation_id)
        previous = self.live.pop(snap.conversation_id, None)
        if previous is not None and previous.state != "closed":
            log.info("resumed while the old connection is open", extra={"session": snap.conversation_id})
        base = old.base if old else snap.record_len
        keep = max(0, snap.record_len - base)
        conv = Conversation(
            id=snap.conversation_id,
            record=bytearray(old.record[:keep]) if old else bytearray(),
            base=base if keep or not old else snap.record_len,
            rate=old.rate if old else 16000,
            history=list(snap.history),
            last_utterance=snap.last_utterance,
            texts=list(old.texts[:snap.texts]) if old else [],
            resumes=(old.resumes + 1) if old else 1,
        )
        self.conversations[conv.id] = conv
        return conv

    # --- HTTP side ---------------------------------------------------------------------------
    def _key_ok(self, request: Request) -> bool:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        given = request.headers.get("x-goog-api-key") or (query.get("key") or [""])[0]
        return secrets.compare_digest(given.encode(), self.api_key.encode())

    def _platform(self, request: Request) -> str:
        path = urllib.parse.urlsplit(request.path).path
        return "vertex" if vertex_version(path) is not None else "developer"

    def _auth_ok(self, request: Request) -> bool:
        """Developer API: the API key. Vertex: a Bearer token from ``/token``, or the key (express mode)."""
        bearer = request.headers.get("Authorization", "")
        if self._platform(request) == "vertex" and self.issuer.bearer_ok(bearer):
            return True
        return self._key_ok(request)

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urllib.parse.urlsplit(request.path).path
        if path.startswith("/emulator/") and self.control:
            return self._control(request, path)
        vertex = vertex_version(path)
        if vertex is not None and "vertex" in self.platforms:
            if vertex not in VERTEX_VERSIONS:
                return conn.respond(http.HTTPStatus.NOT_FOUND, f"{vertex} has no Vertex Live API\n")
        elif (not (path.startswith(PATH_PREFIX) and path.endswith(PATH_SUFFIX))
              or "developer" not in self.platforms):
            return conn.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        elif (version := path[len(PATH_PREFIX) : -len(PATH_SUFFIX)]) not in API_VERSIONS:
            return conn.respond(http.HTTPStatus.NOT_FOUND, f"API version {version} has no Live API\n")
        b = self.next_behaviour or self.behaviour
        if b.refuse:
            if b is self.next_behaviour:
                self.next_behaviour = None
            self.stats["refused"] += 1
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "The service is unavailable.\n")
        return None

    def _control(self, request: Request, path: str) -> Response:
        if not self._key_ok(request):
            return _json_response(403, {"error": "bad API key"})
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query).items()}
        q.pop("key", None)
        name = path[len("/emulator/") :]
        try:
            if name == "health":
                return _json_response(200, {"ok": True, "live": len(self.live), **self.stats,
                                            "tokens_issued": self.issuer.issued,
                                            "tokens_refused": self.issuer.refused})
            if name == "sessions":
                return _json_response(200, {"sessions": self.sessions_info()})
            if name == "audio":
                conv = self.conversations.get(q.get("session", ""))
                if conv is None:
                    return _json_response(404, {"error": "unknown session"})
                return Response(200, "OK", Headers([("Content-Type", "application/octet-stream"),
                                                    ("X-Sample-Rate", str(conv.rate)),
                                                    ("X-Record-Base", str(conv.base)),
                                                    ("Content-Length", str(len(conv.record)))]),
                                bytes(conv.record))
            if name == "config":
                self.behaviour = _coerce_behaviour(self.behaviour, q)
                return _json_response(200, asdict(self.behaviour))
            if name == "next":
                self.next_behaviour = _coerce_behaviour(self.behaviour, q)
                return _json_response(200, asdict(self.next_behaviour))
            if name == "fault":
                return self._fault(q)
        except (ValueError, TypeError) as exc:
            return _json_response(400, {"error": str(exc)})
        return _json_response(404, {"error": f"unknown control endpoint {name!r}"})

    def _fault(self, q: dict[str, str]) -> Response:
        conn = self.live.get(q.pop("session", ""))
        if conn is None or conn.state == "closed":
            return _json_response(404, {"error": "no live connection for that session"})
        action = q.pop("action", "")
        loop = asyncio.get_running_loop()
        if action == "close":
            coro = conn.abrupt_close(int(q.get("code", conn.b.close_code)))
        elif action == "goaway":
            coro = conn.go_away(float(q.get("time_left_s", conn.b.goaway_time_left_s)))
        elif action == "stop_reading":
            coro = conn.stop_reading()
        elif action == "resume_reading":
            conn.reading.set()
            return _json_response(200, {"ok": True})
        elif action == "garbage":
            kind = q.get("kind", "json")
            if kind not in ("json", "unknown", "b64", "big"):
                raise ValueError("garbage kind must be json, unknown, b64 or big")
            coro = conn.garbage(kind)
        elif action == "set":
            conn.b = _coerce_behaviour(conn.b, q)
            return _json_response(200, asdict(conn.b))
        else:
            raise ValueError("action must be close, goaway, stop_reading, resume_reading, garbage or set")
        task = loop.create_task(conn._later(0, lambda: coro))
        conn.timers.append(task)
        return _json_response(200, {"ok": True, "action": action})

    def sessions_info(self) -> list[dict[str, Any]]:
        out = []
        for conv in self.conversations.values():
            live = self.live.get(conv.id)
            out.append({
                "session": conv.id,
                "audio_bytes": len(conv.record),
                "rate": conv.rate,
                "history": conv.history,
                "texts": conv.texts,
                "tool_responses": conv.tool_responses,
                "setup": conv.setup,
                "resumes": conv.resumes,
                "live": live.info() if live and live.state != "closed" else None,
            })
        return out

    # --- WebSocket side ----------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        behaviour = self.next_behaviour or self.behaviour
        self.next_behaviour = None
        conn = Connection(self, ws, replace(behaviour), next(self._ids))
        self.connections[conn.id] = conn
        self.stats["connections"] += 1
        key_ok = self._auth_ok(ws.request) if ws.request else False
        if ws.request:
            conn.platform = self._platform(ws.request)
        if not key_ok:
            self.stats["rejected_key"] += 1
        try:
            await conn.run(key_ok)
        except Exception:  # a bug in one connection must never take the server down
            log.exception("connection failed", extra={"conn": conn.id})
            with contextlib.suppress(Exception):
                await conn.close(1011, "internal error")
        finally:
            self.connections.pop(conn.id, None)
            if conn.conv:
                conn.conv.touched = time.monotonic()
                if self.live.get(conn.conv.id) is conn:
                    del self.live[conn.conv.id]

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        self._server = await serve(
            self._handler,
            host,
            port,
            ssl=ssl_context,
            process_request=self._process_request,
            max_size=self.max_frame_bytes,
            compression=None,
            ping_interval=None,
            server_header="voice-appliance-emulator",
            create_connection=connection_class(self.issuer),
        )
        self._janitor = asyncio.create_task(self._expire_loop())
        return int(self._server.sockets[0].getsockname()[1])

    def expire(self, now: float | None = None) -> int:
        """Forget conversations idle (no live connection) longer than the handle TTL, and their handles."""
        now = time.monotonic() if now is None else now
        gone = {cid for cid, c in self.conversations.items()
                if cid not in self.live and now - c.touched > self.handle_ttl_s}
        for cid in gone:
            del self.conversations[cid]
        for h in [h for h, snap in self.handles.items()
                  if snap.conversation_id in gone or now - snap.created > self.handle_ttl_s]:
            del self.handles[h]
        return len(gone)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.handle_ttl_s / 4))
            self.expire()

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _merge(msg: dict[str, Any], *more: dict[str, Any]) -> dict[str, Any]:
    """One server message with the fields of ``more`` (``serverContent`` merged key by key)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in msg.items()}
    for m in more:
        for k, v in m.items():
            if k == "serverContent" and k in out:
                out[k].update(v)
            else:
                out[k] = v
    return out


def _json_response(status: int, body: Any) -> Response:
    data = json.dumps(body).encode()
    reason = http.HTTPStatus(status).phrase
    return Response(status, reason, Headers([("Content-Type", "application/json"),
                                             ("Content-Length", str(len(data)))]), data)


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
