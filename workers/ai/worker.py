"""The AI worker loop: one asyncio process per shard, every call of the shard in it.

Why one process for many calls: a Live session is mostly idle I/O, and per-call processes cost 10-20x
the CPU (ARCHITECTURE). Why a fixed 20 ms tick instead of waking per frame: the media worker writes a
20 ms frame per call into the uplink ring; one tick reads *all* calls' frames, runs one batched VAD call
(512-sample windows, remainder kept per call) and drains model audio into the downlink rings. The CPU
cost is then one wake-up per tick for the whole shard.

Each tick:
1. ``heartbeat("ai")`` into the segment header (the supervisor restarts a worker whose beat is stale);
2. scan the slot table: a local call whose (slot, generation) is no longer an ACTIVE slot is closed; an
   ACTIVE slot without a local call gets one (a Live session resumed from ``slot.resume_handle`` or
   ``options["resume_handle"]`` when present, so a restarted worker continues the conversation; the
   cached greeting is played at once for a new call, before the model is live);
3. uplink: read every whole 640-byte frame of every call; while the caller's turn is open the audio goes
   to the Live session; all of it goes to the VAD (batched across calls) and the turn detector;
   ``activity_start`` sends the pre-roll with it, ``activity_end`` is sent the moment the hangover ends;
4. downlink: model audio (24 kHz) queued per call is written in whole 960-byte frames as far as the ring
   has room (never blocking; a local backlog absorbs model bursts larger than the ring, beyond a bound it
   is dropped and counted). Model audio is also written the moment it arrives, not only at the tick.

Barge-in: caller speech onset while model audio is queued or playing flushes the downlink through the
ring's flush epoch (``request_flush``) in the same tick the VAD sees it, and the rest of that model turn
is dropped until the model says ``interrupted``/``turnComplete``. The greeting (the AI disclosure) is not
interruptible; its end (a downlink cursor) is published in the slot (``protect_until``) so the media
worker and a restarted AI worker respect it too.

Playback holds (provisional barge-in): the media worker pauses model audio on the caller's first loud
frame, before any VAD could know whether it is speech, and publishes the hold in the slot. This worker
settles every hold: Silero-confirmed speech (the barge-in above, or a caller turn already open) flushes
the ring and then releases the hold (``pauses_confirmed``); no speech within ``vad.pause_confirm_ms``
releases it untouched, and playback resumes exactly where it stopped (``pauses_released``: a false
alarm such as a cough). A hold with nothing left to play, or on a call this worker lets go of, is
released at once. A restarted worker finds an unsettled hold in the slot and starts its clock anew.

A model that cannot be reached keeps the call up: the "please hold" prompt plays and the
worker re-opens the Live session every ``model.degraded_retry_seconds``.

Failure isolation: everything per call runs under a guard that logs and closes only that call's Live
session (the slot stays; the next scan re-opens it); the loop itself never raises.

Keypad digits (media-worker events, every 5th tick) go to the model as text entries (workers/ai/dtmf.py);
the model's tool calls are answered by tasks of workers/ai/tools.py, never inside the tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Config
from bench import probe
from shm.segment import EventCode, ShardSegment, ShmError, Slot
from workers.ai.dtmf import DtmfBuffer, digit_for, dtmf_text
from workers.ai.greeting import PromptCache
from workers.ai.journal import AUDIO, END, START, TEXT, TurnJournal, journal_path, remove_stale
from workers.ai.tools import ToolRunner
from workers.ai.turns import Decision, PreRoll, TurnDetector, TurnEvent, TurnParams
from workers.ai.vad import SAMPLE_RATE, BatchedVad, WindowBuffer
from workers.levels import mean_square_of_dbfs

log = logging.getLogger(__name__)

TICK_SECONDS = 0.020
# The AI tick runs this long after the media worker's tick ends (its heartbeat): the uplink frames of that
# tick are all in the rings, so the VAD sees a caller frame within ~2 ms instead of 0-20 ms later (a
# free-running tick has a random phase per worker start, which shifted turn-end and barge-in by up to a
# tick between runs). The media beat is the end of its tick, so any per-tick work already happened.
MEDIA_PHASE_SECONDS = 0.002
MEDIA_BEAT_FRESH_SECONDS = 0.1  # older beat: the media worker is down or stalled; tick free-running
UP_FRAME = 640  # 20 ms PCM16 at 16 kHz
DOWN_FRAME = 960  # 20 ms PCM16 at 24 kHz
MAX_BACKLOG_BYTES = 60 * 48000  # 60 s of model audio queued locally per call
HOLD_REPEAT_SECONDS = 20.0
LiveFactory = Callable[..., Any]


@dataclass
class WorkerStats:
    """Process-wide counters (totals) for logs, tests and benchmarks."""

    ticks: int = 0
    late_ticks: int = 0  # ticks that started more than one tick late
    sessions_opened: int = 0
    sessions_closed: int = 0
    session_errors: int = 0
    frames_in: int = 0
    frames_out: int = 0
    downlink_dropped_bytes: int = 0
    barge_ins: int = 0
    pauses_confirmed: int = 0
    pauses_released: int = 0
    activity_starts: int = 0
    activity_ends: int = 0
    tick_seconds: float = 0.0  # wall time spent inside ticks


@dataclass
class Call:
    """The worker's local state for one (slot, generation)."""

    slot: Slot
    generation: int
    session_id: str
    options: dict[str, Any]
    window: WindowBuffer
    preroll: PreRoll
    detector: TurnDetector
    live: Any = None
    start_task: asyncio.Task[None] | None = None
    sending: bool = False  # caller turn open: uplink audio goes to the model
    pending: bytearray = field(default_factory=bytearray)  # model audio not yet in the ring
    model_turn: bool = False  # model audio arrived since the last turnComplete/interrupted
    suppress: bool = False  # barge-in: drop the rest of the interrupted model turn
    protect_until: int = 0  # downlink write cursor up to which audio is the (uninterruptible) greeting
    hold_seq: int | None = None  # the media worker's playback hold being settled
    hold_deadline: float = 0.0  # ... released as a false alarm at this monotonic time
    hold_played: bool = False
    hold_at: float = 0.0  # when "please hold" last started
    start_failed: bool = False
    journal: TurnJournal | None = None
    awaiting_live: bool = False  # attached before the SDK was ready: journal now, open the session later
    handle: str = ""  # resume handle found at attach
    answered: int = 0  # caller turns answered (turnComplete/interrupted) since the last handle
    dtmf: str = ""  # keypad digits the caller pressed (last 32), from the media worker's events
    keypad: DtmfBuffer | None = None  # digits not yet sent to the model (workers/ai/dtmf.py)
    retry_at: float = 0.0
    closed: bool = False
    last_event: dict[str, float] = field(default_factory=dict)  # monotonic times, for tests and benchmarks

    @property
    def key(self) -> tuple[int, int]:
        return (self.slot.index, self.generation)

    def current(self) -> bool:
        return not self.closed and self.slot.is_current(self.generation)


