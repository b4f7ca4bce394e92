"""Adaptive jitter buffer keyed by extended RTP sequence number.

Why hand-written: the buffer must drive the Opus decoder's three ways of producing a frame (normal decode,
in-band FEC from the *next* packet, concealment) and must not own a clock (the worker's tick does), which
no Python RTP library offers. It is a dict of at most a few dozen packets, so it is cheap.

Playout, one :meth:`JitterBuffer.pop` per frame the caller needs:
- *Buffering*: until ``target`` ms are queued nothing is played (``IDLE``).
- *Playing*: the packet with ``next_seq`` is played (``FRAME``); if it is missing but the one after it is
  here, the lost frame is rebuilt from that packet's in-band FEC (``FEC``); if nothing later is here
  either the packet may just be late, so the buffer *stalls* (``PLC`` without advancing, which grows the
  delay) for up to ``max_stall`` frames before declaring it lost. Later packets beyond a gap → ``PLC``
  and advance (a real loss).
- Adaptation: the target follows ``3 x interarrival jitter`` (RFC 3550 estimate, fed by the worker)
  between the configured target and ``max_ms``; every late arrival raises it by one frame (decaying
  after ``decay_frames`` without a late packet). If the queue stays above target + 1 frame for a
  second, one frame is dropped (time compression) to bring latency back down.
- A packet older than ``next_seq`` is *late* and dropped; one far ahead or far behind (a sequence
  jump or restart) or a long silence from the sender re-starts buffering.
"""

from __future__ import annotations

import math
from enum import Enum


class Kind(Enum):
    IDLE = 0  # nothing to play yet (buffering or sender silent)
    FRAME = 1  # decode ``payload``
    FEC = 2  # lost frame: decode_fec(``payload`` = the next packet)
    PLC = 3  # lost or late frame: conceal


