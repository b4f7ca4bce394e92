"""Opus binding, jitter buffer and pacer: content-checked and clock-independent."""

from __future__ import annotations

import ctypes
import random

import numpy as np
import pytest

from tests.harness.audio import dominant_frequency, tone
from workers.media import opus
from workers.media.jitter import JitterBuffer, Kind
from workers.media.pacing import PERIOD_NS, Pacer


def _snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    noise = np.sum((ref - out) ** 2) + 1e-9
    return 10 * np.log10(np.sum(ref**2) / noise)


def _encode(samples: np.ndarray, rate: int, loss: int = 5) -> list[bytes]:
    enc = opus.Encoder(rate, bitrate=28000, complexity=5, fec=True, expected_loss_percent=loss)
    n = rate // 50
    return [enc.encode(samples[i : i + n].tobytes()) for i in range(0, len(samples) - n + 1, n)]


def test_opus_24k_in_16k_out_keeps_the_tone() -> None:
    assert opus.version().startswith("libopus")
    pkts = _encode(tone(440, 1.0, 24000), 24000)
    assert all(0 < len(p) < 200 for p in pkts)
    dec = opus.Decoder(16000)
    pcm = np.frombuffer(b"".join(dec.decode(p) for p in pkts), np.int16)
    assert len(pcm) == 16000
    assert abs(dominant_frequency(pcm[1600:], 16000) - 440) < 5


def test_stereo_48k_stream_is_downmixed() -> None:
    # a stereo encoder via the raw API: left 300 Hz, right 300 Hz (same tone), decoded mono at 16 kHz
    lib = opus.lib()
    err = ctypes.c_int()
    st = ctypes.c_void_p(lib.opus_encoder_create(48000, 2, opus.OPUS_APPLICATION_AUDIO, ctypes.byref(err)))
    mono = tone(300, 0.5, 48000)
    stereo = np.repeat(mono, 2)
    out = ctypes.create_string_buffer(1500)
    dec = opus.Decoder(16000)
    pcm = []
    for i in range(0, len(mono) - 960 + 1, 960):
        n = lib.opus_encode(st, stereo[2 * i : 2 * i + 1920].tobytes(), 960, out, 1500)
        assert n > 0
        pcm.append(dec.decode(out.raw[:n]))
    lib.opus_encoder_destroy(st)
    got = np.frombuffer(b"".join(pcm), np.int16)
    assert len(got) == 8000 and abs(dominant_frequency(got[800:], 16000) - 300) < 5


def test_fec_recovers_better_than_plc() -> None:
    rate = 16000
    ref24 = tone(523, 2.0, 24000)
    pkts = _encode(ref24, 24000, loss=20)
    clean = opus.Decoder(rate)
    ref = [clean.decode(p) for p in pkts]
    lost = set(range(10, len(pkts) - 1, 7))
    fec_dec, plc_dec = opus.Decoder(rate), opus.Decoder(rate)
    fec_out, plc_out = [], []
    for i, p in enumerate(pkts):
        if i in lost:
            fec_out.append(fec_dec.decode_fec(pkts[i + 1]))
            plc_out.append(plc_dec.conceal())
        else:
            fec_out.append(fec_dec.decode(p))
            plc_out.append(plc_dec.decode(p))
    r = np.frombuffer(b"".join(ref[i] for i in sorted(lost)), np.int16)
    f = np.frombuffer(b"".join(fec_out[i] for i in sorted(lost)), np.int16)
    c = np.frombuffer(b"".join(plc_out[i] for i in sorted(lost)), np.int16)
    assert len(f) == len(r) == len(c)
    assert _snr_db(r, f) > _snr_db(r, c) + 3


def test_corrupt_packet_raises() -> None:
    dec = opus.Decoder(16000)
    with pytest.raises(opus.OpusError):
        dec.decode(b"\xff\xff\xff\xff\xff")
    assert len(dec.conceal()) == 640  # still usable afterwards


# ---- jitter buffer ----------------------------------------------------------------------------------
def _drain(jb: JitterBuffer, n: int) -> list[tuple[Kind, bytes | None]]:
    return [jb.pop() for _ in range(n)]


def test_jb_buffers_to_target_then_plays_in_order() -> None:
    jb = JitterBuffer(target_ms=40)
    jb.put(100, b"a")
    assert jb.pop() == (Kind.IDLE, None)
    jb.put(102, b"c")
    jb.put(101, b"b")  # reordered
    assert _drain(jb, 3) == [(Kind.FRAME, b"a"), (Kind.FRAME, b"b"), (Kind.FRAME, b"c")]