def _import_sdk() -> None:
    """The slow part of the Live layer's start-up (run in a thread)."""
    import google.genai.errors
    import google.genai.live
    import google.genai.types  # noqa: F401

    import workers.ai.live  # noqa: F401


def _default_live() -> tuple[LiveFactory, LiveFactory]:
    from workers.ai import live  # the SDK import is heavy; tests may inject their own

    return live.LiveSession, live.LiveOptions


class AiWorker:
    """The AI worker of one shard. ``await run(stop)``; everything else is called from the loop."""

    def __init__(
        self,
        cfg: Config,
        segment: ShardSegment,
        *,
        live_factory: LiveFactory | None = None,
        options_factory: LiveFactory | None = None,
        ssl_context: Any = None,
        prompts: PromptCache | None = None,
        vad: BatchedVad | None = None,
        journal_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.seg = segment
        self._live_factory = live_factory
        self._journal_dir = journal_dir
        self._live_ready = live_factory is not None
        self._warm_task: asyncio.Task[None] | None = None
        self._options_factory = options_factory
        self._ssl = ssl_context
        self.prompts = prompts or PromptCache(None)
        self.vad = vad or BatchedVad(energy_gate_dbfs=cfg.vad.energy_gate_dbfs)
        v = cfg.vad
        self.params = TurnParams(threshold=v.threshold, hangover_ms=v.hangover_ms,
                                 min_speech_ms=v.min_speech_ms, barge_in_ms=v.barge_in_ms,
                                 preroll_ms=v.preroll_ms)
        self._gate_ms = mean_square_of_dbfs(v.energy_gate_dbfs)
        self._confirm_s = v.pause_confirm_ms / 1000.0
        self._preroll_keep_ms = v.preroll_ms + cfg.shards.uplink_ring_ms + 200
        self.calls: dict[int, Call] = {}
        self.stats = WorkerStats()
        self._closing: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._greeting = b""
        self._hold = b""
        m = cfg.model
        self.tools = ToolRunner(m.tools_url, m.tools_timeout_seconds)
        self._tool_decls: list[dict[str, Any]] | None = None
        if m.tools_file:
            from appliance.config import load_tool_declarations

            self._tool_decls = load_tool_declarations(m.tools_file)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def prepare(self) -> None:
        """Before taking calls: synthesise (or load from cache) the greeting and hold prompts."""
        m = self.cfg.model
        if m.greeting:
            self._greeting = await self.prompts.get_async(m.greeting, m.language)
        if m.hold_prompt:
            self._hold = await self.prompts.get_async(m.hold_prompt, m.language)

    async def warm_up(self) -> None:
        """Make the Live layer ready without stalling the loop: the SDK import (0.5-2 s) runs in a
        thread while the loop already ticks (heartbeat, uplink, VAD, journal); done lazily inside a
        tick it blocked the loop past the heartbeat timeout on a loaded box."""
        if self._live_ready:
            return
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(_import_sdk)
        except Exception as exc:
            log.warning("SDK import failed", extra={"error": str(exc)})
        self._warm_up_live(t0)
        self._live_ready = True

    def _warm_up_live(self, t0: float) -> None:
        """Build the SDK's first objects (on the loop thread: the SDK client may bind to it)."""
        try:
            from google.genai import types

            from workers.ai import live

            self._live_factory, self._options_factory = live.LiveSession, live.LiveOptions
            m = self.cfg.model
            opts = live.LiveOptions(m.voice, m.language, m.system_instruction)
            session = live.LiveSession(m, "warm-up", opts, lambda _ev: None, ssl_context=self._ssl)
            types.LiveConnectConfig(response_modalities=["AUDIO"])
            client_fn = getattr(live, "_client", None)  # the shared SDK client for this endpoint
            if client_fn is not None:
                client_fn(session.base_url, session.api_key, m.api_version, session.ssl_context)
        except Exception as exc:  # best effort: the first call pays instead
            log.warning("Live layer warm-up failed", extra={"error": str(exc)})
        log.info("Live layer warmed up", extra={"seconds": round(time.perf_counter() - t0, 3)})

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every 20 ms until ``stop`` is set, then close every Live session (slots stay as they are)."""
        loop = asyncio.get_running_loop()
        if not self._live_ready and self._warm_task is None:
            self._warm_task = loop.create_task(self.warm_up())
        next_t = loop.time()
        failures = 0
        warned = 0.0
        while not stop.is_set():
            now = loop.time()
            if now - next_t > TICK_SECONDS:
                self.stats.late_ticks += 1
            t0 = time.perf_counter()
            try:
                self.tick()
            except Exception:  # the loop must survive anything one tick does; log 1st, 2nd, 4th, 8th...
                failures += 1
                if failures & (failures - 1) == 0:
                    log.exception("AI worker tick failed", extra={"failures": failures})
            self.stats.tick_seconds += time.perf_counter() - t0
            next_t = self._phase_locked(next_t + TICK_SECONDS, loop.time())
            delay = next_t - loop.time()
            if delay < -5 * TICK_SECONDS:  # fell far behind (suspend, overload): resynchronise
                if now - warned > 10.0:
                    warned = now
                    log.warning("AI worker fell behind", extra={"behind_ms": round(-delay * 1000, 1),
                                                                "calls": len(self.calls)})
                next_t = loop.time()
                delay = 0.0
            await asyncio.sleep(max(delay, 0.0))  # cheaper than wait_for(stop.wait()); stop lags ≤ 20 ms
        await self.shutdown()

    def _phase_locked(self, nominal: float, now: float) -> float:
        """The tick time on the media worker's grid (+ ``MEDIA_PHASE_SECONDS``) nearest ``nominal``.

        Moves the schedule by at most half a tick per tick, so a media worker restart (new phase) or a
        late media beat only nudges it; without a fresh beat the nominal time stands.
        """
        try:
            beat_ns = self.seg.heartbeat_ns("media")
        except ShmError:
            return nominal
        beat = beat_ns / 1e9
        if not beat_ns or now - beat > MEDIA_BEAT_FRESH_SECONDS:
            return nominal
        base = beat + MEDIA_PHASE_SECONDS
        return base + round((nominal - base) / TICK_SECONDS) * TICK_SECONDS

    async def shutdown(self) -> None:
        """Close every Live session (the worker is stopping; the calls live on in the slot table)."""
        for idx in list(self.calls):
            self._close_call(idx, reason="worker stopping")
        if self._closing:
            await asyncio.wait(self._closing, timeout=5.0)
        await self.tools.aclose()

    # ---- the tick --------------------------------------------------------------------------------
    def tick(self) -> None:
        """One 20 ms step for the whole shard (see the module docstring)."""
        self.stats.ticks += 1
        self.seg.heartbeat("ai")
        self._scan()
        if self._journal_dir is not None and self.stats.ticks % 250 == 1:
            remove_stale(self._journal_dir, self.seg.name, {c.key for c in self.calls.values()})
        now = time.monotonic()
        batches: list[list[tuple[Call, np.ndarray, int]]] = []
        events = self.stats.ticks % 5 == 0  # media-worker events (DTMF): every 100 ms is plenty
        for call in list(self.calls.values()):
            try:
                if call.awaiting_live and self._live_ready:
                    self._start_awaited(call)
                self._uplink(call, batches)
                self._maybe_retry(call, now)
                if events:
                    self._events(call)
            except Exception as exc:
                self._call_failed(call, exc)
        for batch in batches:
            try:
                probs = self.vad.process([(c.key, chunk) for c, chunk, _ in batch])
            except Exception:
                log.exception("VAD batch failed")
                continue
            for (call, chunk, end), p in zip(batch, probs, strict=True):
                if call.closed:
                    continue
                try:
                    quiet = self._quiet_tail(chunk) if call.detector.speaking else 0
                    ev = call.detector.feed(float(p), end, playing=self._playing(call), quiet_tail=quiet)
                    if ev is not None:
                        self._on_turn(call, ev)
                except Exception as exc:
                    self._call_failed(call, exc)
        for call in list(self.calls.values()):
            try:
                if call.detector.speaking:
                    rest = call.window.remainder()
                    if rest.size == 0 or self._silent(rest):
                        ev = call.detector.silent_until(call.window.position)
                        if ev is not None:
                            self._on_turn(call, ev)
                self._settle_hold(call, now)
                if call.pending:
                    self._drain(call)
            except Exception as exc:
                self._call_failed(call, exc)

    def _quiet_tail(self, chunk: np.ndarray) -> int:
        """Samples at the end of a 512-sample window below the energy gate, in 4 ms (64-sample) blocks."""
        x = chunk.astype(np.float32).reshape(8, 64)
        loud = np.flatnonzero(np.einsum("ij,ij->i", x, x) >= self._gate_ms * 64)
        return 512 if loud.size == 0 else (7 - int(loud[-1])) * 64

    def _silent(self, pcm: np.ndarray) -> bool:
        x = pcm.astype(np.float32)
        return float(np.dot(x, x)) < self._gate_ms * pcm.size

    # ---- slot table ------------------------------------------------------------------------------
    def _scan(self) -> None:
        for idx, call in list(self.calls.items()):
            if not call.slot.is_current(call.generation):
                self._close_call(idx, reason="slot no longer active")
        for slot in self.seg.slots():
            if slot.index in self.calls:
                continue
            try:
                info = slot.snapshot()
            except ShmError as exc:
                log.warning("slot unreadable", extra={"slot": slot.index, "error": str(exc)})
                continue
            if info is None:
                continue
            try:
                self._open_call(slot, info.generation, info.session_id, info.options)
            except Exception as exc:
                log.exception("cannot open call", extra={"slot": slot.index, "session": info.session_id})
                self.stats.session_errors += 1
                del exc

    def _open_call(self, slot: Slot, generation: int, session_id: str, options: dict[str, Any]) -> None:
        call = Call(slot=slot, generation=generation, session_id=session_id, options=dict(options),
                    window=WindowBuffer(), preroll=PreRoll(self._preroll_keep_ms),
                    detector=TurnDetector(self.params), last_event=probe.event_times(session_id))
        self.calls[slot.index] = call
        self.stats.sessions_opened += 1
        self.vad.reset(call.key)
        handle = slot.resume_handle or str(options.get("resume_handle") or "")
        fresh = not handle and not slot.model_state  # never attached by any AI worker before
        replay = self._open_journal(call)
        log.info("call attached", extra={"session": session_id, "slot": slot.index, "resume": bool(handle),
                                         "replay_records": len(replay), "live_ready": self._live_ready})
        if fresh:
            greeting = self._greeting_for(call)
            if greeting:
                call.protect_until = slot.downlink.write_cursor + len(greeting)
                slot.protect_until = call.protect_until  # before any of it is readable
                call.pending += greeting
                self._drain(call)
        else:
            call.protect_until = slot.protect_until  # a restarted worker: the greeting may still play
        if not self._live_ready:
            call.awaiting_live = True
            call.handle = handle
            self._set_model_state(call, "connecting")
            if replay:
                self._replay(call, replay, send=False)  # only picks up an open turn
            return
        self._start_live(call, handle or None)
        if replay:
            self._replay(call, replay)

    def _greeting_for(self, call: Call) -> bytes:
        text = call.options.get("greeting")
        if text is None:
            return self._greeting
        if not text:
            return b""
        lang = str(call.options.get("language") or self.cfg.model.language)
        cached = self.prompts.cached(str(text), lang)
        if cached is None:  # synthesise in the background; the default plays now
            task = asyncio.get_running_loop().create_task(self.prompts.get_async(str(text), lang))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return self._greeting
        return cached

    def _start_live(self, call: Call, handle: str | None) -> None:
        if self._live_factory is None or self._options_factory is None:
            self._live_factory, self._options_factory = _default_live()
        factory = self._live_factory
        m = self.cfg.model
        opts = self._options_factory(
            voice=str(call.options.get("voice") or m.voice),
            language=str(call.options.get("language") or m.language),
            system_instruction=str(call.options.get("system_instruction") or m.system_instruction),
            resume_handle=handle,
            **({"tools": self._tool_decls} if self._tool_decls else {}),
        )
        self._set_model_state(call, "connecting")
        call.start_failed = False
        try:
            call.live = factory(m, call.session_id, opts, lambda ev, c=call: self._on_live_event(c, ev),
                                ssl_context=self._ssl)
        except Exception as exc:  # bad options or config: keep the call, retry later
            call.live = None
            call.start_failed = True
            log.exception("cannot create the Live session", extra={"session": call.session_id})
            self._degraded(call, f"cannot create the Live session: {exc}")
            return
        call.start_task = asyncio.get_running_loop().create_task(self._run_start(call, call.live))

    async def _run_start(self, call: Call, live: Any) -> None:
        try:
            await live.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if call.closed or live is not call.live:
                return
            log.warning("Live session failed to start", extra={"session": call.session_id, "error": str(exc)})
            call.start_failed = True
            self._degraded(call, f"start failed: {exc}")

    def _close_call(self, idx: int, *, reason: str) -> None:
        call = self.calls.pop(idx, None)
        if call is None:
            return
        call.closed = True
        self.vad.remove(call.key)
        if call.hold_seq is not None:  # nobody settles it now: let the media worker play on
            with contextlib.suppress(ShmError):
                if call.slot.is_current(call.generation):
                    self._end_hold(call)
        if call.journal is not None:
            if call.slot.is_current(call.generation):
                call.journal.close()  # the call goes on (worker stopping or re-opening): keep it
            else:
                call.journal.remove()
            call.journal = None
        self.stats.sessions_closed += 1
        log.info("call detached", extra={"session": call.session_id, "slot": idx, "reason": reason})
        self._stop_live(call)

    def _stop_live(self, call: Call) -> None:
        live, call.live = call.live, None
        self.tools.cancel_all(call.key)  # the session that asked is going away: nobody awaits answers
        if call.start_task is not None and not call.start_task.done():
            call.start_task.cancel()
        if live is None:
            return
        task = asyncio.get_running_loop().create_task(self._close_live(call.session_id, live))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_live(session_id: str, live: Any) -> None:
        try:
            await asyncio.wait_for(live.close(), 5.0)
        except Exception as exc:
            log.warning("Live session close failed", extra={"session": session_id, "error": str(exc)})

    def _call_failed(self, call: Call, exc: BaseException) -> None:
        """One call's failure: log it, drop its Live session; the next scan re-opens it if still active."""
        self.stats.session_errors += 1
        log.error("call failed; re-opening", exc_info=exc, extra={"session": call.session_id})
        with contextlib.suppress(Exception):
            call.slot.counters.add("errors")
        self._close_call(call.slot.index, reason=f"error: {type(exc).__name__}")

    # ---- uplink: VAD and turns --------------------------------------------------------------------
    def _uplink(self, call: Call, batches: list[list[tuple[Call, np.ndarray, int]]]) -> None:
        data, _ = call.slot.uplink.read_frames(UP_FRAME)  # every whole frame queued, one cursor round
        if data:
            self.stats.frames_in += len(data) // UP_FRAME
            call.window.push(data)
            call.preroll.push(data, call.window.position)
            if call.sending:
                self._send_audio(call, data)
        k = 0
        while call.window.has_window():
            chunk, end = call.window.pop_window()
            if k == len(batches):
                batches.append([])
            batches[k].append((call, chunk, end))
            k += 1
        if k:
            call.slot.counters.add("vad_frames", k)

    # ---- what goes to the model (journaled, so a replacement worker can replay it) ----------------
    # While the model is degraded nothing is journaled: the caller was asked to hold.
    def _to_model(self, call: Call, kind: str, data: bytes | str = b"") -> bool:
        """Journal one item of the caller's side (``start``/``audio``/``end``/``text``) and send it to the
        Live session; before the session exists only journal it. True if it went to the model."""
        live_ok = not call.awaiting_live and self._live_ok(call)
        j = call.journal if call.awaiting_live or live_ok else None
        live = call.live if live_ok else None
        if kind == "audio":
            if j is not None:
                j.audio(data)
            if live is not None:
                live.send_audio(data)
        elif kind == "text":
            if j is not None:
                j.text(data)
            if live is not None:
                live.send_text(data)
        elif kind == "start":
            if j is not None:
                j.start()
            if live is not None:
                live.activity_start()
        else:
            if j is not None:
                j.end()
            if live is not None:
                live.activity_end()
        return live_ok

    def _send_start(self, call: Call) -> None:
        self._to_model(call, "start")

    def _send_audio(self, call: Call, pcm: bytes) -> None:
        if pcm and self._to_model(call, "audio", pcm):
            call.slot.counters.add("audio_sent_ms", len(pcm) // 32)

    def _send_end(self, call: Call) -> None:
        self._to_model(call, "end")

    def _open_journal(self, call: Call) -> list[tuple[bytes, bytes]]:
        if self._journal_dir is None:
            return []
        path = journal_path(self._journal_dir, self.seg.name, call.slot.index, call.generation)
        try:
            call.journal = TurnJournal(path)
            return call.journal.records()
        except OSError as exc:
            log.warning("no turn journal for this call",
                        extra={"session": call.session_id, "error": str(exc)})
            call.journal = None
            return []

    def _replay(self, call: Call, records: list[tuple[bytes, bytes]], *, send: bool = True) -> None:
        """Re-send what was sent (or journaled) after the last handle and never confirmed."""
        live, open_turn, n = call.live, False, 0
        send = send and live is not None
        for kind, payload in records:
            if kind == START:
                if send:
                    live.activity_start()
                open_turn = True
            elif kind == AUDIO:
                if send:
                    live.send_audio(payload)
                n += len(payload)
            elif kind == TEXT:
                if send:
                    live.send_text(payload.decode(errors="replace"))
            elif kind == END:
                if send:
                    live.activity_end()
                open_turn = False
        if not send:
            if open_turn and not call.detector.speaking:
                call.sending = True
                call.detector.resume_speaking(call.window.position)
            return
        call.slot.counters.add("frames_replayed", n // UP_FRAME)
        if open_turn and not call.detector.speaking:  # mid-utterance: the turn continues
            call.sending = True
            call.detector.resume_speaking(call.window.position)
        log.info("replayed unconfirmed audio",
                 extra={"session": call.session_id, "bytes": n, "open": open_turn})

    def _events(self, call: Call) -> None:
        """Consume the media worker's events for this call (the queue is ours to drain); keypad digits
        go to the model in entries (``#``, 32 digits or ``model.dtmf_flush_ms`` of quiet: dtmf.py)."""
        now = time.monotonic()
        if call.keypad is None:
            call.keypad = DtmfBuffer(self.cfg.model.dtmf_flush_ms)
        for code, value in call.slot.pop_events():
            if code == EventCode.DTMF:
                digit = digit_for(value)
                if digit is None:
                    continue
                call.dtmf = (call.dtmf + digit)[-32:]  # never logged: PINs, card numbers (counts only)
                entry = call.keypad.push(digit, now)
                if entry:
                    self._send_dtmf(call, entry)
            elif code == EventCode.RTP_TIMEOUT:
                log.info("caller RTP silent", extra={"session": call.session_id, "ms": value})
        entry = call.keypad.due(now)
        if entry:
            self._send_dtmf(call, entry)

    def _send_dtmf(self, call: Call, digits: str) -> None:
        """One keypad entry to the model: inside the caller's open turn, else as a turn of its own
        (which, like speech, interrupts model audio)."""
        text = dtmf_text(digits)
        if not call.awaiting_live and not self._live_ok(call):
            log.warning("keypad entry dropped: model unavailable", extra={"session": call.session_id})
            return
        if call.sending:
            self._send_text(call, text)
        else:
            if self._playing(call):
                self._barge_in(call)
            self._send_start(call)
            self._send_text(call, text)
            self._send_end(call)
        call.slot.counters.add("dtmf_sent", len(digits))
        call.last_event["dtmf_sent"] = time.monotonic()
        log.info("keypad entry sent to the model", extra={"session": call.session_id, "digits": len(digits)})

    def _send_text(self, call: Call, text: str) -> None:
        self._to_model(call, "text", text)

    def _live_ok(self, call: Call) -> bool:
        return (call.live is not None and not call.start_failed
                and getattr(call.live, "state", "") not in ("degraded", "closed"))

    def _playing(self, call: Call) -> bool:
        """Model audio queued, in the ring or still arriving (caller speech now is a barge-in)."""
        if call.pending or call.model_turn:
            return True
        ring = call.slot.downlink
        return ring.free_space() < ring.capacity

    def _on_turn(self, call: Call, ev: TurnEvent) -> None:
        now = time.monotonic()
        if ev.decision is Decision.ACTIVITY_START:
            if ev.barge_in or self._playing(call):
                self._barge_in(call)
            call.sending = True
            self.stats.activity_starts += 1
            call.slot.counters.add("turns")
            self._send_start(call)
            call.last_event["activity_start"] = now
            self._send_audio(call, call.preroll.since(ev.onset - self.params.samples(self.params.preroll_ms)))
        else:
            call.sending = False
            self.stats.activity_ends += 1
            self._send_end(call)
            call.last_event["activity_end"] = time.monotonic()
            call.slot.counters.add("speech_ms", (ev.sample - ev.onset) * 1000 // SAMPLE_RATE)

    def _barge_in(self, call: Call) -> None:
        ring = call.slot.downlink
        if ring.read_cursor < call.protect_until:  # the AI disclosure is still playing
            return
        if not call.pending and not call.model_turn and ring.free_space() == ring.capacity:
            return
        ring.request_flush()
        call.pending.clear()
        if call.model_turn:
            call.suppress = True
        self.stats.barge_ins += 1
        call.last_event["barge_in"] = time.monotonic()
        call.slot.counters.add("interruptions")
        self._end_hold(call, confirmed=True)

    # ---- playback holds (the media worker's provisional barge-in) ---------------------------------
    def _settle_hold(self, call: Call, now: float) -> None:
        """Once per tick, after the VAD: confirm, keep or release the media worker's playback hold."""
        hold, release = call.slot.hold_words()
        if hold == release:
            call.hold_seq = None
            return
        if call.hold_seq != hold:  # a new hold (or one found in the slot after a restart)
            call.hold_seq = hold
            call.hold_deadline = now + self._confirm_s
            call.last_event["pause"] = now
        if not self._playing(call):
            self._end_hold(call)  # nothing left to hold (flushed, interrupted, or never started)
        elif call.detector.speaking:
            self._barge_in(call)  # the caller's turn is open: talking over the model is a barge-in
            if call.hold_seq is not None:  # not flushable (the greeting): play on
                self._end_hold(call)
        elif now >= call.hold_deadline:
            self._end_hold(call, released=True)

    def _end_hold(self, call: Call, *, confirmed: bool = False, released: bool = False) -> None:
        """Release the current hold, if any (after any flush it needs: the media worker resumes reading)."""
        hold, release = call.slot.hold_words()
        if hold == release:
            call.hold_seq = None
            return
        call.slot.release_hold(hold)
        call.hold_seq = None
        if confirmed:
            self.stats.pauses_confirmed += 1
            call.slot.counters.add("pauses_confirmed")
        elif released:
            self.stats.pauses_released += 1
            call.slot.counters.add("pauses_released")
            call.last_event["resume"] = time.monotonic()

    # ---- downlink --------------------------------------------------------------------------------
    def _drain(self, call: Call) -> None:
        """Write whole 960-byte frames of queued model audio as far as the ring has room."""
        if not call.current():
            call.pending.clear()
            return
        ring = call.slot.downlink
        n = min(len(call.pending), ring.free_space()) // DOWN_FRAME * DOWN_FRAME
        if n:
            if ring.write(memoryview(call.pending)[:n]):
                del call.pending[:n]
                self.stats.frames_out += n // DOWN_FRAME
        extra = len(call.pending) - MAX_BACKLOG_BYTES
        if extra > 0:
            extra = (extra + DOWN_FRAME - 1) // DOWN_FRAME * DOWN_FRAME
            del call.pending[:extra]
            self.stats.downlink_dropped_bytes += extra

    def _pad_tail(self, call: Call) -> None:
        """End of a model turn: pad the last partial frame with silence so it plays too."""
        rem = len(call.pending) % DOWN_FRAME
        if rem:
            call.pending += bytes(DOWN_FRAME - rem)

    # ---- Live events -----------------------------------------------------------------------------
    def _on_live_event(self, call: Call, ev: Any) -> None:
        """Called by the Live session for each event (on this loop). Never raises into the session."""
        if call.closed:
            return
        try:
            handler = self._handlers.get(type(ev).__name__)
            if handler is not None:
                handler(self, call, ev)
        except Exception as exc:
            self._call_failed(call, exc)

    def _ev_audio(self, call: Call, ev: Any) -> None:
        pcm = ev.pcm24k
        call.slot.counters.add("audio_received_ms", len(pcm) * 1000 // 48000)
        if call.suppress:
            return
        if not call.model_turn:
            call.model_turn = True
            call.last_event["first_audio"] = time.monotonic()
        if len(pcm) % 2:
            pcm = pcm[:-1]
        call.pending += pcm
        self._drain(call)

    def _ev_interrupted(self, call: Call, _ev: Any) -> None:
        call.answered += 1
        ring = call.slot.downlink
        if call.current() and ring.read_cursor >= call.protect_until:
            if call.pending or ring.free_space() < ring.capacity:
                ring.request_flush()
                call.last_event["interrupted"] = time.monotonic()
                self._end_hold(call, confirmed=True)
            call.pending.clear()
        call.model_turn = False
        call.suppress = False

    def _ev_turn_complete(self, call: Call, _ev: Any) -> None:
        call.answered += 1
        if call.model_turn and not call.suppress:
            self._pad_tail(call)
            self._drain(call)
        call.model_turn = False
        call.suppress = False
        call.last_event["turn_complete"] = time.monotonic()

    def _ev_transcript(self, call: Call, ev: Any) -> None:
        if getattr(ev, "final", True) and call.current():
            call.slot.transcript = f"{ev.role}: {ev.text}"

    def _ev_usage(self, call: Call, ev: Any) -> None:
        c = call.slot.counters
        c.add("input_tokens", int(getattr(ev, "prompt_tokens", 0) or 0))
        c.add("output_tokens", int(getattr(ev, "response_tokens", 0) or 0))

    def _ev_handle(self, call: Call, ev: Any) -> None:
        if ev.handle and call.current():
            if call.journal is not None:
                call.journal.confirm(call.answered)
            call.answered = 0
            try:
                call.slot.resume_handle = ev.handle
            except ShmError as exc:
                log.warning("resume handle too long for the slot", extra={"session": call.session_id,
                                                                        "error": str(exc)})

    def _ev_state(self, call: Call, ev: Any) -> None:
        self._set_model_state(call, ev.state)
        if ev.state == "degraded":
            self._degraded(call, getattr(ev, "reason", ""))
        elif ev.state == "live":
            call.hold_played = False
            call.retry_at = 0.0
        elif ev.state == "reconnecting":
            call.slot.counters.add("reconnects")
            self.tools.cancel_all(call.key)  # its open tool calls died with the connection (live.py)
        elif ev.state == "closed" and not call.closed:
            # the session ended on its own (e.g. the server sent garbage): re-open it soon
            call.start_failed = True
            call.sending = False
            if not call.retry_at:
                call.retry_at = time.monotonic() + 0.5
            log.warning("Live session ended; re-opening", extra={"session": call.session_id,
                                                                 "reason": getattr(ev, "reason", "")})

    def _ev_tool(self, call: Call, ev: Any) -> None:
        """The model called functions: answer each (workers/ai/tools.py), never blocking the loop."""
        calls = list(getattr(ev, "calls", None) or ())
        call.slot.counters.add("tool_calls", len(calls))
        live = call.live

        def respond(fr: dict[str, Any], c: Call = call, asked: Any = live) -> bool:
            if c.closed or c.live is not asked or asked is None:
                return False  # the call ended or its Live session was replaced: nobody waits for this
            return bool(asked.send_tool_response([fr]))

        def done(ok: bool, c: Call = call) -> None:
            if not ok and c.current():
                c.slot.counters.add("tool_errors")

        self.tools.submit(call.key, call.session_id, calls, respond, done)

    def _ev_tool_cancel(self, call: Call, ev: Any) -> None:
        n = self.tools.cancel(call.key, [str(i) for i in getattr(ev, "ids", None) or ()])
        log.info("tool calls cancelled by the model", extra={"session": call.session_id, "running": n})

    _handlers: dict[str, Callable[[AiWorker, Call, Any], None]] = {
        "AudioOut": _ev_audio,
        "Interrupted": _ev_interrupted,
        "TurnComplete": _ev_turn_complete,
        "Transcript": _ev_transcript,
        "Usage": _ev_usage,
        "ResumeHandle": _ev_handle,
        "StateChanged": _ev_state,
        "ToolCall": _ev_tool,
        "ToolCallCancellation": _ev_tool_cancel,
    }

    def _set_model_state(self, call: Call, state: str) -> None:
        if call.current():
            call.slot.model_state = str(state)[:32]

    # ---- degradation -----------------------------------------------------------------------------
    def _degraded(self, call: Call, reason: str) -> None:
        """The model is unreachable: keep the call, ask the caller to hold (again every
        ``HOLD_REPEAT_SECONDS`` while it lasts), retry later."""
        self._set_model_state(call, "degraded")
        if call.retry_at == 0.0 or time.monotonic() >= call.retry_at:
            call.slot.counters.add("degraded")
        call.retry_at = time.monotonic() + self.cfg.model.degraded_retry_seconds
        call.sending = False
        now = time.monotonic()
        if self._hold and (not call.hold_played or now - call.hold_at >= HOLD_REPEAT_SECONDS):
            call.hold_played = True
            call.hold_at = now
            call.pending += self._hold
            self._drain(call)
        log.warning("model degraded; call kept", extra={"session": call.session_id, "reason": reason})

    def _start_awaited(self, call: Call) -> None:
        """The SDK is ready: open the Live session of a call attached during warm-up, replay its journal."""
        call.awaiting_live = False
        self._start_live(call, call.handle or None)
        if call.live is not None and call.journal is not None:
            records = call.journal.records()
            if records:
                self._replay(call, records)

    def _maybe_retry(self, call: Call, now: float) -> None:
        if call.retry_at and now >= call.retry_at and not self._live_ok(call):
            call.retry_at = now + self.cfg.model.degraded_retry_seconds
            handle = call.slot.resume_handle or getattr(call.live, "resume_handle", None)
            log.info("re-opening the Live session", extra={"session": call.session_id})
            self._stop_live(call)
            self._start_live(call, handle or None)
            if call.live is not None and call.journal is not None:
                records = call.journal.records()
                if records:
                    self._replay(call, records)