class JitterBuffer:
    """Reordering, late drop, loss/late distinction and an adaptive target delay."""

    def __init__(self, target_ms: int = 40, max_ms: int = 120, frame_ms: int = 20,
                 max_stall: int = 2, decay_frames: int = 500) -> None:
        self.base_target_ms = target_ms
        self.max_ms = max(max_ms, target_ms)
        self.frame_ms = frame_ms
        self.max_stall = max_stall
        self.decay_frames = decay_frames
        self._buf: dict[int, bytes] = {}
        self.next_seq: int | None = None
        self.playing = False
        self._stalls = 0
        self._misses = 0
        self._above = 0
        self._late_bonus = 0
        self._since_late = 0
        self._jitter_ms = 0.0
        # counters
        self.late = 0
        self.duplicates = 0
        self.resets = 0
        self.shrinks = 0
        self.stalls = 0

    # -- sizing -------------------------------------------------------------------------------------
    @property
    def target_ms(self) -> int:
        adaptive = math.ceil(3 * self._jitter_ms / self.frame_ms) * self.frame_ms
        t = max(self.base_target_ms, adaptive) + self._late_bonus * self.frame_ms
        return min(self.max_ms, t)

    def set_jitter(self, jitter_seconds: float) -> None:
        """Feed the current RFC 3550 interarrival jitter estimate."""
        self._jitter_ms = jitter_seconds * 1000.0

    def set_frame_ms(self, frame_ms: int) -> None:
        if 0 < frame_ms <= 120:
            self.frame_ms = frame_ms

    def depth(self) -> int:
        """Frames queued from ``next_seq`` (or the oldest packet) to the newest, gaps included."""
        if not self._buf:
            return 0
        hi = max(self._buf)
        lo = self.next_seq if self.playing and self.next_seq is not None else min(self._buf)
        return max(0, hi - lo + 1)

    def __len__(self) -> int:
        return len(self._buf)

    # -- input --------------------------------------------------------------------------------------
    def put(self, ext_seq: int, payload: bytes) -> str:
        """Queue one packet; returns ``ok``, ``late``, ``duplicate`` or ``reset``."""
        max_frames = max(1, self.max_ms // self.frame_ms)
        if self.playing and self.next_seq is not None:
            if ext_seq < self.next_seq - 4 * max_frames - 50:
                # far behind: the sender restarted its sequence (RFC 3550 A.1 re-init), not a late packet
                self._reset()
                self._buf[ext_seq] = payload
                return "reset"
            if ext_seq < self.next_seq:
                self.late += 1
                self._late_bonus = min(self._late_bonus + 1, max_frames)
                self._since_late = 0
                return "late"
            if ext_seq >= self.next_seq + 4 * max_frames + 50:
                self._reset()
                self._buf[ext_seq] = payload
                return "reset"
        elif self._buf and abs(ext_seq - min(self._buf)) > 4 * max_frames + 50:
            self._reset()
        if ext_seq in self._buf:
            self.duplicates += 1
            return "duplicate"
        self._buf[ext_seq] = payload
        return "ok"

    def fill(self, ext_seq: int, payload: bytes) -> bool:
        """A redundant (RED) copy of packet ``ext_seq``: queued only if it is missing and still due."""
        if ext_seq in self._buf:
            return False
        if self.playing and self.next_seq is not None and ext_seq < self.next_seq:
            return False  # already played, concealed or recovered: too late
        if self._buf and not self.playing and ext_seq < min(self._buf) - 1:
            return False  # from before buffering started
        self._buf[ext_seq] = payload
        return True

    def _reset(self) -> None:
        self._buf.clear()
        self.playing = False
        self.next_seq = None
        self._stalls = self._misses = self._above = 0
        self.resets += 1

    # -- output -------------------------------------------------------------------------------------
    def pop(self) -> tuple[Kind, bytes | None]:
        """The next frame to produce (call once per frame of audio needed)."""
        target_frames = max(1, self.target_ms // self.frame_ms)
        self._since_late += 1
        if self._late_bonus and self._since_late >= self.decay_frames:
            self._late_bonus -= 1
            self._since_late = 0
        if not self.playing:
            if not self._buf or self.depth() < target_frames:
                return Kind.IDLE, None
            self.playing = True
            self.next_seq = min(self._buf)
            self._misses = 0
        assert self.next_seq is not None
        seq = self.next_seq
        payload = self._buf.pop(seq, None)
        if payload is not None:
            self.next_seq = seq + 1
            self._stalls = self._misses = 0
            self._maybe_shrink(target_frames)
            return Kind.FRAME, payload
        if not self._buf:
            # nothing later queued: late or the sender paused; conceal without advancing for a while
            self._misses += 1
            if self._stalls < self.max_stall:
                self._stalls += 1
                self.stalls += 1
                return Kind.PLC, None
            if self._misses > max(3, self.max_ms // self.frame_ms):
                self.playing = False  # a long silence: re-buffer when the sender resumes
                self.next_seq = None
                return Kind.IDLE, None
            self.next_seq = seq + 1
            return Kind.PLC, None
        self._stalls = 0
        self.next_seq = seq + 1
        nxt = self._buf.get(seq + 1)
        if nxt is not None:
            return Kind.FEC, nxt
        # a gap longer than one packet: skip straight to the oldest queued packet if far behind
        oldest = min(self._buf)
        if oldest - seq > self.max_ms // self.frame_ms:
            self.next_seq = oldest
        return Kind.PLC, None

    def _maybe_shrink(self, target_frames: int) -> None:
        depth = self.depth()
        if depth > max(target_frames + 1, 2):
            self._above += 1
            hard = depth > max(self.max_ms // self.frame_ms, target_frames + 1)
            if hard or self._above >= 1000 // self.frame_ms:
                assert self.next_seq is not None
                self._buf.pop(self.next_seq, None)
                self.next_seq += 1
                self.shrinks += 1
                self._above = 0
        else:
            self._above = 0
