"""RTP (RFC 3550) parsing/building, receiver statistics, and RFC 4733 DTMF events.

Why hand-written: the hot path needs one ``struct.unpack_from`` per packet and strict validation with a
*reason* for every drop (for counters); RTP libraries either allocate several objects per packet
(aiortc's RtpPacket parses extensions eagerly) or do no validation. The statistics follow RFC 3550
appendix A.1 (sequence validation with probation, extended sequence numbers), A.3 (expected/lost) and
A.8 (interarrival jitter) literally, so the numbers match what any RTP stack reports.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shm.audio import DTMF_EVENTS

RTP_VERSION = 2
MIN_HEADER = 12
MAX_PACKET = 1500  # anything bigger is not from Janus on loopback: dropped as "giant"
_HDR = struct.Struct("!BBHII")

RTP_SEQ_MOD = 1 << 16
MAX_DROPOUT = 3000
MAX_MISORDER = 100
MIN_SEQUENTIAL = 2
MAX_TRANSIT_STEP_S = 3  # larger transit steps are timestamp discontinuities, not jitter (update_jitter)


class RtpError(ValueError):
    """A packet that is not valid RTP; ``reason`` is a short counter key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class RtpPacket:
    """One parsed RTP packet (payload is a slice copy; padding and extension removed)."""

    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 demultiplexing: RTCP packet types 192-223 occupy the second byte."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def parse_rtp(data: bytes | memoryview) -> RtpPacket:
    """Parse and validate one RTP packet; raise :class:`RtpError` with a reason otherwise."""
    n = len(data)
    if n < MIN_HEADER:
        raise RtpError("truncated")
    if n > MAX_PACKET:
        raise RtpError("giant")
    b0, b1, seq, ts, ssrc = _HDR.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        raise RtpError("version")
    if 192 <= b1 <= 223:
        raise RtpError("rtcp")
    offset = MIN_HEADER + 4 * (b0 & 0x0F)
    if offset > n:
        raise RtpError("truncated")
    if b0 & 0x10:  # header extension: 16-bit profile, 16-bit length in 32-bit words
        if offset + 4 > n:
            raise RtpError("truncated")
        (ext_words,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + 4 * ext_words
        if offset > n:
            raise RtpError("truncated")
    end = n
    if b0 & 0x20:
        pad = data[-1]
        if pad == 0 or offset + pad > n:
            raise RtpError("padding")
        end -= pad
    if end <= offset:
        raise RtpError("empty")
    return RtpPacket(b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, bytes(data[offset:end]))


def build_rtp(payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes,
              marker: bool = False) -> bytes:
    """One RTP packet without CSRCs, extension or padding."""
    return _HDR.pack(0x80, (payload_type & 0x7F) | (0x80 if marker else 0), sequence & 0xFFFF,
                     timestamp & 0xFFFFFFFF, ssrc & 0xFFFFFFFF) + payload


class SourceStats:
    """Per-SSRC receiver state: RFC 3550 A.1 validation, A.3 loss, A.8 jitter (in timestamp units)."""

    __slots__ = (
        "bad_seq",
        "base_seq",
        "clock_rate",
        "cycles",
        "expected_prior",
        "jitter",
        "max_seq",
        "probation",
        "received",
        "received_prior",
        "ssrc",
        "transit",
    )

    def __init__(self, ssrc: int, seq: int, clock_rate: int = 48000, probation: int = MIN_SEQUENTIAL) -> None:
        """``probation=0`` trusts the first packet (a source already checked by address)."""
        self.ssrc = ssrc
        self.clock_rate = clock_rate
        self.jitter = 0.0
        self.transit: int | None = None
        self._init_seq(seq)
        self.max_seq = (seq - 1) & 0xFFFF
        self.probation = probation
        if probation == 0 and seq == 0:
            self.cycles = -RTP_SEQ_MOD  # the first update wraps max_seq 65535 → 0 and lands on cycle 0

    def _init_seq(self, seq: int) -> None:
        self.base_seq = seq
        self.max_seq = seq
        self.bad_seq = RTP_SEQ_MOD + 1
        self.cycles = 0
        self.received = 0
        self.received_prior = 0
        self.expected_prior = 0

    def update_seq(self, seq: int) -> int | None:
        """RFC 3550 A.1 ``update_seq``: the extended sequence number, or None if the packet is not valid
        (still on probation, or a jump that must be confirmed by the next packet)."""
        udelta = (seq - self.max_seq) & 0xFFFF
        if self.probation:
            if seq == ((self.max_seq + 1) & 0xFFFF):
                self.probation -= 1
                self.max_seq = seq
                if self.probation == 0:
                    self._init_seq(seq)
                    self.received += 1
                    return self.cycles + seq
            else:
                self.probation = MIN_SEQUENTIAL - 1
                self.max_seq = seq
            return None
        if udelta < MAX_DROPOUT:
            if seq < self.max_seq:
                self.cycles += RTP_SEQ_MOD
            self.max_seq = seq
        elif udelta <= RTP_SEQ_MOD - MAX_MISORDER:
            if seq == self.bad_seq:  # two sequential packets after a big jump: the source restarted
                self._init_seq(seq)
            else:
                self.bad_seq = (seq + 1) & 0xFFFF
                return None
        else:
            # duplicate or reordered packet: extended number relative to the current cycle
            ext = self.cycles + seq
            if seq > self.max_seq:
                ext -= RTP_SEQ_MOD
            self.received += 1
            return ext
        self.received += 1
        return self.cycles + seq

    def update_jitter(self, rtp_ts: int, arrival: int) -> None:
        """RFC 3550 A.8; ``arrival`` in the same timestamp units (clock_rate ticks)."""
        transit = (arrival - rtp_ts) & 0xFFFFFFFF
        if self.transit is not None:
            d = transit - self.transit
            if d > 0x7FFFFFFF:
                d -= 1 << 32
            elif d < -0x7FFFFFFF:
                d += 1 << 32
            # A step beyond MAX_TRANSIT_STEP_S is a timestamp discontinuity (a sender that re-based its
            # clock under the same SSRC, or a forged packet), not network jitter: re-anchor instead of
            # letting one packet push the estimate (and the MOS computed from it) to hours.
            if abs(d) <= MAX_TRANSIT_STEP_S * self.clock_rate:
                self.jitter += (abs(d) - self.jitter) / 16.0
        self.transit = transit

    @property
    def extended_max(self) -> int:
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        return self.extended_max - self.base_seq + 1

    @property
    def lost(self) -> int:
        """Cumulative packets lost (may be negative with duplicates, as RFC 3550 allows)."""
        return self.expected - self.received

    def jitter_seconds(self) -> float:
        return self.jitter / self.clock_rate


# ---- RFC 4733 telephone-event ------------------------------------------------------------------


def parse_telephone_event(payload: bytes) -> tuple[int, bool, int, int]:
    """(event, end, volume, duration) of an RFC 4733 payload; raises :class:`RtpError`."""
    if len(payload) < 4:
        raise RtpError("dtmf")
    event, flags, duration = struct.unpack_from("!BBH", payload)
    return event, bool(flags & 0x80), flags & 0x3F, duration


class DtmfReceiver:
    """Turns RFC 4733 packets into one event per key press (the end packet is sent three times)."""

    __slots__ = ("_done_ts", "_start_ts")

    def __init__(self) -> None:
        self._start_ts: int | None = None
        self._done_ts: int | None = None

    def feed(self, timestamp: int, payload: bytes) -> tuple[str, int] | None:
        """Return (digit, duration in timestamp units) once per event, at its first end packet."""
        event, end, _volume, duration = parse_telephone_event(payload)
        if event >= len(DTMF_EVENTS):
            return None  # flash and other events are not DTMF digits
        if not end or timestamp == self._done_ts:
            return None
        self._done_ts = timestamp
        return DTMF_EVENTS[event], duration
