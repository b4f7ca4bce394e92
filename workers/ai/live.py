"""The AI worker's Gemini Live session layer: one session per call, many per process, on one asyncio loop.

Why a layer over the SDK: google-genai does no reconnection (any close raises from ``receive()``), drops
audio sent after the last resumption handle, and costs ~44 µs to send and ~62 µs to parse each message
(FACTS). This layer keeps the SDK for what it is good at — URL, headers, auth and the ``setup`` message —
and owns the rest:

- **Outgoing log.** ``send_audio`` (non-blocking) cuts ``chunk_ms`` chunks into a log of items (audio,
  activityStart, activityEnd) with sequence numbers; one sender task writes them in order. The log is
  trimmed only when a resumption handle proves the server's state covers them, so a reconnect replays
  everything after the handle's point — no lost words.
- **Which point a handle covers.** The Gemini Developer API has no ``transparent`` resumption (the SDK
  refuses it), so a handle carries no message index. With manual activity detection (how the appliance
  runs) each caller activity gets exactly one outcome from the model — ``turnComplete`` or
  ``interrupted`` — in order; a handle that arrives after a ``turnComplete`` covers the conversation up to
  the end of the activity that turn answered. The emulator implements exactly these semantics and keeps a
  record of the caller audio it holds, which is how tests prove the replay is gap- and duplicate-free.
  With automatic detection the layer can only assume a handle covers what was sent before it arrived.
- **Reconnect policy.** ``goAway`` → proactive replacement: close the old socket first, resume with the
  latest handle, replay. Unexpected close → bounded retries with exponential backoff and jitter
  (tenacity), same replay. A resume whose handle the server no longer knows (close 1007) → a fresh
  session (conversation context is lost; unanswered input is still replayed). Wrong API key (1008) is not
  retried. Exhausted → state ``degraded`` (the worker tells the caller and re-opens later). Nothing here
  raises into the worker's loop except ``start()``.
- **Tool calls.** While a ``toolCall`` of the current connection is unanswered the model's silence is
  ours, so the "stopped answering" watchdog waits (a slow tool is not a stalled server); an answer
  restarts its clock. ``send_tool_response`` only answers open calls of the current connection.
- **Realtime text** (``send_text``, the worker's keypad entries) is a log item like audio: replayed after
  a reconnect, byte-identical to the SDK's ``send_realtime_input(text=…)``.
- **Fast path** (``fast_path=True``, the default): realtime audio is written as hand-built JSON on the
  SDK's websocket and server frames are parsed by hand — byte-identical to what google-genai 3.4.0 sends
  and accepts; ``tests/emulator/test_live_contract.py`` pins that. Numbers in docs/benchmarks.md.
  An unknown server message type is logged and ignored (the SDK's parser would crash on it).

Interface (what the AI worker calls)::

    settings = model_client_settings(cfg)            # (base_url, api_key, ssl_context); remembered
    live = LiveSession(cfg.model, session_id, LiveOptions(voice, language, system_instruction,
                       resume_handle=None), on_event, ssl_context=settings[2])
    await live.start()                               # live, or raises LiveUnavailable (state degraded)
    live.send_audio(pcm16_16k); live.activity_start(); live.activity_end()   # never block, never raise
    live.send_text("…")                               # realtime text, in order with the audio
    live.send_tool_response([{"id": …, "name": …, "response": {…}}])
    await live.close()                               # emits nothing
    live.state, live.resume_handle, live.server_session_id, live.stats

Events (``on_event`` is called synchronously on the loop; it must not block): ``AudioOut(pcm24k)``,
``Interrupted()``, ``TurnComplete()``, ``Transcript(role, text, final)``, ``Usage(prompt_tokens,
response_tokens, total_tokens)``, ``StateChanged(state, reason)``, ``ResumeHandle(handle)``,
``ToolCall(calls)``, ``ToolCallCancellation(ids)``. ``StateChanged("closed", reason)`` means the session
ended on its own (e.g. the server sent a garbage frame); other sessions are unaffected. ``ResumeHandle``
is emitted only for a handle that covers *everything sent so far* (nothing unanswered in the log), so a
journal of audio kept since the last ``ResumeHandle`` can be truncated there exactly; ``resume_handle``
always holds the newest handle (the layer's own reconnects use it together with its log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tenacity
from prometheus_client import Counter, Histogram
from websockets.exceptions import ConnectionClosed

from appliance.config import Config, ModelConfig, secret

log = logging.getLogger("workers.ai.live")

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
IN_RATE = 16000
AUDIO_MIME = "audio/pcm;rate=16000"
WATCHDOG_SECONDS = 1.0  # how often each session checks its connection for a stalled server
STABLE_SECONDS = 30.0  # a connection that lived this long resets the failure count
MAX_LOG_SECONDS = 30.0  # unconfirmed caller audio kept for replay (~1 MB); older audio is dropped, counted

State = Literal["connecting", "live", "reconnecting", "degraded", "closed"]

RECONNECTS = Counter("va_live_reconnects", "Live connections re-opened", ["reason"])
DEGRADED = Counter("va_live_degraded", "Live sessions that exhausted their retries")
REPLAYED = Counter("va_live_replayed_audio_seconds", "Caller audio re-sent after a reconnect")
DROPPED = Counter("va_live_dropped_audio_seconds", "Unconfirmed caller audio dropped (log full)")
BAD_FRAMES = Counter("va_live_bad_server_frames", "Server frames that could not be parsed")
CONNECT_SECONDS = Histogram("va_live_connect_seconds", "Time to connect and set up a Live session",
                            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))


# --- events ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class AudioOut:
    pcm24k: bytes


@dataclass(slots=True)
class Interrupted:
    pass


@dataclass(slots=True)
class TurnComplete:
    pass


@dataclass(slots=True)
class Transcript:
    role: str  # "user" | "model"
    text: str
    final: bool


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    response_tokens: int
    total_tokens: int


@dataclass(slots=True)
class StateChanged:
    state: str
    reason: str = ""


@dataclass(slots=True)
class ResumeHandle:
    handle: str


@dataclass(slots=True)
class ToolCall:
    calls: list[dict[str, Any]]  # [{"id", "name", "args"}]


@dataclass(slots=True)
class ToolCallCancellation:
    ids: list[str]


LiveEvent = (
    AudioOut | Interrupted | TurnComplete | Transcript | Usage | StateChanged | ResumeHandle | ToolCall
    | ToolCallCancellation
)


@dataclass(frozen=True)
class LiveOptions:
    """Per-call options (from the session's control block)."""

    voice: str
    language: str
    system_instruction: str
    resume_handle: str | None = None
    tools: list[dict[str, Any]] | None = None  # function declarations: [{"name", "description", …}]


class LiveUnavailable(ConnectionError):
    """The model could not be reached (retries exhausted) or refused us (e.g. a wrong API key)."""


@dataclass
class LiveStats:
    connects: int = 0
    reconnects: int = 0
    fresh_after_unknown_handle: int = 0
    chunks_sent: int = 0
    messages_received: int = 0
    replayed_items: int = 0
    dropped_bytes: int = 0
    send_delay_max: float = 0.0  # seconds from a chunk being complete to it being written
    send_delay_sum: float = 0.0
    send_delay_count: int = 0


# --- client settings ---------------------------------------------------------------------------------
_DEFAULT_SETTINGS: tuple[str, str, ssl.SSLContext] | None = None
_BREAKER: Any = None  # appliance.breaker.Breaker shared by every call of this worker (install_breaker)


def install_breaker(breaker: Any) -> None:
    """Guard every connect/setup of this process with the model circuit breaker (None: unguarded).
    Each attempt asks it first (open: the call degrades at once, no connection is made) and reports the
    outcome; see appliance/breaker.py and docs/architecture.md "Model circuit breaker"."""
    global _BREAKER
    _BREAKER = breaker


def tls_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The system trust store plus, when given, an extra CA (the emulator's test CA)."""
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise LiveUnavailable(f"model.ca_file {ca_file}: cannot load a CA certificate ({exc})") from None
    return ctx


def emulator_ca_file(cfg: Config) -> Path:
    """Where ``voice-appliance emulator`` keeps its CA for this config (same rule as its CLI)."""
    wanted = Path(cfg.paths.state_dir) / "emulator"
    if wanted.exists() and os.access(wanted, os.W_OK):
        return wanted / "emulator-ca.pem"
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted / "emulator-ca.pem"
    except OSError:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "voice-appliance" / "emulator" / "emulator-ca.pem"


def model_client_settings(cfg: Config) -> tuple[str, str, ssl.SSLContext]:
    """``(base_url, api_key, ssl_context)`` for the configured model: Gemini with an API key, else the
    local emulator trusting its test CA (generated here if the emulator has not run yet). The result is
    remembered as the default for sessions whose ``ModelConfig`` carries no API key."""
    global _DEFAULT_SETTINGS
    m = cfg.model
    key = secret(m.api_key, m.api_key_file)
    if key:
        base = m.base_url or GEMINI_BASE_URL
        ctx = tls_context(m.ca_file or None)
    else:
        e = cfg.emulator
        host = "127.0.0.1" if e.host in ("0.0.0.0", "::", "") else e.host
        shown = f"[{host}]" if ":" in host else host
        base = m.base_url or f"https://{shown}:{e.port}"
        key = e.api_key
        ca = Path(m.ca_file) if m.ca_file else emulator_ca_file(cfg)
        if not ca.exists():
            from appliance.emulator.certs import ensure_certs

            ca = ensure_certs(ca.parent, [host]).ca_file
        ctx = tls_context(ca)
    _DEFAULT_SETTINGS = (base, key, ctx)
    return _DEFAULT_SETTINGS


_CLIENTS: dict[tuple[str, str, str, int], Any] = {}


def _client(base_url: str, api_key: str, api_version: str, ctx: ssl.SSLContext) -> Any:
    """One google-genai Client per (endpoint, key, TLS context), shared by all sessions."""
    k = (base_url, api_key, api_version, id(ctx))
    client = _CLIENTS.get(k)
    if client is None:
        from google import genai
        from google.genai import types

        client = genai.Client(
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=base_url,
                api_version=api_version,
                async_client_args={"ssl": ctx, "compression": None, "proxy": None},
            ),
        )
        _CLIENTS[k] = client
    return client


# --- the log of outgoing items -------------------------------------------------------------------------
AUDIO, START, END, TEXT = 0, 1, 2, 3


@dataclass(slots=True)
class _Item:
    seq: int
    kind: int
    data: bytes
    t: float  # monotonic time the item became sendable


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


class _UnknownHandle(Exception):
    pass


@dataclass
class _Conn:
    stack: contextlib.AsyncExitStack
    session: Any  # google.genai.live.AsyncSession
    ws: Any
    recv_task: asyncio.Task[None] | None = None
    closing: bool = False
    ends: deque[tuple[int, float]] = field(default_factory=deque)  # activityEnds sent: (seq, time)
    opened: float = field(default_factory=time.monotonic)
    last_rx: float = field(default_factory=time.monotonic)


class LiveSession:
    """One call's Live session. See the module docstring for the contract."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        session_id: str,
        options: LiveOptions,
        on_event: Callable[[Any], None],
        *,
        ssl_context: ssl.SSLContext | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        manual_activity: bool = True,
        fast_path: bool = True,
        response_timeout: float = 10.0,
        stall_timeout: float = 10.0,
        max_replay_seconds: float = MAX_LOG_SECONDS,
    ) -> None:
        self.cfg = model_cfg
        self.session_id = session_id
        self.options = options
        self.on_event = on_event
        self.manual = manual_activity
        self.fast_path = fast_path
        self.response_timeout = response_timeout  # no server message this long after an activityEnd
        self.stall_timeout = stall_timeout  # one socket write blocked this long (server not reading)
        self._write_started = 0.0
        key = api_key or secret(model_cfg.api_key, model_cfg.api_key_file)
        if key:
            self.base_url = base_url or model_cfg.base_url or GEMINI_BASE_URL
            self.api_key = key
            ctx = ssl_context or tls_context(model_cfg.ca_file or None)
        elif _DEFAULT_SETTINGS is not None:
            self.base_url, self.api_key, ctx = _DEFAULT_SETTINGS
            self.base_url = base_url or model_cfg.base_url or self.base_url
            ctx = ssl_context or ctx
        else:
            raise LiveUnavailable("no model API key and no emulator settings (call model_client_settings)")
        self.ssl_context = ctx
        self.chunk_bytes = IN_RATE * model_cfg.chunk_ms // 1000 * 2
        self.state: State = "connecting"
        self.resume_handle: str | None = options.resume_handle
        self.server_session_id: str | None = None
        self.stats = LiveStats()
        self._partial = bytearray()
        self._log: deque[_Item] = deque()
        self._seq = 0  # last assigned sequence number
        self._sent = 0  # last sequence number written on the current connection
        self._answered = 0  # sequence number a handle received now would cover
        self._log_bytes = 0
        self._max_log_bytes = int(max_replay_seconds * IN_RATE * 2)
        self._conn: _Conn | None = None
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._replace = asyncio.Event()
        self._replace_reason = ""
        self._closed = False
        self._unstable = 0  # unexpected closes since the model last completed a turn
        self._transcripts: dict[str, list[str]] = {"user": [], "model": []}
        # function calls the model waits on: while any is open its silence is ours, not a stall
        self._tools_open: set[str] = set()
        self._setup_config = self._build_config()

    # --- public API ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and set up; returns when live. Raises :class:`LiveUnavailable` (state ``degraded``)."""
        try:
            await self._connect_with_retries(first=True)
        except LiveUnavailable as exc:
            self._degrade(str(exc))
            raise
        self._sender = asyncio.create_task(self._send_loop(), name=f"live-send-{self.session_id}")
        self._supervisor = asyncio.create_task(self._supervise(), name=f"live-sup-{self.session_id}")

    def send_audio(self, pcm16_16k: bytes) -> None:
        """Queue caller audio (PCM16 LE 16 kHz); sent in ``chunk_ms`` chunks. Never blocks."""
        if self._closed or not pcm16_16k:
            return
        self._partial += pcm16_16k
        cb = self.chunk_bytes
        if len(self._partial) >= cb:
            now = time.monotonic()
            while len(self._partial) >= cb:
                self._append(AUDIO, bytes(self._partial[:cb]), now)
                del self._partial[:cb]
            self._wake.set()

    def activity_start(self) -> None:
        if self._closed:
            return
        self._flush_partial()
        self._append(START, b"", time.monotonic())
        self._wake.set()

    def activity_end(self) -> None:
        if self._closed:
            return
        self._flush_partial()
        self._append(END, b"", time.monotonic())
        self._wake.set()

    def send_text(self, text: str) -> None:
        """Queue realtime text (``realtime_input.text``, e.g. keypad digits) in order with the audio and
        activity marks: with manual activity detection it belongs to the caller turn it is sent in, so the
        owner wraps it in ``activity_start``/``activity_end`` when no turn is open. Never blocks."""
        if self._closed or not text:
            return
        self._flush_partial()
        self._append(TEXT, text.encode(), time.monotonic())
        self._wake.set()

    def send_tool_response(self, responses: list[dict[str, Any]]) -> bool:
        """Answer a :class:`ToolCall` (``[{"id", "name", "response"}]``). False (nothing sent) if not
        connected or if a response's id is not an open call of the current connection (cancelled, or
        made on a connection that is gone: whether a resumed one still expects the answer is not
        documented, and the resumed model asks again when it replays the unanswered turn)."""
        conn = self._conn
        if conn is None or conn.closing or self._closed:
            return False
        ids = [str(r.get("id")) for r in responses]
        if not all(i in self._tools_open for i in ids):
            return False
        self._tools_open.difference_update(ids)
        conn.last_rx = max(conn.last_rx, time.monotonic())  # the model's time to answer starts again
        msg = json.dumps({"tool_response": {"functionResponses": responses}})
        task = asyncio.get_running_loop().create_task(self._send_raw(conn, msg))
        task.add_done_callback(_ignore_result)
        return True

    async def close(self) -> None:
        """Close the session for good. Emits no events (the owner asked for it)."""
        if self._closed:
            return
        self._closed = True
        self.state = "closed"
        for task in (self._supervisor, self._sender):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._close_conn(self._conn)
        self._conn = None

    # --- setup -----------------------------------------------------------------------------------
    def _build_config(self) -> Any:
        from google.genai import types

        o, m = self.options, self.cfg
        kwargs: dict[str, Any] = {
            "response_modalities": ["AUDIO"],
            "speech_config": types.SpeechConfig(
                voice_config=types.VoiceConfig(
                    prebuilt_voice_config=types.PrebuiltVoiceConfig(voice_name=o.voice)
                ),
                language_code=o.language,
            ),
            "system_instruction": o.system_instruction or None,
        }
        if self.manual:
            kwargs["realtime_input_config"] = types.RealtimeInputConfig(
                automatic_activity_detection=types.AutomaticActivityDetection(disabled=True)
            )
        if m.transcription:
            kwargs["input_audio_transcription"] = types.AudioTranscriptionConfig()
            kwargs["output_audio_transcription"] = types.AudioTranscriptionConfig()
        if m.context_compression:
            kwargs["context_window_compression"] = types.ContextWindowCompressionConfig(
                sliding_window=types.SlidingWindow()
            )
        if o.tools:
            kwargs["tools"] = [types.Tool(function_declarations=[types.FunctionDeclaration(**d)
                                                                 for d in o.tools])]
        return kwargs

    async def _open(self, handle: str | None) -> _Conn:
        from google.genai import errors, types

        config = types.LiveConnectConfig(
            **self._setup_config, session_resumption=types.SessionResumptionConfig(handle=handle)
        )
        client = _client(self.base_url, self.api_key, self.cfg.api_version, self.ssl_context)
        stack = contextlib.AsyncExitStack()
        t0 = time.monotonic()
        try:
            session = await stack.enter_async_context(client.aio.live.connect(model=self.cfg.model,
                                                                              config=config))
        except errors.APIError as exc:
            await stack.aclose()
            code = getattr(exc, "code", None)
            if code == 1008:
                raise _Fatal(f"the model rejected the API key (1008): {exc.message or exc}") from None
            if code == 1007 and handle:
                raise _UnknownHandle(str(exc)) from None
            if code == 1007:
                raise _Fatal(f"the model rejected the setup (1007): {exc.message or exc}") from None
            raise _Retryable(f"setup failed ({code}): {exc.message or exc}") from None
        except (OSError, ConnectionClosed, TimeoutError, ValueError) as exc:
            await stack.aclose()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise _Fatal(f"TLS verification failed for {self.base_url}: {exc}") from None
            raise _Retryable(f"cannot connect to {self.base_url}: {exc}") from None
        except Exception as exc:  # the websockets handshake (InvalidStatus 503 …) and the like
            await stack.aclose()
            raise _Retryable(f"cannot connect to {self.base_url}: {exc}") from None
        except asyncio.CancelledError:  # the owner gave up (call ended): do not leak the socket
            with contextlib.suppress(Exception):
                await asyncio.shield(stack.aclose())
            raise
        CONNECT_SECONDS.observe(time.monotonic() - t0)
        self.server_session_id = session.session_id or self.server_session_id
        return _Conn(stack=stack, session=session, ws=session._ws)

    async def _connect_with_retries(self, *, first: bool) -> None:
        """Open a connection (resuming when we hold a handle), replay, and go live."""
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(max(1, self.cfg.max_retries)),
            wait=tenacity.wait_exponential_jitter(initial=self.cfg.retry_base_seconds,
                                                  max=self.cfg.retry_max_seconds),
            retry=tenacity.retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if self._closed:
                        return
                    probe = await self._breaker_allow()
                    try:
                        try:
                            conn = await self._open(self.resume_handle)
                        except _UnknownHandle as exc:
                            log.warning("resumption handle unknown to the server; starting a fresh session",
                                        extra={"session": self.session_id, "error": str(exc)})
                            self.stats.fresh_after_unknown_handle += 1
                            self.resume_handle = None
                            conn = await self._open(None)
                    except _Retryable:
                        await self._breaker_record(False, probe)
                        raise
                    await self._breaker_record(True, probe)
        except _Fatal as exc:
            raise LiveUnavailable(str(exc)) from None
        except _Retryable as exc:
            raise LiveUnavailable(f"gave up after {self.cfg.max_retries} attempts: {exc}") from None
        if self._closed:
            await self._close_conn(conn)
            return
        self._go_live(conn)

    async def _breaker_allow(self) -> str:
        """Ask the breaker before a connection attempt; open → :class:`_Fatal` (degrade now, no retry)."""
        if _BREAKER is None:
            return ""
        from appliance.breaker import Decision

        decision, probe_id = await _BREAKER.allow()
        if decision is Decision.DENY:
            raise _Fatal("model circuit breaker open: not connecting")
        return probe_id if decision is Decision.PROBE else ""

    @staticmethod
    async def _breaker_record(ok: bool, probe_id: str) -> None:
        if _BREAKER is not None:
            try:
                await _BREAKER.record(ok, probe_id)
            except Exception:  # the breaker must never break a call
                log.exception("model breaker update failed")

    def _go_live(self, conn: _Conn) -> None:
        self._tools_open.clear()  # calls of the old connection are not this one's to answer
        replay = [it for it in self._log if it.seq > self._answered]
        self._sent = self._answered  # the sender (re)sends everything after the handle's point
        if replay:
            self.stats.replayed_items += len(replay)
            REPLAYED.inc(sum(len(it.data) for it in replay) / (2 * IN_RATE))
        self._conn = conn
        conn.recv_task = asyncio.create_task(self._recv_loop(conn), name=f"live-recv-{self.session_id}")
        self.stats.connects += 1
        self._set_state("live", "connected")
        self._wake.set()

    # --- supervision: goAway and unexpected closes -----------------------------------------------
    async def _supervise(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._replace.wait(), WATCHDOG_SECONDS)
            except TimeoutError:
                self._watchdog()
                continue
            self._replace.clear()
            if self._closed:
                return
            reason = self._replace_reason
            old, self._conn = self._conn, None
            self._set_state("reconnecting", reason)
            RECONNECTS.labels(reason="goaway" if reason == "goAway" else "closed").inc()
            self.stats.reconnects += 1
            if old is not None and time.monotonic() - old.opened > STABLE_SECONDS:
                self._unstable = 0
            if reason != "goAway":
                self._unstable += 1
            # close the old socket first, then resume; a stalled server gets no close handshake
            await self._close_conn(old, abort=reason.startswith("server stopped"))
            if self._unstable > max(1, self.cfg.max_retries):
                self._degrade(f"connection keeps failing: {reason}")
                return
            try:
                await self._connect_with_retries(first=False)
            except LiveUnavailable as exc:
                self._degrade(str(exc))
                return

    def _watchdog(self) -> None:
        """A server that stopped reading or answering gets the same treatment as a dropped connection."""
        conn = self._conn
        if conn is None or conn.closing:
            return
        now = time.monotonic()
        if self._write_started and now - self._write_started > self.stall_timeout:
            log.warning("server stopped reading", extra={"session": self.session_id})
            self._request_replace(conn, "server stopped reading")
        elif (conn.ends and not self._tools_open
              and now - max(conn.ends[0][1], conn.last_rx) > self.response_timeout):
            log.warning("server stopped answering", extra={"session": self.session_id})
            self._request_replace(conn, "server stopped answering")

    def _request_replace(self, conn: _Conn, reason: str) -> None:
        if conn is not self._conn or conn.closing or self._closed:
            return
        conn.closing = True
        self._replace_reason = reason
        self._replace.set()

    def _degrade(self, reason: str) -> None:
        DEGRADED.inc()
        log.warning("Live session degraded", extra={"session": self.session_id, "reason": reason})
        self._set_state("degraded", reason)

    def _end(self, conn: _Conn, reason: str) -> None:
        """The session ends on its own (bad server data): no reconnect, tell the owner."""
        if conn is not self._conn or self._closed:
            return
        log.warning("Live session ended", extra={"session": self.session_id, "reason": reason})
        self._closed = True
        conn.closing = True
        self._set_state("closed", reason)
        for task in (self._supervisor, self._sender):
            if task is not None and not task.done():
                task.cancel()
        asyncio.get_running_loop().create_task(self._close_conn(conn)).add_done_callback(_ignore_result)
        self._conn = None

    async def _close_conn(self, conn: _Conn | None, *, abort: bool = False) -> None:
        if conn is None:
            return
        conn.closing = True
        if abort:
            with contextlib.suppress(Exception):
                conn.ws.transport.abort()
        if conn.recv_task is not None and conn.recv_task is not asyncio.current_task():
            conn.recv_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await conn.recv_task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.ws.close(), 2.0)
        with contextlib.suppress(Exception):
            await conn.stack.aclose()

    def _set_state(self, state: State, reason: str) -> None:
        if self.state == state and state != "live":
            return
        self.state = state
        self._emit(StateChanged(state, reason))

    def _emit(self, ev: Any) -> None:
        try:
            self.on_event(ev)
        except Exception:
            log.exception("Live event handler failed", extra={"session": self.session_id})

    # --- sending ---------------------------------------------------------------------------------
    def _append(self, kind: int, data: bytes, now: float) -> None:
        self._seq += 1
        self._log.append(_Item(self._seq, kind, data, now))
        self._log_bytes += len(data)
        while self._log_bytes > self._max_log_bytes and self._log:
            old = self._log.popleft()
            self._log_bytes -= len(old.data)
            self.stats.dropped_bytes += len(old.data)
            DROPPED.inc(len(old.data) / (2 * IN_RATE))
            self._answered = max(self._answered, old.seq)

    def _flush_partial(self) -> None:
        if self._partial:
            self._append(AUDIO, bytes(self._partial), time.monotonic())
            self._partial.clear()

    def _encode(self, item: _Item) -> str:
        if item.kind == AUDIO:
            b64 = base64.urlsafe_b64encode(item.data).decode("ascii")
            return '{"realtime_input": {"audio": {"data": "' + b64 + '", "mime_type": "' + AUDIO_MIME + '"}}}'
        if item.kind == START:
            return '{"realtime_input": {"activityStart": {}}}'
        if item.kind == TEXT:
            return json.dumps({"realtime_input": {"text": item.data.decode()}})
        return '{"realtime_input": {"activityEnd": {}}}'

    async def _write(self, conn: _Conn, item: _Item) -> None:
        if self.fast_path:
            await conn.ws.send(self._encode(item))
            return
        from google.genai import types

        s = conn.session
        if item.kind == AUDIO:
            await s.send_realtime_input(audio=types.Blob(data=item.data, mime_type=AUDIO_MIME))
        elif item.kind == START:
            await s.send_realtime_input(activity_start=types.ActivityStart())
        elif item.kind == TEXT:
            await s.send_realtime_input(text=item.data.decode())
        else:
            await s.send_realtime_input(activity_end=types.ActivityEnd())

    async def _send_raw(self, conn: _Conn, msg: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(msg)

    async def _send_loop(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            conn = self._conn
            while conn is not None and conn is self._conn and not conn.closing and self._log:
                idx = self._sent - self._log[0].seq + 1
                if idx >= len(self._log):
                    break
                item = self._log[max(idx, 0)]
                self._write_started = time.monotonic()
                try:
                    await self._write(conn, item)
                except ConnectionClosed:
                    break  # the receive loop sees the close and asks for a replacement
                except Exception as exc:
                    log.warning("send failed", extra={"session": self.session_id, "error": str(exc)})
                    self._request_replace(conn, f"send failed: {exc}")
                    break
                finally:
                    self._write_started = 0.0
                if conn is not self._conn:
                    break
                self._sent = item.seq
                if item.kind == END:
                    conn.ends.append((item.seq, time.monotonic()))
                elif item.kind == AUDIO:
                    self.stats.chunks_sent += 1
                    delay = time.monotonic() - item.t
                    self.stats.send_delay_sum += delay
                    self.stats.send_delay_count += 1
                    if delay > self.stats.send_delay_max:
                        self.stats.send_delay_max = delay

    # --- receiving -------------------------------------------------------------------------------
    async def _recv_loop(self, conn: _Conn) -> None:
        try:
            while True:
                raw = await conn.ws.recv(decode=False)
                conn.last_rx = time.monotonic()
                self.stats.messages_received += 1
                try:
                    if self.fast_path:
                        self._dispatch(conn, json.loads(raw))
                    else:
                        self._dispatch_sdk(conn, raw)
                except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
                    BAD_FRAMES.inc()
                    self._end(conn, f"unparseable server frame: {exc!s:.200}")
                    return
        except ConnectionClosed as exc:
            if conn.closing or conn is not self._conn:
                return
            rcvd = exc.rcvd
            code = rcvd.code if rcvd else 1006
            reason = rcvd.reason if rcvd else "connection lost"
            if code == 1008:
                self._end_degraded(conn, f"the model closed the session (1008): {reason}")
                return
            log.info("Live connection closed", extra={"session": self.session_id, "code": code,
                                                      "reason": reason})
            if code in (1011, 1013):  # the server failed (internal error / try again later): counts
                await self._breaker_record(False, "")
            self._request_replace(conn, f"closed {code} {reason}".strip())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._request_replace(conn, f"receive failed: {exc}")

    def _end_degraded(self, conn: _Conn, reason: str) -> None:
        conn.closing = True
        self._conn = None
        self._degrade(reason)

    def _dispatch(self, conn: _Conn, msg: dict[str, Any]) -> None:
        """Hand parsing of one server message (camelCase, as the service sends)."""
        if not isinstance(msg, dict):
            raise ValueError("server frame is not a JSON object")
        sc = msg.get("serverContent")
        if sc is not None:
            turn = sc.get("modelTurn")
            if turn:
                for part in turn.get("parts") or ():
                    inline = part.get("inlineData")
                    if inline and inline.get("data"):
                        self._emit(AudioOut(base64.b64decode(inline["data"])))
                    elif part.get("text"):
                        self._emit(Transcript("model", part["text"], False))
            it = sc.get("inputTranscription")
            if it:
                self._transcript("user", it.get("text") or "", bool(it.get("finished")))
            ot = sc.get("outputTranscription")
            if ot:
                self._transcript("model", ot.get("text") or "", bool(ot.get("finished")))
            if sc.get("interrupted"):
                self._outcome(conn, answered=False)
                self._emit(Interrupted())
            if sc.get("turnComplete"):
                self._unstable = 0
                self._outcome(conn, answered=True)
                self._flush_transcripts()
                self._emit(TurnComplete())
        um = msg.get("usageMetadata")
        if um:
            p, r = int(um.get("promptTokenCount") or 0), int(um.get("responseTokenCount") or 0)
            self._emit(Usage(p, r, int(um.get("totalTokenCount") or p + r)))
        tc = msg.get("toolCall")
        if tc:
            calls = [{"id": c.get("id"), "name": c.get("name"), "args": c.get("args") or {}}
                     for c in tc.get("functionCalls") or ()]
            self._tools_open.update(str(c["id"]) for c in calls)
            self._emit(ToolCall(calls))
        tcc = msg.get("toolCallCancellation")
        if tcc:
            self._tools_open.difference_update(str(i) for i in tcc.get("ids") or ())
            self._emit(ToolCallCancellation(list(tcc.get("ids") or ())))
        sru = msg.get("sessionResumptionUpdate")
        if sru:
            self._handle(sru.get("newHandle"), bool(sru.get("resumable")))
        if "goAway" in msg:
            log.info("goAway", extra={"session": self.session_id, "time_left": msg["goAway"].get("timeLeft")})
            self._request_replace(conn, "goAway")
        if "setupComplete" in msg:
            return
        known = {"serverContent", "usageMetadata", "toolCall", "toolCallCancellation",
                 "sessionResumptionUpdate", "goAway", "setupComplete", "voiceActivityDetectionSignal",
                 "voiceActivity"}
        unknown = set(msg) - known
        if unknown:
            log.info("ignoring unknown server message", extra={"session": self.session_id,
                                                                "keys": sorted(unknown)})

    def _dispatch_sdk(self, conn: _Conn, raw: bytes) -> None:
        """The same, through the SDK's converters and pydantic models (``fast_path=False``)."""
        from google.genai import _live_converters, types

        resp = json.loads(raw)
        msg = types.LiveServerMessage._from_response(
            response=_live_converters._LiveServerMessage_from_mldev(resp), kwargs={}
        )
        sc = msg.server_content
        if sc is not None:
            if sc.model_turn and sc.model_turn.parts:
                for part in sc.model_turn.parts:
                    if part.inline_data and part.inline_data.data:
                        self._emit(AudioOut(part.inline_data.data))
            if sc.input_transcription:
                self._transcript("user", sc.input_transcription.text or "",
                                 bool(sc.input_transcription.finished))
            if sc.output_transcription:
                self._transcript("model", sc.output_transcription.text or "",
                                 bool(sc.output_transcription.finished))
            if sc.interrupted:
                self._outcome(conn, answered=False)
                self._emit(Interrupted())
            if sc.turn_complete:
                self._unstable = 0
                self._outcome(conn, answered=True)
                self._flush_transcripts()
                self._emit(TurnComplete())
        if msg.usage_metadata:
            um = msg.usage_metadata
            p, r = um.prompt_token_count or 0, um.response_token_count or 0
            self._emit(Usage(p, r, um.total_token_count or p + r))
        if msg.tool_call:
            calls = [{"id": c.id, "name": c.name, "args": c.args or {}}
                     for c in msg.tool_call.function_calls or ()]
            self._tools_open.update(str(c["id"]) for c in calls)
            self._emit(ToolCall(calls))
        if msg.tool_call_cancellation:
            self._tools_open.difference_update(str(i) for i in msg.tool_call_cancellation.ids or ())
            self._emit(ToolCallCancellation(list(msg.tool_call_cancellation.ids or ())))
        if msg.session_resumption_update:
            u = msg.session_resumption_update
            self._handle(u.new_handle, bool(u.resumable))
        if msg.go_away is not None:
            self._request_replace(conn, "goAway")

    def _outcome(self, conn: _Conn, *, answered: bool) -> None:
        """A model turn finished (or was interrupted): it resolves the oldest unanswered activity."""
        if conn.ends:
            seq, _ = conn.ends.popleft()
            if answered:
                self._answered = max(self._answered, seq)

    def _handle(self, handle: str | None, resumable: bool) -> None:
        if not handle or not resumable:
            return
        if not self.manual:  # no activity marks: assume the handle covers everything sent so far
            self._answered = max(self._answered, self._sent)
        self.resume_handle = handle
        while self._log and self._log[0].seq <= self._answered:
            old = self._log.popleft()
            self._log_bytes -= len(old.data)
        if not self._log and not self._partial:
            # only a handle that covers everything sent so far is announced, so an owner that journals
            # audio since the last ResumeHandle can truncate its journal at exactly the handle's point
            self._emit(ResumeHandle(handle))

    def _transcript(self, role: str, text: str, finished: bool) -> None:
        parts = self._transcripts[role]
        if text:
            parts.append(text)
        if finished:
            if parts:
                self._emit(Transcript(role, "".join(parts), True))
                parts.clear()
        elif text:
            self._emit(Transcript(role, text, False))

    def _flush_transcripts(self) -> None:
        for role, parts in self._transcripts.items():
            if parts:
                self._emit(Transcript(role, "".join(parts), True))
                parts.clear()


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
