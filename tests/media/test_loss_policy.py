"""Downlink loss adaptation (workers/media/loss_policy.py): RTCP fraction lost is read, the table and its
hysteresis pick the encoder settings, a session's real Opus encoder follows a receiver report that
reaches its RTCP port, and the FEC it then sends recovers a lost packet's audio (correlation with the
unimpaired decode, against concealment without FEC)."""

from __future__ import annotations

import os
import socket
import struct
import time

import numpy as np

from appliance.config import MediaConfig
from shm.segment import ShardSegment
from tests.harness.audio import speech
from tests.media.conftest import free_port_pair
from workers.media import opus
from workers.media.loss_policy import DOWN_AFTER, LossPolicy, OpusSettings, fraction_lost
from workers.media.worker import MediaWorker, OpusDownlink


def rr(*fractions: int, sender: int = 0x1111, sr: bool = False) -> bytes:
    """An RTCP SR or RR with one report block per ``fraction`` (x/256)."""
    blocks = b"".join(struct.pack("!IB3sIIII", 0x2222 + i, f, b"\0\0\1", 1000, 5, 0, 0)
                      for i, f in enumerate(fractions))
    info = struct.pack("!IIIII", 1, 2, 3, 4, 5) if sr else b""
    body = struct.pack("!I", sender) + info + blocks
    return struct.pack("!BBH", 0x80 | len(fractions), 200 if sr else 201, len(body) // 4) + body


def sdes() -> bytes:
    body = struct.pack("!I", 0x1111) + b"\x01\x03abc\x00\x00\x00"
    return struct.pack("!BBH", 0x81, 202, len(body) // 4) + body


def test_fraction_lost_is_the_worst_report_block_of_a_compound_packet() -> None:
    assert fraction_lost(rr(10, 64)) == 64 / 256
    assert fraction_lost(rr(32, sr=True) + sdes()) == 32 / 256
    assert fraction_lost(sdes() + rr(5)) == 5 / 256
    assert fraction_lost(rr()) is None  # an RR without blocks says nothing
    assert fraction_lost(sdes()) is None
    assert fraction_lost(b"\x00\x01garbage") is None
    assert fraction_lost(rr(10)[:-4]) is None  # truncated block: ignored, no exception


def test_table_rises_at_once_and_falls_after_several_reports() -> None:
    p = LossPolicy(28000, 5)
    assert p.settings() == OpusSettings(True, 5, 28000)
    assert p.report(0.0) is None
    high = p.report(0.2)  # smoothed 10 %: the 8-15 % row at the first report
    assert high == OpusSettings(True, 20, 36000)
    for _ in range(DOWN_AFTER - 1):
        assert p.report(0.0) is None  # held: a burst is rarely alone
    low = p.report(0.0)
    assert low is not None and low.expected_loss_percent < 20
    assert not any(p.settings(r).dtx for r in range(4))  # the continuous stream stays continuous


def test_a_receiver_report_changes_the_session_encoder(segment: ShardSegment) -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    port = free_port_pair()
    segment.slot(0).activate(session_id=f"lp-{os.getpid()}", local_rtp_port=port,
                             remote_rtp_ip="127.0.0.1", remote_rtp_port=peer.getsockname()[1],
                             payload_type=111, channels=2, dtmf_payload_type=101, mode="direct")
    worker = MediaWorker(segment, MediaConfig(), host="127.0.0.1")
    try:
        worker.scan()
        sess = worker.sessions[0]
        assert isinstance(sess.encoder, OpusDownlink)
        assert sess.encoder.settings.expected_loss_percent == 5
        peer.sendto(rr(64), ("127.0.0.1", port + 1))  # 25 % lost, on the RTCP port
        deadline = time.monotonic() + 5
        while sess.encoder.settings.expected_loss_percent == 5 and time.monotonic() < deadline:
            worker.run_once(max_wait=0.05)
        assert sess.encoder.settings.expected_loss_percent == 30  # the first report is taken as it is
        assert sess.encoder.settings.bitrate == MediaConfig().opus_bitrate + 8000
        assert sess.c.get("rtcp_packets") == 1
    finally:
        worker.close()
        peer.close()


def _lost_frame_correlations(settings: OpusSettings, use_fec: bool) -> np.ndarray:
    """Encode speech with ``settings``; for each of several voiced packets, lose it and correlate what
    the decoder makes of that 20 ms (FEC from the next packet, or PLC) with the unimpaired decode."""
    x = speech("Tomorrow will be sunny with a light breeze from the west.", 24000).astype(np.float64)
    x = (x * (32768 * 0.1 / np.sqrt(np.mean(x**2)))).clip(-32768, 32767).astype(np.int16)
    enc = OpusDownlink(MediaConfig())
    enc.apply(settings)
    pkts = [enc.encode(x[i: i + 480].tobytes()) for i in range(0, len(x) - 480, 480)]
    enc.close()
    ref_dec = opus.Decoder(48000)
    ref = [np.frombuffer(ref_dec.decode(p), np.int16).astype(np.float64) for p in pkts]
    out = []
    for lost in range(20, min(len(pkts) - 1, 120), 5):
        if ref[lost] @ ref[lost] < 960 * 300.0**2:
            continue  # a quiet frame: nothing to recover
        dec = opus.Decoder(48000)
        for p in pkts[:lost]:
            dec.decode(p)
        got = dec.decode_fec(pkts[lost + 1], 960) if use_fec else dec.conceal(960)
        b = np.frombuffer(got, np.int16).astype(np.float64)
        out.append(float(ref[lost] @ b / np.sqrt((ref[lost] @ ref[lost]) * (b @ b) + 1e-9)))
    return np.asarray(out)


def test_fec_of_the_high_loss_row_recovers_lost_packets() -> None:
    policy = LossPolicy(28000, 5)
    high = _lost_frame_correlations(policy.settings(3), use_fec=True)  # >= 15 % loss
    default = _lost_frame_correlations(policy.settings(0), use_fec=True)  # < 2 %: the configured 5 %
    plc = _lost_frame_correlations(OpusSettings(False, 0, policy.settings(3).bitrate), use_fec=False)
    assert len(high) >= 8
    # the lost 20 ms come back close to the original with the high-loss row's FEC ...
    assert np.mean(high) > 0.75, (high, default, plc)
    # ... far better than concealment without FEC, and better than the low-loss row's thinner FEC
    assert np.mean(high) > np.mean(plc) + 0.3, (high, plc)
    assert np.mean(high) > np.mean(default) + 0.1, (high, default)
