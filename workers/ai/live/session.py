"""One call's Gemini Live session: connect, resume, watchdog, send, receive. Many per process, one loop.

Why a layer over the SDK: google-genai does no reconnection (any close raises from ``receive()``), drops
audio sent after the last resumption handle, and costs ~44 µs to send and ~62 µs to parse each message
(FACTS). The SDK keeps what it is good at — URL, headers, auth and the ``setup`` message; this layer owns
the rest: the call's :class:`~workers.ai.live.outbox.Outbox` is what it sends (one sender task, in
order, through :mod:`~workers.ai.live.wire`), and the reconnect policy (goAway → replace, unexpected
close → bounded retries with backoff, unknown handle → fresh session, 1008 → no retry, exhausted →
``degraded``) and the watchdog (server not reading / not answering; a pending tool call is our silence,
not the server's) are in docs/architecture.md, "Live sessions". Nothing here raises into the worker's
loop except ``start()``; events: :mod:`workers.ai.live.events`.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import tenacity
from prometheus_client import Counter
from websockets.exceptions import ConnectionClosed

from appliance import tracing
from appliance.config import ModelConfig
from shm.audio import UP_BYTES_PER_MS, UP_BYTES_PER_SECOND
from workers.ai.live import guard
from workers.ai.live.client import (
    Conn,
    Fatal,
    Retryable,
    UnknownHandle,
    close_connection,
    live_config,
    open_connection,
)
from workers.ai.live.events import (
    AudioOut,
    Interrupted,
    LiveEvent,
    ResumeHandle,
    State,
    StateChanged,
    ToolCall,
    ToolCallCancellation,
    Transcript,
    Transcripts,
    TurnComplete,
)
from workers.ai.live.outbox import MAX_REPLAY_SECONDS, Item, Kind, Outbox
from workers.ai.live.settings import ClientSettings, LiveOptions, LiveUnavailable
from workers.ai.live.tooling import tool_plan
from workers.ai.live.wire import Inbound, encode_client_content, encode_tool_response, wire

log = logging.getLogger("workers.ai.live")

WATCHDOG_SECONDS = 1.0  # how often each session checks its connection for a stalled server
STABLE_SECONDS = 30.0  # a connection that lived this long resets the failure count
MAX_SEED_TURNS = 40  # final transcripts kept to seed a fresh session (~20 exchanges)

RECONNECTS = Counter("va_live_reconnects", "Live connections re-opened", ["reason"])
DEGRADED = Counter("va_live_degraded", "Live sessions that exhausted their retries")
REPLAYED = Counter("va_live_replayed_audio_seconds", "Caller audio re-sent after a reconnect")
BAD_FRAMES = Counter("va_live_bad_server_frames", "Server frames that could not be parsed")

@dataclass
class LiveStats:
    connects: int = 0
    reconnects: int = 0
    fresh_after_unknown_handle: int = 0
    chunks_sent: int = 0
    messages_received: int = 0
    replayed_items: int = 0
    send_delay_max: float = 0.0  # seconds from a chunk being complete to it being written
    send_delay_sum: float = 0.0
    send_delay_count: int = 0


class LiveSession:
    """One call's Live session. See the module docstring for the contract."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        session_id: str,
        options: LiveOptions,
        on_event: Callable[[LiveEvent], None],
        *,
        settings: ClientSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        outbox: Outbox | None = None,
        manual_activity: bool = True,
        fast_path: bool = True,
        response_timeout: float = 10.0,
        stall_timeout: float = 10.0,
        max_replay_seconds: float = MAX_REPLAY_SECONDS,
    ) -> None:
        self.cfg = model_cfg
        self.session_id = session_id
        self.options = options
        self.on_event = on_event
        self.manual = manual_activity
        self.response_timeout = response_timeout  # no server message this long after an activityEnd
        self.stall_timeout = stall_timeout  # one socket write blocked this long (server not reading)
        self.settings = settings or ClientSettings.for_model(model_cfg, ssl_context)
        self.fast_path = fast_path
        self.outbox = outbox or Outbox(UP_BYTES_PER_MS * model_cfg.chunk_ms,
                                       max_bytes=int(max_replay_seconds * UP_BYTES_PER_SECOND))
        self.outbox.attach(self)
        self.state: State = "connecting"
        self.resume_handle: str | None = options.resume_handle
        self.server_session_id: str | None = None
        self.stats = LiveStats()
        self._write_started = 0.0
        self._sent = 0  # last sequence number written on the current connection
        self._conn: Conn | None = None
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._replace = asyncio.Event()
        self._replace_reason = ""
        self._closed = False
        self._unstable = 0  # unexpected closes since the model last completed a turn
        self._transcripts = Transcripts()
        self._history: deque[Transcript] = deque(maxlen=MAX_SEED_TURNS)  # final transcripts, for seeding
        # function calls the model waits on: while any is open its silence is ours, not a stall
        self._tools_open: set[str] = set()
        self._setup = live_config(model_cfg, options, manual=manual_activity)
        self._tools = tool_plan(options.tools, model_cfg.model)  # scheduling of NON_BLOCKING responses
        # Vertex reports which client message a handle covers: coverage is then exact, not inferred
        self.transparent = self.settings.platform == "vertex" and model_cfg.transparent_resumption

    @property
    def fast_path(self) -> bool:
        return self._fast

    @fast_path.setter
    def fast_path(self, fast: bool) -> None:
        self._fast = fast
        self._wire = wire(fast, vertex=self.settings.platform == "vertex")

    # --- public API ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and set up; returns when live. Raises :class:`LiveUnavailable` (state ``degraded``)."""
        try:
            await self._connect_with_retries()
        except LiveUnavailable as exc:
            self._degrade(str(exc))
            raise
        self._sender = asyncio.create_task(self._send_loop(), name=f"live-send-{self.session_id}")
        self._supervisor = asyncio.create_task(self._supervise(), name=f"live-sup-{self.session_id}")

    def send_audio(self, pcm16_16k: bytes) -> None:
        """Queue caller audio (PCM16 LE 16 kHz); sent in ``chunk_ms`` chunks. Never blocks."""
        if not self._closed and self.outbox.audio(pcm16_16k):
            self._wake.set()

    def activity_start(self) -> None:
        if not self._closed:
            self.outbox.start()
            self._wake.set()

    def activity_end(self) -> None:
        if not self._closed:
            self.outbox.end()
            self._wake.set()

    def send_text(self, text: str) -> None:
        """Queue realtime text (``realtime_input.text``, e.g. keypad digits) in order with the audio and
        activity marks: with manual activity detection it belongs to the caller turn it is sent in, so the
        owner wraps it in ``activity_start``/``activity_end`` when no turn is open. Never blocks."""
        if not self._closed and text:
            self.outbox.text(text)
            self._wake.set()

    def send_tool_response(self, responses: Sequence[Mapping[str, object]]) -> bool:
        """Answer a :class:`ToolCall` (``[{"id", "name", "response"}]``). False (nothing sent) if not
        connected or if a response's id is not an open call of the current connection (cancelled, or
        made on a connection that is gone: the resumed model asks again when it replays the turn)."""
        conn = self._conn
        if conn is None or conn.closing or self._closed:
            return False
        ids = [str(r.get("id")) for r in responses]
        if not all(i in self._tools_open for i in ids):
            return False
        self._tools_open.difference_update(ids)
        conn.last_rx = max(conn.last_rx, time.monotonic())  # the model's time to answer starts again
        msg = encode_tool_response(self._tools.schedule(responses))
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
        await close_connection(self._conn)
        self._conn = None

    # --- connecting ------------------------------------------------------------------------------
    async def _connect_with_retries(self) -> None:
        """Open a connection (resuming when we hold a handle), replay, and go live."""
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(max(1, self.cfg.max_retries)),
            wait=tenacity.wait_exponential_jitter(initial=self.cfg.retry_base_seconds,
                                                  max=self.cfg.retry_max_seconds),
            retry=tenacity.retry_if_exception_type(Retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if self._closed:
                        return
                    allowed, probe = await guard.allow(self.cfg.model)
                    if not allowed:  # breaker open: degrade now, no connection, no more retries
                        raise Fatal("model circuit breaker open: not connecting")
                    try:
                        try:
                            conn = await open_connection(self.settings, self.cfg, self._setup,
                                                        self.resume_handle, transparent=self.transparent)
                        except UnknownHandle as exc:
                            log.warning("resumption handle unknown to the server; starting a fresh session "
                                        "seeded with the conversation so far",
                                        extra={"session": self.session_id, "error": str(exc),
                                               "seed_turns": len(self._history)})
                            self.stats.fresh_after_unknown_handle += 1
                            self.resume_handle = None
                            conn = await open_connection(self.settings, self.cfg, self._setup, None,
                                                        transparent=self.transparent)
                            await self._seed(conn)
                    except Retryable:
                        await guard.record(self.cfg.model, False, probe)
                        raise
                    await guard.record(self.cfg.model, True, probe)
        except Fatal as exc:
            raise LiveUnavailable(str(exc)) from None
        except Retryable as exc:
            raise LiveUnavailable(f"gave up after {self.cfg.max_retries} attempts: {exc}") from None
        if self._closed:
            await close_connection(conn)
            return
        self._go_live(conn)

    async def _seed(self, conn: Conn) -> None:
        """A fresh session after an unknown handle (e.g. a 3.8 session closed at its 58-minute limit)
        starts with what was said so far, as client content before any replayed input, so the caller
        hears at most a short gap, not an assistant that forgot the call."""
        if not self._history:
            return
        try:
            await self._send_raw(conn, encode_client_content(list(self._history)))
        except Exception as exc:  # the connection will fail on its own; the replay still follows
            log.warning("seeding the fresh session failed", extra={"session": self.session_id,
                                                                    "error": str(exc)})

    def _go_live(self, conn: Conn) -> None:
        self._tools_open.clear()  # calls of the old connection are not this one's to answer
        replay = self.outbox.replay()
        self._sent = self.outbox.reconnect(self)  # the sender (re)sends everything uncovered
        if replay:
            self.stats.replayed_items += len(replay)
            REPLAYED.inc(sum(len(it.data) for it in replay if it.kind is Kind.AUDIO) / UP_BYTES_PER_SECOND)
        self._conn = conn
        self.server_session_id = conn.server_session_id or self.server_session_id
        conn.recv_task = asyncio.create_task(self._recv_loop(conn), name=f"live-recv-{self.session_id}")
        self.stats.connects += 1
        self._set_state("live", "connected")
        self._wake.set()

    # --- supervision: goAway, unexpected closes, the watchdog ------------------------------------
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
            await close_connection(old, abort=reason.startswith("server stopped"))
            if self._unstable > max(1, self.cfg.max_retries):
                self._degrade(f"connection keeps failing: {reason}")
                return
            try:
                with tracing.child(self.session_id, "resume", reason=reason):
                    log.info("resuming the Live session",
                             extra={"session": self.session_id, "reason": reason})
                    await self._connect_with_retries()
            except LiveUnavailable as exc:
                self._degrade(str(exc))
                return

    def _watchdog(self) -> None:
        """A server that stopped reading or answering gets the same treatment as a dropped connection."""
        conn = self._conn
        if conn is None or conn.closing:
            return
        now = time.monotonic()
        waiting = self.outbox.oldest_unanswered()
        if self._write_started and now - self._write_started > self.stall_timeout:
            log.warning("server stopped reading", extra={"session": self.session_id})
            self._request_replace(conn, "server stopped reading")
        elif (waiting is not None and not self._tools_open
              and now - max(waiting, conn.last_rx) > self.response_timeout):
            log.warning("server stopped answering", extra={"session": self.session_id})
            self._request_replace(conn, "server stopped answering")

    def _request_replace(self, conn: Conn, reason: str) -> None:
        if conn is not self._conn or conn.closing or self._closed:
            return
        conn.closing = True
        self._replace_reason = reason
        self._replace.set()

    def _degrade(self, reason: str) -> None:
        DEGRADED.inc()
        log.warning("Live session degraded", extra={"session": self.session_id, "reason": reason})
        self._set_state("degraded", reason)

    def _end(self, conn: Conn, reason: str) -> None:
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
        asyncio.get_running_loop().create_task(close_connection(conn)).add_done_callback(_ignore_result)
        self._conn = None

    def _set_state(self, state: State, reason: str) -> None:
        if self.state == state and state != "live":
            return
        self.state = state
        self._emit(StateChanged(state, reason))

    def _emit_all(self, events: list[Transcript]) -> None:
        for ev in events:
            if ev.final:
                self._history.append(ev)
            self._emit(ev)

    def _emit(self, ev: LiveEvent) -> None:
        try:
            self.on_event(ev)
        except Exception:
            log.exception("Live event handler failed", extra={"session": self.session_id})

    # --- sending ---------------------------------------------------------------------------------
    async def _send_raw(self, conn: Conn, msg: str) -> None:
        conn.wrote(None)
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(msg)

    async def _send_loop(self) -> None:
        box = self.outbox
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            conn = self._conn
            while conn is not None and conn is self._conn and not conn.closing:
                item = box.next_after(self._sent)
                if item is None:
                    break
                self._write_started = time.monotonic()
                conn.wrote(item.seq)  # numbered as it is handed to the socket (the server's order)
                try:
                    await self._wire.send(conn.ws, conn.session, item)
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
                now = time.monotonic()
                box.sent(self, item, now)
                if item.kind is Kind.AUDIO:
                    self._count_send(item, now)

    def _count_send(self, item: Item, now: float) -> None:
        st = self.stats
        st.chunks_sent += 1
        delay = now - item.t
        st.send_delay_sum += delay
        st.send_delay_count += 1
        if delay > st.send_delay_max:
            st.send_delay_max = delay

    # --- receiving -------------------------------------------------------------------------------
    async def _recv_loop(self, conn: Conn) -> None:
        try:
            while True:
                raw = await conn.ws.recv(decode=False)
                conn.last_rx = time.monotonic()
                self.stats.messages_received += 1
                try:
                    msg = self._wire.decode(raw)
                except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
                    BAD_FRAMES.inc()
                    self._end(conn, f"unparseable server frame: {exc!s:.200}")
                    return
                self._apply(conn, msg)
        except ConnectionClosed as exc:
            if conn.closing or conn is not self._conn:
                return
            rcvd = exc.rcvd
            code = rcvd.code if rcvd else 1006
            reason = rcvd.reason if rcvd else "connection lost"
            if code == 1008:
                conn.closing = True
                self._conn = None
                self._degrade(f"the model closed the session (1008): {reason}")
                return
            log.info("Live connection closed", extra={"session": self.session_id, "code": code,
                                                      "reason": reason})
            if code in (1011, 1013):  # the server failed (internal error / try again later): counts
                await guard.record(self.cfg.model, False)
            self._request_replace(conn, f"closed {code} {reason}".strip())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._request_replace(conn, f"receive failed: {exc}")

    def _apply(self, conn: Conn, msg: Inbound) -> None:
        """One decoded server message: events for the owner, coverage for the outbox."""
        if self._closed:
            return
        for part in msg.parts:
            self._emit(AudioOut(part) if isinstance(part, bytes) else Transcript("model", part, False))
        if msg.input_transcript is not None:
            self._emit_all(self._transcripts.part("user", *msg.input_transcript))
        if msg.output_transcript is not None:
            self._emit_all(self._transcripts.part("model", *msg.output_transcript))
        if msg.interrupted:
            self.outbox.outcome(self, answered=False)
            self._emit(Interrupted())
        if msg.turn_complete:
            self._unstable = 0
            self.outbox.outcome(self, answered=not self.transparent)  # transparent: the index says
            self._emit_all(self._transcripts.flush())
            self._emit(TurnComplete())
        if msg.usage is not None:
            self._emit(msg.usage)
        if msg.tool_calls is not None:
            self._tools_open.update(c.id for c in msg.tool_calls)
            self._emit(ToolCall(msg.tool_calls))
        if msg.tool_cancellations is not None:
            self._tools_open.difference_update(msg.tool_cancellations)
            self._emit(ToolCallCancellation(msg.tool_cancellations))
        if msg.handle is not None:
            if self.transparent and msg.handle_index is not None:
                seq = conn.seq_through(msg.handle_index)
                if seq is not None:
                    self.outbox.cover_sent(self, seq)
            self._handle(msg.handle)
        if msg.go_away is not None:
            log.info("goAway", extra={"session": self.session_id, "time_left": msg.go_away})
            self._request_replace(conn, "goAway")
        if msg.unknown:
            log.info("ignoring unknown server message", extra={"session": self.session_id,
                                                                "keys": list(msg.unknown)})

    def _handle(self, handle: str) -> None:
        """A resumable handle: the owner stores it, then the outbox forgets what it covers (in that
        order: a crash in between replays a little twice rather than losing it)."""
        if not self.manual and not self.transparent:
            self.outbox.cover_sent(self, self._sent)
        self.resume_handle = handle
        self._emit(ResumeHandle(handle))
        self.outbox.confirm(self)

def _ignore_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
