"""RTP parsing/validation, RFC 3550 statistics, RFC 4733 DTMF, and a short fuzz of the parser."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.media.rtp import (
    DtmfReceiver,
    RtpError,
    SourceStats,
    build_rtp,
    is_rtcp,
    parse_rtp,
)


def test_build_parse_roundtrip() -> None:
    pkt = build_rtp(111, 65535, 0xFFFFFFFF, 0x12345678, b"abc", marker=True)
    p = parse_rtp(pkt)
    assert (p.payload_type, p.marker, p.sequence, p.timestamp, p.ssrc, p.payload) == (
        111, True, 65535, 0xFFFFFFFF, 0x12345678, b"abc")


def test_csrc_extension_and_padding_are_stripped() -> None:
    hdr = struct.pack("!BBHII", 0x80 | 0x20 | 0x10 | 2, 111, 7, 960, 1)
    csrcs = struct.pack("!II", 5, 6)
    ext = struct.pack("!HH", 0xBEDE, 1) + b"\x10\xff\x00\x00"
    pkt = hdr + csrcs + ext + b"opus" + b"\x00\x00\x03"
    p = parse_rtp(pkt)
    assert p.payload == b"opus" and p.sequence == 7


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x80\x6f", "truncated"),
        (b"\x40" + bytes(15), "version"),
        (b"\x80\xc8" + bytes(30), "rtcp"),
        (b"\x8f\x6f" + bytes(20), "truncated"),  # 15 CSRCs announced, not present
        (b"\x90\x6f" + bytes(10) + b"\x00\x00\x00\x09", "truncated"),  # extension longer than packet
        (b"\xa0\x6f" + bytes(10) + b"x\x00", "padding"),  # zero padding count
        (b"\xa0\x6f" + bytes(10) + b"\x09", "padding"),  # padding longer than packet
        (b"\x80\x6f" + bytes(10), "empty"),
        (b"\x80\x6f" + bytes(1600), "giant"),
    ],
)
def test_invalid_packets_have_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(RtpError) as err:
        parse_rtp(data)
    assert err.value.reason == reason


def test_rtcp_demux() -> None:
    assert is_rtcp(b"\x80\xc8\x00\x06") and not is_rtcp(build_rtp(111, 1, 1, 1, b"x"))


def test_stats_loss_reorder_and_wrap() -> None:
    s = SourceStats(ssrc=1, seq=65530, probation=0)
    seqs = [65530, 65531, 65533, 65532, 65535, 0, 1, 3, 4]  # 65534 and 2 lost, one reordered
    ext = [s.update_seq(q) for q in seqs]
    assert ext == [65530, 65531, 65533, 65532, 65535, 65536, 65537, 65539, 65540]
    assert s.expected == 11 and s.received == 9 and s.lost == 2


def test_stats_first_packet_seq_zero_and_probation() -> None:
    s = SourceStats(ssrc=1, seq=0, probation=0)
    assert s.update_seq(0) == 0 and s.update_seq(1) == 1 and s.lost == 0
    p = SourceStats(ssrc=2, seq=100)  # RFC 3550 probation: two in sequence before valid
    assert p.update_seq(100) is None and p.update_seq(101) == 101


def test_stats_big_jump_needs_confirmation() -> None:
    s = SourceStats(ssrc=1, seq=10, probation=0)
    assert s.update_seq(10) == 10
    assert s.update_seq(30000) is None  # a lone jump is dropped
    assert s.update_seq(11) == 11
    assert s.update_seq(40000) is None and s.update_seq(40001) == 40001  # a confirmed restart


def test_jitter_rfc3550() -> None:
    s = SourceStats(ssrc=1, seq=0, probation=0)
    # packets every 960 ticks, arrivals alternate ±480 ticks around nominal: |D| = 960 after the first
    for i in range(400):
        s.update_jitter(i * 960, i * 960 + (480 if i % 2 else 0))
    assert s.jitter == pytest.approx(480, rel=0.01)  # J converges to mean |D| = 480
    assert s.jitter_seconds() == pytest.approx(0.01, rel=0.01)


def test_timestamp_discontinuity_is_not_jitter() -> None:
    s = SourceStats(ssrc=1, seq=0, probation=0)
    for i in range(100):
        s.update_jitter(i * 960, i * 960)
    s.update_jitter(2**31, 100 * 960)  # same SSRC, timestamp base jumps (re-based sender or forgery)
    for i in range(101, 200):
        s.update_jitter(2**31 + (i - 100) * 960, i * 960 + (480 if i % 2 else 0))
    assert s.jitter_seconds() == pytest.approx(0.01, rel=0.05)  # the jump did not count as hours


def test_dtmf_one_event_per_key() -> None:
    rx = DtmfReceiver()
    out = []
    for ts, ev in ((1000, 5), (5000, 11)):
        for dur, end in ((160, False), (320, False), (800, True), (800, True), (800, True)):
            got = rx.feed(ts, struct.pack("!BBH", ev, (0x80 if end else 0) | 10, dur))
            if got:
                out.append(got)
    assert out == [("5", 800), ("#", 800)]


@settings(max_examples=int(os.environ.get("VA_FUZZ_EXAMPLES", "400")), deadline=None)
@given(st.binary(min_size=0, max_size=1700))
def test_fuzz_parser_never_crashes(data: bytes) -> None:
    try:
        p = parse_rtp(data)
    except RtpError as exc:
        assert exc.reason
        return
    assert 0 < len(p.payload) <= len(data) - 12 and 0 <= p.payload_type < 128


@settings(max_examples=int(os.environ.get("VA_FUZZ_EXAMPLES", "400")), deadline=None)
@given(st.integers(0, 127), st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.binary(min_size=1, max_size=1400), st.booleans())
def test_fuzz_roundtrip(pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool) -> None:
    if 192 - 128 <= pt <= 223 - 128 and marker:
        return  # would collide with RTCP packet types (RFC 5761 forbids these PTs)
    p = parse_rtp(build_rtp(pt, seq, ts, ssrc, payload, marker))
    assert (p.payload_type, p.sequence, p.timestamp, p.ssrc, p.payload, p.marker) == (
        pt, seq, ts, ssrc, payload, marker)
