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

A model that cannot be reached keeps the call up: the degradation tiers play (a spoken notice, a bounded
wait, the keypad menu: workers/ai/ivr.py; with ``degrade.enabled = false`` the "please hold" prompt) and
the worker re-opens the Live session every ``model.degraded_retry_seconds``.

Failure isolation: everything per call runs under a guard that logs and closes only that call's Live
session (the slot stays; the next scan re-opens it); the loop itself never raises.

Keypad digits (media-worker events, every 5th tick) go to the model as text entries (workers/ai/dtmf.py);
the model's tool calls are answered by tasks of workers/ai/tools.py, never inside the tick.

Where things live: the caller's side of a call (VAD window, turn detector, keypad) is
``workers/ai/caller.py``, the model's audio on its way out (backlog, barge-in, holds)
``workers/ai/playback.py``, what was sent to the model (replay, crash journal) the call's
``workers/ai/live/outbox.py``; this module ticks, attaches and detaches calls and dispatches the Live
layer's typed events (``workers/ai/live/events.py``) with ``match``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.config import Config
from shm.audio import DOWN_BYTES_PER_MS, TICK_SECONDS, UP_BYTES_PER_MS, UP_FRAME
from shm.segment import ShardSegment, ShmError, Slot
from workers.ai.call import Call, Live, LiveFactory
from workers.ai.caller import CallerTurn, quiet_tail, silent
from workers.ai.clock import phase_locked
from workers.ai.consent import ConsentGate
from workers.ai.greeting import PromptCache
from workers.ai.ivr import DegradePrompts, Ivr
from workers.ai.live.events import (
    AudioOut,
    Interrupted,
    LiveEvent,
    ResumeHandle,
    StateChanged,
    ToolCall,
    ToolCallCancellation,
    Transcript,
    TurnComplete,
    Usage,
)
from workers.ai.live.outbox import Outbox, journal_path, remove_stale
from workers.ai.live.settings import ClientSettings, LiveOptions, client_settings
from workers.ai.playback import Playback, PlaybackStats
from workers.ai.recording import Recordings
from workers.ai.records import CallRecorder
from workers.ai.secure_entry import SecureEntries
from workers.ai.tenants import TenantProfiles
from workers.ai.turn_metrics import TurnClock, mark_speech
from workers.ai.turns import Decision, TurnEvent, TurnParams
from workers.ai.vad import SAMPLE_RATE, BatchedVad
from workers.levels import mean_square_of_dbfs

log = logging.getLogger(__name__)



@dataclass
class WorkerStats(PlaybackStats):
    """Process-wide counters (totals) for logs, tests and benchmarks."""

    ticks: int = 0
    late_ticks: int = 0  # ticks that started more than one tick late
    sessions_opened: int = 0
    sessions_closed: int = 0
    session_errors: int = 0
    frames_in: int = 0
    activity_starts: int = 0
    activity_ends: int = 0
    tick_seconds: float = 0.0  # wall time spent inside ticks


def _import_sdk() -> None:
    """The slow part of the Live layer's start-up (run in a thread)."""
    import google.genai.errors
    import google.genai.live
    import google.genai.types  # noqa: F401

    import workers.ai.live.session  # noqa: F401


