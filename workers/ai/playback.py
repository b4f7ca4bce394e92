"""One call's model audio on its way to the caller: the local backlog, the downlink ring, barge-in and the
media worker's playback holds (docs/architecture.md, "Barge-in" and "Playback holds").

Model audio (24 kHz) is written in whole 20 ms frames as far as the ring has room, never blocking; a
local backlog absorbs bursts larger than the ring, beyond ``MAX_BACKLOG_BYTES`` it is dropped and
counted. The greeting (the AI disclosure) is not interruptible: its end is a downlink cursor
(``protect_until``, published in the slot). A hold is settled once per tick: confirmed speech flushes
the ring and then releases it, no speech within ``vad.pause_confirm_ms`` releases it untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Protocol

from shm.audio import DOWN_BYTES_PER_SECOND, DOWN_FRAME
from shm.segment import Slot

MAX_BACKLOG_BYTES = 60 * DOWN_BYTES_PER_SECOND  # 60 s of model audio queued locally per call


@dataclass
class PlaybackStats:
    """Process-wide playback counters (one instance shared by every call of a worker)."""

    frames_out: int = 0
    downlink_dropped_bytes: int = 0
    barge_ins: int = 0
    pauses_confirmed: int = 0
    pauses_released: int = 0


class PlaybackTap(Protocol):
    """Who hears what the caller is played (the call's recording): audio queued, and queued audio dropped."""

    def played(self, pcm24k: bytes) -> None: ...
    def flushed(self) -> None: ...


class Playback:
    """Model audio of one (slot, generation); ``current()`` says whether the slot is still this call's."""

    __slots__ = ("_confirm_s", "_play_at", "_stats", "current", "hold_deadline", "hold_seq", "last_event",
                 "model_turn", "pending", "protect_until", "slot", "suppress", "tap")

    def __init__(self, slot: Slot, current: Callable[[], bool], stats: PlaybackStats, confirm_s: float,
                 last_event: MutableMapping[str, float]) -> None:
        self.slot = slot
        self.current = current
        self._stats = stats
        self._confirm_s = confirm_s
        self.last_event = last_event
        self.pending = bytearray()  # model audio not yet in the ring
        self.tap: PlaybackTap | None = None  # the call's recording (workers/ai/recording.py), if any
        self.model_turn = False  # model audio arrived since the last turnComplete/interrupted
        self.suppress = False  # barge-in: drop the rest of the interrupted model turn
        self.protect_until = 0  # downlink write cursor up to which audio is the (uninterruptible) greeting
        self.hold_seq: int | None = None  # the media worker's playback hold being settled
        self.hold_deadline = 0.0  # ... released as a false alarm at this monotonic time
        # downlink read cursor past which the media worker has taken the answer's first byte (0: none
        # pending): its crossing is the turn's "playback" moment (trace event; seen one tick late at most)
        self._play_at = 0

    def playing(self) -> bool:
        """Model audio queued, in the ring or still arriving (caller speech now is a barge-in)."""
        if self.pending or self.model_turn:
            return True
        ring = self.slot.downlink
        return ring.free_space() < ring.capacity

    # --- writing ------------------------------------------------------------------------------------
    def queue(self, pcm: bytes) -> None:
        """Prompt audio (greeting, "please hold"): queued behind whatever plays."""
        if self.tap is not None:
            self.tap.played(pcm)
        self.pending += pcm
        self.drain()

    def protect(self, greeting: bytes) -> None:
        """Queue the greeting of a new call and publish its end before any of it is readable."""
        self.protect_until = self.slot.downlink.write_cursor + len(greeting)
        self.slot.protect_until = self.protect_until
        self.queue(greeting)

    def drain(self) -> None:
        """Write whole frames of queued model audio as far as the ring has room."""
        if not self.current():
            self.pending.clear()
            return
        ring = self.slot.downlink
        n = min(len(self.pending), ring.free_space()) // DOWN_FRAME * DOWN_FRAME
        if n and ring.write(memoryview(self.pending)[:n]):
            del self.pending[:n]
            self._stats.frames_out += n // DOWN_FRAME
        extra = len(self.pending) - MAX_BACKLOG_BYTES
        if extra > 0:
            extra = (extra + DOWN_FRAME - 1) // DOWN_FRAME * DOWN_FRAME
            del self.pending[:extra]
            self._stats.downlink_dropped_bytes += extra

    # --- the model's turn ---------------------------------------------------------------------------
    def model_audio(self, pcm: bytes) -> None:
        if self.suppress:
            return
        if not self.model_turn:
            self.model_turn = True
            self.last_event["first_audio"] = time.monotonic()
            self._play_at = self.slot.downlink.write_cursor + len(self.pending) + 1
        pcm = pcm[:-1] if len(pcm) % 2 else pcm
        if self.tap is not None:
            self.tap.played(pcm)
        self.pending += pcm
        self.drain()

    def interrupted(self) -> None:
        """The model stopped its turn (it heard the caller): what is queued must not play."""
        ring = self.slot.downlink
        if self.current() and ring.read_cursor >= self.protect_until:
            if self.pending or ring.free_space() < ring.capacity:
                ring.request_flush()
                self._play_at = 0
                if self.tap is not None:
                    self.tap.flushed()
                self.last_event["interrupted"] = time.monotonic()
                self.end_hold(confirmed=True)
            self.pending.clear()
        self.model_turn = False
        self.suppress = False

    def turn_complete(self) -> None:
        if self.model_turn and not self.suppress:
            rem = len(self.pending) % DOWN_FRAME  # pad the last partial frame with silence so it plays
            if rem:
                self.pending += bytes(DOWN_FRAME - rem)
            self.drain()
        self.model_turn = False
        self.suppress = False
        self.last_event["turn_complete"] = time.monotonic()

    def barge_in(self) -> None:
        """The caller talks over the model: flush the downlink (not the greeting), drop the turn's rest."""
        ring = self.slot.downlink
        if ring.read_cursor < self.protect_until:  # the AI disclosure is still playing
            return
        if not self.pending and not self.model_turn and ring.free_space() == ring.capacity:
            return
        ring.request_flush()
        self._play_at = 0
        if self.tap is not None:
            self.tap.flushed()
        self.pending.clear()
        if self.model_turn:
            self.suppress = True
        self._stats.barge_ins += 1
        self.last_event["barge_in"] = time.monotonic()
        self.slot.counters.add("interruptions")
        self.end_hold(confirmed=True)

    # --- playback holds (the media worker's provisional barge-in) -----------------------------------
    def settle_hold(self, now: float, speaking: bool) -> None:
        """Once per tick, after the VAD: confirm, keep or release the media worker's playback hold
        (and note when the media worker started playing the answer)."""
        if self._play_at and self.slot.downlink.read_cursor >= self._play_at:
            self._play_at = 0
            self.last_event["playback"] = now
        hold, release = self.slot.hold_words()
        if hold == release:
            self.hold_seq = None
            return
        if self.hold_seq != hold:  # a new hold (or one found in the slot after a restart)
            self.hold_seq = hold
            self.hold_deadline = now + self._confirm_s
            self.last_event["pause"] = now
        if not self.playing():
            self.end_hold()  # nothing left to hold (flushed, interrupted, or never started)
        elif speaking:
            self.barge_in()  # the caller's turn is open: talking over the model is a barge-in
            if self.hold_seq is not None:  # not flushable (the greeting): play on
                self.end_hold()
        elif now >= self.hold_deadline:
            self.end_hold(released=True)

    def end_hold(self, *, confirmed: bool = False, released: bool = False) -> None:
        """Release the current hold, if any (after any flush it needs: the media worker resumes reading)."""
        hold, release = self.slot.hold_words()
        if hold == release:
            self.hold_seq = None
            return
        self.slot.release_hold(hold)
        self.hold_seq = None
        if confirmed:
            self._stats.pauses_confirmed += 1
            self.slot.counters.add("pauses_confirmed")
        elif released:
            self._stats.pauses_released += 1
            self.slot.counters.add("pauses_released")
            self.last_event["resume"] = time.monotonic()