def test_jb_loss_uses_fec_of_next_and_late_is_dropped() -> None:
    jb = JitterBuffer(target_ms=40)
    for s in (1, 2, 4, 5):
        jb.put(s, bytes([s]))
    assert _drain(jb, 4) == [(Kind.FRAME, b"\x01"), (Kind.FRAME, b"\x02"), (Kind.FEC, b"\x04"),
                             (Kind.FRAME, b"\x04")]
    assert jb.put(3, b"\x03") == "late" and jb.late == 1
    assert jb.put(5, b"\x05") == "duplicate"


def test_jb_stalls_for_a_late_packet_instead_of_dropping_it() -> None:
    jb = JitterBuffer(target_ms=20, max_stall=2)
    jb.put(1, b"1")
    assert jb.pop() == (Kind.FRAME, b"1")
    assert jb.pop() == (Kind.PLC, None)  # 2 not here, nothing later: stall
    jb.put(2, b"2")
    assert jb.pop() == (Kind.FRAME, b"2") and jb.stalls == 1 and jb.late == 0


def test_jb_adapts_target_to_jitter_and_late_packets() -> None:
    jb = JitterBuffer(target_ms=40, max_ms=120)
    assert jb.target_ms == 40
    jb.set_jitter(0.025)
    assert jb.target_ms == 80
    jb.set_jitter(1.0)
    assert jb.target_ms == 120


def test_jb_sequence_jump_resets() -> None:
    jb = JitterBuffer(target_ms=20)
    jb.put(1, b"1")
    jb.pop()
    assert jb.put(100000, b"x") == "reset" and not jb.playing
    assert jb.pop() == (Kind.FRAME, b"x")
    assert jb.put(7, b"y") == "reset"  # far behind: a restarted sequence, not a late packet
    assert jb.pop() == (Kind.FRAME, b"y")


def test_jb_random_jitter_plays_every_frame_once() -> None:
    rnd = random.Random(7)
    jb = JitterBuffer(target_ms=60, max_ms=200)
    arrivals = sorted((i * 20 + rnd.uniform(0, 35), i) for i in range(500))
    played: list[bytes] = []
    t, k = 0.0, 0
    while len(played) < 480 and t < 20000:
        while k < len(arrivals) and arrivals[k][0] <= t:
            jb.put(arrivals[k][1], arrivals[k][1].to_bytes(2, "big"))
            k += 1
        kind, payload = jb.pop()
        if kind is Kind.FRAME:
            played.append(payload or b"")
        t += 20
    seqs = [int.from_bytes(p, "big") for p in played]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len(seqs) >= 470  # ≤ 6 % lost to lateness with 35 ms of jitter and a 60 ms target


# ---- pacing ---------------------------------------------------------------------------------------
def test_pacer_one_hour_without_drift() -> None:
    now = [1_000_000_000]
    pacer = Pacer(clock=lambda: now[0])
    rnd = random.Random(1)
    ticks = 0
    rtp_ts = 0
    hour = 3600 * 1_000_000_000
    while now[0] - pacer.start < hour:
        # sleep until the deadline, wake up late by 0-3 ms (a busy scheduler)
        now[0] = pacer.deadline() + rnd.randrange(0, 3_000_000)
        for t in pacer.due():
            ticks += 1
            rtp_ts = t * 960
    assert ticks == 180_000 + 1  # ticks 0 … 180000 inclusive are due within the hour
    assert rtp_ts == 180_000 * 960
    assert pacer.deadline(180_000) - pacer.start == hour
    assert pacer.skipped == 0


def test_pacer_skips_instead_of_bursting_after_a_stall() -> None:
    now = [0]
    pacer = Pacer(clock=lambda: now[0], max_burst=3)
    assert pacer.due() == [0]
    now[0] = 2 * PERIOD_NS + 1
    assert pacer.due() == [1, 2]
    now[0] = 50 * PERIOD_NS
    assert pacer.due() == [50] and pacer.skipped == 47
    assert pacer.timeout(now[0]) == pytest.approx(0.02)


def test_packet_has_fec_flag() -> None:
    with_fec = _encode(tone(300, 0.5, 24000), 24000, loss=20)
    no_fec = opus.Encoder(24000, fec=False, expected_loss_percent=0)
    plain = [no_fec.encode(tone(300, 0.5, 24000)[i : i + 480].tobytes()) for i in range(0, 12000, 480)]
    if not hasattr(opus.lib(), "opus_packet_has_lbrr"):
        pytest.skip("libopus < 1.5")
    assert any(opus.packet_has_fec(p) for p in with_fec[5:])
    assert not any(opus.packet_has_fec(p) for p in plain)