class AiWorker:
    """The AI worker of one shard. ``await run(stop)``; everything else is called from the loop."""

    def __init__(self, cfg: Config, segment: ShardSegment, *, live_factory: LiveFactory | None = None,
                 settings: ClientSettings | None = None, prompts: PromptCache | None = None,
                 vad: BatchedVad | None = None, journal_dir: Path | None = None, shard: int = 0) -> None:
        self.cfg = cfg
        self.seg = segment
        self._live_factory = live_factory
        self._journal_dir = journal_dir
        self._live_ready = live_factory is not None
        self._warm_task: asyncio.Task[None] | None = None
        self._settings = settings
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
        self._background: set[asyncio.Task[bytes]] = set()
        self._greeting = b""
        self._hold = b""
        self.tenants = TenantProfiles(cfg)  # per tenant: model section, tools, greeting (tenants.py)
        self.tools = self.tenants.default.tools
        self.records = CallRecorder(cfg, shard)  # the call record's items (workers/ai/records.py)
        self.ivr = Ivr(cfg, DegradePrompts(cfg.degrade, self.prompts, cfg.model.language), self.records,
                       self.tenants)  # what the caller hears while the model is down (workers/ai/ivr.py)
        self.recordings = Recordings(cfg, shard, self.records.event)  # call audio (workers/ai/recording.py)
        self.secure = SecureEntries(self.records)  # PCI keypad entry (workers/ai/secure_entry.py)
        self.consent = ConsentGate(cfg, self.records)  # opt-in consent step (workers/ai/consent.py)
        for profile in self.tenants.all():
            self.records.wire_tools(profile.tools, self.calls)
            profile.own_tool_key()  # a tenant's tools_secret signs instead of the webhook key

    # ---- lifecycle -------------------------------------------------------------------------------
    async def prepare(self) -> None:
        """Before taking calls: synthesise (or load from cache) the greeting and hold prompts."""
        m = self.cfg.model
        await self.tenants.prepare(self.prompts)
        await self.consent.prepare(self.prompts)
        self._greeting = self.tenants.default.greeting
        if m.hold_prompt:
            self._hold = await self.prompts.get_async(m.hold_prompt, m.language)
        await self.ivr.prepare()

    async def warm_up(self) -> None:
        """Make the Live layer ready without stalling the loop: the SDK import (0.5-2 s) runs in a
        thread while the loop already ticks (heartbeat, uplink, VAD, outbox); done lazily inside a
        tick it blocked the loop past the heartbeat timeout on a loaded box."""
        if self._live_ready:
            return
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(_import_sdk)
            # the SDK's first objects, on the loop thread (the SDK client may bind to it)
            from workers.ai.live.client import live_config, sdk_client
            from workers.ai.live.session import LiveSession

            m = self.cfg.model
            self._live_factory = LiveSession
            live_config(m, LiveOptions(m.voice, m.language, m.system_instruction), manual=True)
            sdk_client(self.settings, m.api_version)
        except Exception as exc:  # best effort: the first call pays instead
            log.warning("Live layer warm-up failed", extra={"error": str(exc)})
        log.info("Live layer warmed up", extra={"seconds": round(time.perf_counter() - t0, 3)})
        self._live_ready = True

    @property
    def settings(self) -> ClientSettings:
        if self._settings is None:
            self._settings = client_settings(self.cfg)
        return self._settings

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
            next_t = phase_locked(self.seg, next_t + TICK_SECONDS, loop.time())
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

    async def shutdown(self) -> None:
        """Close every Live session (the worker is stopping; the calls live on in the slot table)."""
        for idx in list(self.calls):
            self._close_call(idx, reason="worker stopping")
        if self._closing:
            await asyncio.wait(self._closing, timeout=5.0)
        await self.tenants.aclose()
        self.records.close()
        await asyncio.to_thread(self.recordings.close)

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
                    call.awaiting_live = False
                    self._start_live(call, call.handle or None)
                self._uplink(call, batches)
                self._maybe_retry(call, now)
                self.ivr.tick(call, now)
                if events:
                    sent = self.records.dtmf_counter(call)
                    call.keypad_events()
                    self.records.keypad_sent(call, sent)
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
                    det = call.caller.detector
                    quiet = quiet_tail(chunk, self._gate_ms) if det.speaking else 0
                    ev = det.feed(float(p), end, playing=call.playback.playing(), quiet_tail=quiet)
                    if ev is not None:
                        self._on_turn(call, ev)
                except Exception as exc:
                    self._call_failed(call, exc)
        for call in list(self.calls.values()):
            try:
                c = call.caller
                if c.detector.speaking:
                    rest = c.window.remainder()
                    if rest.size == 0 or silent(rest, self._gate_ms):
                        ev = c.detector.silent_until(c.window.position)
                        if ev is not None:
                            self._on_turn(call, ev)
                call.playback.settle_hold(now, c.detector.speaking)
                if call.playback.pending:
                    call.playback.drain()
            except Exception as exc:
                self._call_failed(call, exc)

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
            except Exception:
                log.exception("cannot open call", extra={"slot": slot.index, "session": info.session_id})
                self.stats.session_errors += 1

    def _open_call(self, slot: Slot, generation: int, session_id: str, options: Mapping[str, object]) -> None:
        m = self.cfg.model
        call = Call(slot=slot, generation=generation, session_id=session_id, options=dict(options),
                    caller=CallerTurn.new(self.params, self._preroll_keep_ms, m.dtmf_flush_ms),
                    outbox=self._open_outbox(slot, generation, session_id),
                    last_event=TurnClock(slot, generation, self.seg.histograms("ai"), session_id))
        call.playback = Playback(slot, call.current, self.stats, self._confirm_s, call.last_event)
        self.calls[slot.index] = call
        self.stats.sessions_opened += 1
        self.vad.reset(call.key)
        handle = slot.resume_handle or str(options.get("resume_handle") or "")
        fresh = not handle and not slot.model_state  # never attached by any AI worker before
        self.records.attached(call, fresh=fresh)
        self.recordings.attached(call)
        consent_prompt = self.consent.attach(call, fresh=fresh)  # played after the greeting
        log.info("call attached", extra={"session": session_id, "slot": slot.index, "resume": bool(handle),
                                         "replay_items": len(call.outbox.replay()),
                                         "live_ready": self._live_ready})
        if fresh:
            greeting = self._greeting_for(call) + consent_prompt
            if greeting:
                call.playback.protect(greeting)
            self.secure.at_start(call, self.tenants.of(call.options))
        else:
            call.playback.protect_until = slot.protect_until  # restarted worker: the greeting may still play
        if call.outbox.open_turn:  # a previous worker died mid-utterance: the turn continues
            call.caller.resume()
        if not self._live_ready:
            call.awaiting_live = True
            call.handle = handle
            call.set_model_state("connecting")
            return
        self._start_live(call, handle or None)

    def _open_outbox(self, slot: Slot, generation: int, session_id: str) -> Outbox:
        chunk = UP_BYTES_PER_MS * self.cfg.model.chunk_ms
        if self._journal_dir is not None:
            try:
                return Outbox.open(journal_path(self._journal_dir, self.seg.name, slot.index, generation),
                                   chunk)
            except OSError as exc:
                log.warning("no turn journal for this call", extra={"session": session_id, "error": str(exc)})
        return Outbox(chunk)

    def _greeting_for(self, call: Call) -> bytes:
        profile = self.tenants.of(call.options)
        text = call.options.get("greeting")
        if text is None:
            return profile.greeting
        if not text:
            return b""
        lang = call.opt("language", profile.model.language)
        cached = self.prompts.cached(str(text), lang)
        if cached is None:  # synthesise in the background; the tenant's greeting plays now
            task = asyncio.get_running_loop().create_task(self.prompts.get_async(str(text), lang))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return profile.greeting
        return cached

    def _start_live(self, call: Call, handle: str | None) -> None:
        """Open the call's Live session; it sends what the outbox holds that no handle covers."""
        if self._live_factory is None:
            from workers.ai.live.session import LiveSession

            self._live_factory = LiveSession
        profile = self.tenants.of(call.options)
        m = profile.model_for(str(call.options.get("model") or ""))
        opts = LiveOptions(voice=call.opt("voice", m.voice), language=call.opt("language", m.language),
                           system_instruction=call.opt("system_instruction", m.system_instruction),
                           resume_handle=handle, tools=profile.tool_decls)
        call.set_model_state("connecting")
        call.start_failed = False
        try:
            call.live = self._live_factory(m, call.session_id, opts,
                                           functools.partial(self._on_live_event, call),
                                           settings=profile.settings(self.settings), outbox=call.outbox)
        except Exception as exc:  # bad options or config: keep the call, retry later
            call.live = None
            call.start_failed = True
            log.exception("cannot create the Live session", extra={"session": call.session_id})
            self._degraded(call, f"cannot create the Live session: {exc}")
            return
        replay = call.outbox.replay()
        if replay:
            n = call.outbox.uncovered_audio_bytes
            call.slot.counters.add("frames_replayed", n // UP_FRAME)
            log.info("replaying unconfirmed input", extra={"session": call.session_id, "items": len(replay),
                                                           "bytes": n, "open": call.outbox.open_turn})
        call.start_task = asyncio.get_running_loop().create_task(self._run_start(call, call.live))

    async def _run_start(self, call: Call, live: Live) -> None:
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
        if call.playback.hold_seq is not None:  # nobody settles it now: let the media worker play on
            with contextlib.suppress(ShmError):
                if call.slot.is_current(call.generation):
                    call.playback.end_hold()
        # the call goes on (worker stopping or re-opening): keep its journal for the next worker
        call.outbox.close(remove=not call.slot.is_current(call.generation))
        self.stats.sessions_closed += 1
        self.records.closed(call)
        self.recordings.closed(call)
        self.secure.closed(call)
        log.info("call detached", extra={"session": call.session_id, "slot": idx, "reason": reason})
        if isinstance(call.last_event, TurnClock):
            call.last_event.close(reason)  # its open turn spans (appliance/tracing.py)
        self._stop_live(call)

    def _stop_live(self, call: Call) -> None:
        live, call.live = call.live, None
        self.tenants.of(call.options).tools.cancel_all(call.key)  # its session is going away
        if call.start_task is not None and not call.start_task.done():
            call.start_task.cancel()
        if live is None:
            return
        task = asyncio.get_running_loop().create_task(self._close_live(call.session_id, live))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_live(session_id: str, live: Live) -> None:
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

    # ---- uplink, turns and keypad: what goes to the model ------------------------------------------
    def _uplink(self, call: Call, batches: list[list[tuple[Call, np.ndarray, int]]]) -> None:
        data, _ = call.slot.uplink.read_frames(UP_FRAME)  # every whole frame queued, one cursor round
        if not data:
            return
        self.stats.frames_in += len(data) // UP_FRAME
        self.recordings.caller_audio(call, data)
        windows = call.caller.push(data)
        if call.caller.sending:
            call.send_audio(data)
        for k, (chunk, end) in enumerate(windows):
            if k == len(batches):
                batches.append([])
            batches[k].append((call, chunk, end))
        if windows:
            call.slot.counters.add("vad_frames", len(windows))

    def _on_turn(self, call: Call, ev: TurnEvent) -> None:
        mark_speech(call.last_event, ev, call.caller.window.position, time.monotonic())
        if ev.decision is Decision.ACTIVITY_START:
            if ev.barge_in or call.playback.playing():
                call.playback.barge_in()
                self.records.barge_in(call)
            call.caller.sending = True
            self.stats.activity_starts += 1
            call.slot.counters.add("turns")
            call.send_mark(True)
            call.last_event["activity_start"] = time.monotonic()
            self.records.turn_start(call, ev.sample - ev.onset)
            onset = ev.onset - self.params.samples(self.params.preroll_ms)
            call.send_audio(call.caller.preroll.since(onset))
        else:
            call.caller.sending = False
            self.stats.activity_ends += 1
            call.send_mark(False)
            call.last_event["activity_end"] = time.monotonic()
            call.slot.counters.add("speech_ms", (ev.sample - ev.onset) * 1000 // SAMPLE_RATE)
            self.records.turn_end(call, (ev.sample - ev.onset) * 1000 // SAMPLE_RATE)

    # ---- Live events -----------------------------------------------------------------------------
    def _on_live_event(self, call: Call, ev: LiveEvent) -> None:
        """Called by the Live session for each event (on this loop). Never raises into the session."""
        if call.closed:
            return
        try:
            match ev:
                case AudioOut(pcm24k=pcm):
                    call.slot.counters.add("audio_received_ms", len(pcm) // DOWN_BYTES_PER_MS)
                    call.playback.model_audio(pcm)
                    self.records.model_audio(call)
                case Interrupted():
                    call.playback.interrupted()
                    self.records.model_turn_done(call, interrupted=True)
                case TurnComplete():
                    call.playback.turn_complete()
                    self.records.model_turn_done(call, interrupted=False)
                case Transcript(role=role, text=text, final=True) if call.current():
                    call.slot.transcript = f"{role}: {text}"
                    self.records.transcript(call, role, text)
                case Usage(prompt_tokens=p, response_tokens=r):
                    call.slot.counters.add("input_tokens", p)
                    call.slot.counters.add("output_tokens", r)
                    self.records.usage(call, ev)
                case ResumeHandle(handle=handle) if handle and call.current():
                    try:
                        call.slot.resume_handle = handle
                    except ShmError as exc:
                        log.warning("resume handle too long for the slot",
                                    extra={"session": call.session_id, "error": str(exc)})
                case StateChanged(state=state, reason=reason):
                    self._model_state(call, state, reason)
                case ToolCall(calls=calls):
                    profile = self.tenants.of(call.options)
                    if rest := self.secure.intercept(call, profile, calls):
                        call.tool_calls(profile.tools, rest)
                case ToolCallCancellation(ids=ids):
                    self.secure.cancelled(call, ids)
                    n = self.tenants.of(call.options).tools.cancel(call.key, list(ids))
                    log.info("tool calls cancelled by the model", extra={"session": call.session_id,
                                                                          "running": n})
        except Exception as exc:
            self._call_failed(call, exc)

    def _model_state(self, call: Call, state: str, reason: str) -> None:
        call.set_model_state(state)
        self.records.model_state(call, state, reason)
        if state == "degraded":
            self._degraded(call, reason)
        elif state == "live":
            call.hold_played = False
            call.retry_at = 0.0
        elif state == "reconnecting":
            call.slot.counters.add("reconnects")
            self.tenants.of(call.options).tools.cancel_all(call.key)  # died with the connection
        elif state == "closed" and not call.closed:
            # the session ended on its own (e.g. the server sent garbage): re-open it soon
            call.start_failed = True
            call.caller.sending = False
            if not call.retry_at:
                call.retry_at = time.monotonic() + 0.5
            log.warning("Live session ended; re-opening",
                        extra={"session": call.session_id, "reason": reason})

    # ---- degradation -----------------------------------------------------------------------------
    def _degraded(self, call: Call, reason: str) -> None:
        if call.ivr is not None and call.ivr.ending:  # saying goodbye: no more hold, no more retries
            return
        menu = self.ivr.degraded(call, time.monotonic())  # tiers: notice, wait, keypad menu (ivr.py)
        call.degraded(reason, b"" if menu else self._hold, self.cfg.model.degraded_retry_seconds)

    def _maybe_retry(self, call: Call, now: float) -> None:
        if call.retry_at and now >= call.retry_at and not call.live_ok():
            call.retry_at = now + self.cfg.model.degraded_retry_seconds
            handle = call.slot.resume_handle or (call.live.resume_handle if call.live else None)
            log.info("re-opening the Live session", extra={"session": call.session_id})
            self._stop_live(call)
            self._start_live(call, handle or None)
