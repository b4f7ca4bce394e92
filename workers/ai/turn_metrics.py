"""Turn latency metrics of the AI worker, recorded into the shard's histogram block (shm/histograms.py).

The worker already keeps ``call.last_event[name] = time.monotonic()`` at the points that bound each
stage; :class:`TurnClock` is that dict, and turns the readings into observations as they are stored, so
the worker needs no other call site than :func:`mark_speech` (the caller's speech onset/end in wall
time, from the turn detector's sample positions). Events happen a few times per turn, never per frame:
the cost is one Python ``__setitem__`` plus ~0.7 µs per observation.

Stages (``va_turn_latency_seconds{stage}``): ``turn_end`` = caller's last speech → ``activityEnd`` sent;
``model_first_audio`` = ``activityEnd`` → first model audio of the answer; ``barge_in`` = caller's speech
onset → the model audio stopped for the caller (the media worker's playback pause, as the worker sees it
one tick later, or the flush when no pause came first). The answer's first-audio and speech-end clock
readings go into the slot (``Slot.set_answer``) for the media worker's ``playout`` and E2E stages.

Clock: a detector sample position ``s`` maps to wall time ``now - (position - s) / 16 kHz``: the newest
uplink frame was read this tick, the media worker's lead + 2-3 ms after it was written
(docs/architecture.md "AI tick phase"). So these stages start when the caller's audio reached the media
worker's tick, not when the caller sent it: the media tick's wait (0-20 ms) is not in them (``e2e`` has
the same origin).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from appliance import tracing
from shm.histograms import ShardHistograms
from shm.segment import Slot
from workers.ai.turns import Decision

SAMPLE_RATE = 16_000
MAX_STAGE_S = 30.0  # a stage longer than this pairs readings of different turns: not observed
BARGE_IN_MAX_S = 3.0
# the energy-gated pause may come before Silero places the onset (a quiet start of the word): the same
# talk-over if within this much
PAUSE_BEFORE_ONSET_S = 0.5


def mark_speech(times: MutableMapping[str, float], ev: Any, position: int, now: float) -> None:
    """Store the caller's speech onset (``speech_start``) or end (``speech_end``) of turn event ``ev``."""
    if ev.decision is Decision.ACTIVITY_START:
        times["speech_start"] = now - (position - ev.onset) / SAMPLE_RATE
    elif ev.speech_end:
        times["speech_end"] = now - (position - ev.speech_end) / SAMPLE_RATE
    else:  # a forced end (closing, reconnect): no speech end to time from
        times.pop("speech_end", None)


class TurnClock(dict[str, float]):
    """``call.last_event``: a ``name → time.monotonic()`` dict that records stage latencies."""

    __slots__ = ("_answered", "_barged", "_done", "_gen", "_hist", "_played", "_prev", "_sid", "_slot",
                 "_span", "_span_answered")

    def __init__(self, slot: Slot, generation: int, hist: ShardHistograms, session_id: str = "") -> None:
        super().__init__()
        self._slot, self._gen, self._hist, self._sid = slot, generation, hist, session_id
        self._span: Any = None  # the open turn's trace span (appliance/tracing.py; None when off)
        self._prev: Any = None  # the previous turn, while the caller talks over its answer
        self._span_answered = False
        self._done: Any = None  # a turn whose model turn completed before its answer started playing
        self._played = False  # the open turn's answer reached the media worker ("playback")
        self._answered = True  # no caller turn awaits an answer (the greeting is not one)
        self._barged = 0.0  # onset whose barge-in was timed

    def __setitem__(self, name: str, value: float) -> None:
        super().__setitem__(name, value)
        try:
            if self._sid and tracing.enabled():
                self._trace(name, value)
            match name:
                case "activity_end":
                    end = self.get("speech_end")
                    if end is not None and 0.0 <= value - end < MAX_STAGE_S:
                        self._hist.observe("turn_end", value - end)
                    self._answered = False
                case "first_audio":
                    self._first_audio(value)
                case "barge_in":
                    self._barge_in(value)
        except Exception:  # metrics never break a call (a closed segment during shutdown, ...)
            pass

    def _trace(self, name: str, t: float) -> None:
        """One span per caller turn: speech onset → the end of its answer (turnComplete / interrupted, or
        the answer's ``playback`` when the model finished sending before the media worker started
        playing it). A caller who talks over the answer opens the next turn at once; the barge-in and
        ``interrupted`` then belong to the turn whose answer they cut (``_prev``)."""
        match name:
            case "speech_start":
                if self._done is not None:  # its answer never played (flushed): ends here
                    tracing.end(self._done, t)
                    self._done = None
                if self._span is not None and self._span_answered:
                    tracing.end(self._prev, t)
                    self._prev = self._span  # its answer is still playing
                else:
                    tracing.end(self._span, t)
                self._span = tracing.start_child(self._sid, "turn", at=t)
                self._span_answered = False
            case "activity_end" | "dtmf_sent":
                tracing.event(self._span, name, at=t)
            case "first_audio":
                tracing.event(self._span, "model_first_audio", at=t)
                self._span_answered = self._span is not None
                self._played = False
            case "playback":  # the media worker took the answer's first audio
                target = self._prev or self._done or (self._span if self._span_answered else None)
                tracing.event(target, name, at=t)
                self._played = True
                if target is not None and target is self._done:
                    tracing.end(target, t)
                    self._done = None
            case "barge_in":
                tracing.event(self._prev or self._span, name, at=t)
            case "interrupted" | "turn_complete":
                if self._prev is not None:
                    tracing.event(self._prev, name, at=t)
                    tracing.end(self._prev, t)
                    self._prev = None
                elif self._span is not None and self._span_answered:
                    tracing.event(self._span, name, at=t)
                    if name == "turn_complete" and not self._played:
                        self._done = self._span  # ends at its playback (or the next turn)
                    else:
                        tracing.end(self._span, t)
                    self._span = None

    def close(self, reason: str) -> None:
        """The call left this worker: end its open turn spans (they would never be exported)."""
        if self._sid and tracing.enabled():
            for span in (self._done, self._prev, self._span):
                tracing.end(span, reason=reason)
        self._done = self._prev = self._span = None

    def _first_audio(self, t: float) -> None:
        if self._answered:
            return
        self._answered = True
        t_end = self.get("activity_end", t)
        if 0.0 <= t - t_end < MAX_STAGE_S:
            self._hist.observe("model_first_audio", t - t_end)
        speech_end = self.get("speech_end", 0.0)
        if self._slot.is_current(self._gen):
            self._slot.set_answer(int(speech_end * 1e9) if speech_end else 0, int(t * 1e9))

    def _barge_in(self, t: float) -> None:
        onset = self.get("speech_start")
        if onset is None or onset == self._barged or not 0.0 <= t - onset < BARGE_IN_MAX_S:
            return  # a keypad entry's flush, or this onset was timed already
        self._barged = onset
        silent = t
        pause = self.get("pause")
        if pause is not None and onset - PAUSE_BEFORE_ONSET_S <= pause <= t:
            silent = pause  # the media worker had paused playback already
        self._hist.observe("barge_in", max(0.0, silent - onset))
