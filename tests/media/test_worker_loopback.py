"""The media worker against a plain UDP peer standing in for Janus (no netns needed): audio content both
ways, DTMF events, bad input dropped and counted, barge-in flush, playback hold (pause on a loud caller
frame, resume in place, greeting, timeout), slot close/reuse."""

from __future__ import annotations

import itertools
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from appliance.config import MediaConfig
from shm.segment import EventCode, ShardSegment
from tests.harness.audio import best_correlation, dominant_frequency, tone
from tests.media.conftest import free_port_pair, running_worker
from workers.media import opus
from workers.media.rtp import build_rtp, parse_rtp

PT = 111
DTMF_PT = 101


class Peer:
    """A UDP socket playing Janus's plain-RTP side."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.01)
        self.addr = self.sock.getsockname()
        self.seq = random.getrandbits(16)
        self.ts = random.getrandbits(32)
        self.ssrc = random.getrandbits(32)
        self.enc = opus.Encoder(48000, bitrate=32000)

    def packets(self, samples48: np.ndarray) -> list[bytes]:
        out = []
        for i in range(0, len(samples48) - 960 + 1, 960):
            payload = self.enc.encode(samples48[i : i + 960].tobytes())
            out.append(build_rtp(PT, self.seq, self.ts, self.ssrc, payload))
            self.seq = (self.seq + 1) & 0xFFFF
            self.ts = (self.ts + 960) & 0xFFFFFFFF
        return out

    def recv_all(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(2048))
            except (TimeoutError, BlockingIOError):
                return out

    def close(self) -> None:
        self.sock.close()


def activate(seg: ShardSegment, index: int, peer: Peer, port: int, dtmf: int = DTMF_PT) -> int:
    return seg.slot(index).activate(
        session_id=f"s{index}-{os.getpid()}", local_rtp_port=port, remote_rtp_ip=peer.addr[0],
        remote_rtp_port=peer.addr[1], payload_type=PT, channels=2, dtmf_payload_type=dtmf, mode="direct")


def wait_for(cond, timeout: float = 5.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def read_uplink(seg: ShardSegment, index: int, frames: int, timeout: float = 10.0) -> np.ndarray:
    ring = seg.slot(index).uplink
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < frames and time.monotonic() < deadline:
        f = ring.read(640) if ring.available() >= 640 else None
        if f is None:
            time.sleep(0.01)
        else:
            got.append(f)
    return np.frombuffer(b"".join(got), np.int16)


def send_paced(peer: Peer, port: int, pkts: list[bytes], host: str = "127.0.0.1") -> None:
    t0 = time.monotonic()
    for i, p in enumerate(pkts):
        peer.sock.sendto(p, (host, port))
        delay = t0 + (i + 1) * 0.02 - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def test_uplink_tone_reaches_ring_at_16k(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    activate(segment, 0, peer, port)
    with running_worker(segment):
        assert wait_for(lambda: segment.heartbeat_age("media")[1] is not None)
        time.sleep(0.15)  # the worker scans every 100 ms
        send_paced(peer, port, peer.packets(tone(440, 1.5, 48000)))
        pcm = read_uplink(segment, 0, 60)
        c = segment.slot(0).counters.snapshot()
    peer.close()
    assert len(pcm) >= 60 * 320
    voiced = pcm[np.abs(pcm) > 1000]
    assert len(voiced) > 16000 * 0.8
    assert abs(dominant_frequency(pcm[4000:20000], 16000) - 440) < 5
    assert c["rx_packets"] >= 70 and c["frames_up"] >= 60 and c["rx_invalid"] == 0


def test_downlink_ring_to_paced_rtp(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    activate(segment, 1, peer, port)
    with running_worker(segment):
        assert wait_for(lambda: len(peer.recv_all()) > 0)  # silence flows before the model speaks
        segment.slot(1).downlink.write(tone(660, 1.0, 24000).tobytes())
        pkts: list[bytes] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.6:
            pkts += peer.recv_all()
        c = segment.slot(1).counters.snapshot()
    peer.close()
    parsed = [parse_rtp(p) for p in pkts]
    assert all(p.payload_type == PT for p in parsed)
    assert len({p.ssrc for p in parsed}) == 1
    for a, b in itertools.pairwise(parsed):
        assert (b.sequence - a.sequence) & 0xFFFF == 1
        assert (b.timestamp - a.timestamp) & 0xFFFFFFFF == 960
    dec = opus.Decoder(48000)
    pcm = np.frombuffer(b"".join(dec.decode(p.payload) for p in parsed), np.int16)
    loud = np.flatnonzero(np.abs(pcm) > 3000)
    assert len(loud) > 0
    speech = pcm[loud[0] : loud[0] + 48000]
    assert abs(dominant_frequency(speech[4800:-4800], 48000) - 660) < 5
    assert (np.abs(speech[2400:-4800]) > 500).mean() > 0.5
    assert c["frames_down"] == 50 and c["tx_packets"] >= len(parsed)
    assert len(parsed) >= 70  # ~80 packets in 1.6 s, loosely (busy CI)


def test_barge_in_flush_stops_playback_within_frames(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    activate(segment, 2, peer, port)
    with running_worker(segment):
        assert wait_for(lambda: len(peer.recv_all()) > 0)
        down = segment.slot(2).downlink
        down.write(tone(500, 5.0, 24000).tobytes())
        assert wait_for(lambda: segment.slot(2).counters.get("frames_down") >= 10)
        down.request_flush()
        flushed_at = segment.slot(2).counters.get("frames_down")
        time.sleep(0.3)
        after = segment.slot(2).counters.get("frames_down")
    peer.close()
    assert after - flushed_at <= 2  # the flush is obeyed on the next read


def test_dtmf_becomes_slot_events(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    activate(segment, 0, peer, port)
    with running_worker(segment):
        time.sleep(0.15)
        for ts, ev in ((1000, 1), (9000, 11)):
            for dur, end in ((960, False), (2880, False), (4800, True), (4800, True), (4800, True)):
                payload = struct.pack("!BBH", ev, (0x80 if end else 0) | 10, dur)
                peer.sock.sendto(build_rtp(DTMF_PT, peer.seq, ts, peer.ssrc, payload), ("127.0.0.1", port))
                peer.seq += 1
                time.sleep(0.005)
        assert wait_for(lambda: segment.slot(0).counters.get("dtmf_events") == 2)
        events = segment.slot(0).pop_events()
    peer.close()
    assert events == [(EventCode.DTMF, 1), (EventCode.DTMF_END, 100), (EventCode.DTMF, 11),
                      (EventCode.DTMF_END, 100)]


def test_bad_input_is_dropped_and_counted(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    intruder = Peer()
    activate(segment, 0, peer, port)
    rnd = random.Random(3)
    with running_worker(segment) as worker:
        time.sleep(0.15)
        good = peer.packets(tone(440, 1.0, 48000))
        dst = ("127.0.0.1", port)
        for i, p in enumerate(good):
            peer.sock.sendto(p, dst)
            intruder.sock.sendto(p, dst)  # right packet, wrong source address
            peer.sock.sendto(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 40))), dst)
            peer.sock.sendto(b"\x80\x6f" + bytes(3000), dst)  # giant
            peer.sock.sendto(build_rtp(96, i, i * 960, peer.ssrc, b"\x78xx"), dst)  # wrong PT
            peer.sock.sendto(build_rtp(PT, 1000 + i * 7, 0, 0xBAD, p[12:]), dst)  # other SSRC, while live
            peer.sock.sendto(build_rtp(PT, 5 + i, 5, peer.ssrc, b"\xff\xff\xff"), dst)  # corrupt Opus
            time.sleep(0.02)
        pcm = read_uplink(segment, 0, 40)
        c = segment.slot(0).counters.snapshot()
        assert worker.sessions  # the session survived
    peer.close()
    intruder.close()
    assert c["rx_dropped"] >= 3 * 40 and c["rx_invalid"] >= 2 * 40
    assert abs(dominant_frequency(pcm[4000:], 16000) - 440) < 5  # the real stream still plays


def test_slot_close_releases_port_and_reuse_gets_new_session(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    slot = segment.slot(3)
    gen1 = activate(segment, 3, peer, port)
    with running_worker(segment) as worker:
        assert wait_for(lambda: 3 in worker.sessions)
        slot.begin_close()
        assert wait_for(lambda: 3 not in worker.sessions)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))  # the worker released the port
        slot.free()
        gen2 = activate(segment, 3, peer, port)
        assert gen2 == gen1 + 1
        assert wait_for(lambda: 3 in worker.sessions and worker.sessions[3].generation == gen2)
    peer.close()


def test_port_in_use_does_not_crash_the_worker(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", port))
    activate(segment, 0, peer, port)
    with running_worker(segment) as worker:
        time.sleep(0.3)
        assert 0 not in worker.sessions
        blocker.close()
        assert wait_for(lambda: 0 in worker.sessions, timeout=3)  # retried once a second
    peer.close()


@pytest.mark.parametrize("n", [1])
def test_heartbeat_is_written(segment: ShardSegment, n: int) -> None:
    with running_worker(segment):
        assert wait_for(lambda: segment.heartbeat_age("media")[0] == os.getpid())
        assert segment.heartbeat_age("media")[1] < 1.0


def _spawn_worker(seg: ShardSegment) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VA_MEDIA_RTP_HOST": "127.0.0.1", "VA_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-m", "appliance.cli", "media-worker", "--shard", "0",
                             "--segment", seg.name, "--config", os.devnull], env=env)


def test_killed_worker_is_replaced_and_the_call_continues(segment: ShardSegment) -> None:
    """SIGKILL the worker process mid-call: a new one re-attaches the slot, rebinds the same port, and
    both directions continue (Janus would keep sending to the same port)."""
    peer, port = Peer(), free_port_pair()
    activate(segment, 0, peer, port)
    slot = segment.slot(0)
    first = _spawn_worker(segment)
    seen: list[bytes] = []
    try:
        assert wait_for(lambda: bool(seen.extend(peer.recv_all())) or len(seen) > 5, timeout=10)
        before = slot.counters.get("tx_packets")
        first.kill()
        first.wait(5)
        time.sleep(0.2)
        peer.recv_all()
        assert slot.counters.get("tx_packets") == before  # nobody sends now
        second = _spawn_worker(segment)
        try:
            got: list[bytes] = []
            assert wait_for(lambda: bool(got.extend(peer.recv_all()) or len(got) > 5), timeout=10)
            pkts = peer.packets(tone(440, 1.2, 48000))
            send_paced(peer, port, pkts)
            pcm = read_uplink(segment, 0, 40)
            assert abs(dominant_frequency(pcm[-8000:], 16000) - 440) < 5
            _, addr = peer.sock.recvfrom(2048)
            assert addr == ("127.0.0.1", port)  # still sent from the announced port
        finally:
            second.terminate()
            assert second.wait(10) == 0
    finally:
        if first.poll() is None:
            first.kill()
        peer.close()


def test_ssrc_restart_and_sequence_jump_keep_audio_flowing(segment: ShardSegment) -> None:
    """A sender restart (new SSRC after silence) and a confirmed sequence/timestamp jump are followed;
    the audio after each is played."""
    peer, port = Peer(), free_port_pair()
    activate(segment, 0, peer, port)
    ring = segment.slot(0).uplink
    chunks: list[bytes] = []

    def drain() -> None:  # the ring holds 2 s: keep consuming like the AI worker does
        chunks.append(ring.read(ring.available() // 640 * 640) or b"")

    with running_worker(segment) as worker:
        time.sleep(0.15)
        send_paced(peer, port, peer.packets(tone(440, 0.6, 48000)))
        time.sleep(0.3)  # the old source goes quiet
        drain()
        peer.ssrc ^= 0x5A5A5A5A
        peer.seq = (peer.seq + 30000) & 0xFFFF
        peer.ts = (peer.ts + 123456789) & 0xFFFFFFFF
        send_paced(peer, port, peer.packets(tone(880, 0.6, 48000)))
        drain()
        peer.seq = (peer.seq + 20000) & 0xFFFF  # a jump within the same SSRC
        send_paced(peer, port, peer.packets(tone(660, 0.8, 48000)))
        time.sleep(0.2)
        drain()
        sess = worker.sessions[0]
        assert sess.src is not None and sess.src.ssrc == peer.ssrc
        pcm = np.frombuffer(b"".join(chunks), np.int16)
    peer.close()
    frames = pcm[: len(pcm) // 320 * 320].reshape(-1, 320)
    freqs = [dominant_frequency(f, 16000) for f in frames if np.abs(f).max() > 3000]
    assert sum(abs(f - 880) < 60 for f in freqs) >= 25  # the new SSRC was accepted (30 frames sent)
    assert sum(abs(f - 660) < 60 for f in freqs) >= 35  # and the stream after the jump plays (40 sent)


def test_one_hour_of_downlink_rtp_has_no_drift(segment: ShardSegment) -> None:
    """An hour of ticks on a controllable clock with late wakeups: the session's RTP timestamps stay
    exactly tick x 960 from the first packet, and sequence numbers advance by one per packet."""
    from appliance.config import MediaConfig
    from workers.media.pacing import Pacer
    from workers.media.worker import MediaSession

    peer, port = Peer(), free_port_pair()
    activate(segment, 0, peer, port)
    info = segment.slot(0).snapshot()
    assert info is not None
    sess = MediaSession(segment.slot(0), info, MediaConfig(), "127.0.0.1")

    class Capture:
        def __init__(self) -> None:
            self.n = 0
            self.first: bytes | None = None
            self.last: bytes | None = None

        def sendto(self, data: bytes, _addr: object) -> int:
            self.n += 1
            self.first = self.first or data
            self.last = data
            return len(data)

    real_socket, cap = sess.rtp, Capture()
    sess.rtp = cap  # type: ignore[assignment]
    now = [5_000_000_000]
    pacer = Pacer(clock=lambda: now[0])
    rnd = random.Random(9)
    hour_ticks = 3600 * 50
    try:
        while pacer.tick <= hour_ticks:
            now[0] = pacer.deadline() + rnd.randrange(0, 4_000_000)  # 0-4 ms late wakeups
            for t in pacer.due():
                sess.tick_downlink(t)
    finally:
        sess.rtp = real_socket
        sess.close()
        peer.close()
    assert cap.first is not None and cap.last is not None
    first, last = parse_rtp(cap.first), parse_rtp(cap.last)
    assert first.marker and not last.marker
    assert cap.n == hour_ticks + 1 and pacer.skipped == 0
    assert (last.timestamp - first.timestamp) & 0xFFFFFFFF == (hour_ticks * 960) & 0xFFFFFFFF
    assert (last.sequence - first.sequence) & 0xFFFF == hour_ticks & 0xFFFF
    assert now[0] - pacer.start - hour_ticks * 20_000_000 < 4_000_000  # the clock and RTP agree


def test_rtp_timeout_event_when_the_caller_goes_silent(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    activate(segment, 0, peer, port)
    with running_worker(segment, rtp_timeout_ms=300):
        time.sleep(0.15)
        send_paced(peer, port, peer.packets(tone(440, 0.2, 48000)))
        assert not [c for c, _ in segment.slot(0).pop_events() if c == EventCode.RTP_TIMEOUT]
        events: list[tuple[int, int]] = []
        assert wait_for(lambda: len(events.extend(segment.slot(0).pop_events()) or events) >= 2, timeout=5)
    peer.close()
    timeouts = [v for c, v in events if c == EventCode.RTP_TIMEOUT]
    # repeated once per period of silence, carrying the silent time (loose bounds: busy CI)
    assert 300 <= timeouts[0] < 1000 and timeouts[1] >= timeouts[0] + 250


# ---- provisional barge-in: the playback hold ---------------------------------------------------------
class Receiver:
    """Collects every RTP packet the worker sends to ``peer`` on a thread (the test keeps sending)."""

    def __init__(self, peer: Peer) -> None:
        self.peer, self.pkts, self._stop = peer, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pkts += self.peer.recv_all()

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._t.join(5)
        return self.pkts


def decoded_packets(pkts: list[bytes]) -> list[np.ndarray]:
    """Each packet decoded at 24 kHz, in sequence order."""
    parsed = [parse_rtp(p) for p in pkts]
    base = parsed[0].sequence
    parsed.sort(key=lambda p: (p.sequence - base) & 0xFFFF)
    dec = opus.Decoder(24000)
    return [np.frombuffer(dec.decode(p.payload), np.int16) for p in parsed]


def dbfs(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return 10 * np.log10(max(float(np.mean(x * x)), 1e-12) / 32768**2)


LOUD = 0.3  # caller tone amplitude: about -13 dBFS, speech-like loudness
QUIET = 0.0003  # about -73 dBFS: a quiet room
PAUSE = {"pause_on_speech_dbfs": MediaConfig().pause_on_speech_dbfs}  # the shipped default threshold


def test_loud_caller_frame_holds_playback_and_release_resumes_in_place(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    activate(segment, 3, peer, port)
    slot = segment.slot(3)
    model = tone(660, 2.0, 24000)  # 100 frames of model answer
    with running_worker(segment, **PAUSE):
        assert wait_for(lambda: len(peer.recv_all()) > 0)
        rx = Receiver(peer)
        slot.downlink.write(model.tobytes())
        assert wait_for(lambda: slot.counters.get("frames_down") >= 15)
        send_paced(peer, port, peer.packets(tone(300, 0.1, 48000, LOUD)))  # the caller talks over it
        assert wait_for(lambda: slot.counters.get("pauses") == 1)
        hold, release = slot.hold_words()
        assert hold != release
        r0, played = slot.downlink.read_cursor, slot.counters.get("frames_down")
        time.sleep(0.3)
        # held: the ring is not consumed (nothing of the answer is lost) while silence goes out
        assert slot.downlink.read_cursor == r0 and slot.counters.get("frames_down") == played
        assert 10 < played < 100
        slot.release_hold(hold)  # the AI worker: no speech confirmed, resume
        assert wait_for(lambda: slot.counters.get("frames_down") == 100)
        time.sleep(0.1)
        pkts = rx.stop()
        c = slot.counters.snapshot()
    peer.close()
    assert c["pauses"] == 1 and c["pause_timeouts"] == 0 and c["downlink_underruns"] == 1  # only the end
    frames_ = decoded_packets(pkts)
    tail_db = [dbfs(f[-240:]) for f in frames_]  # last 10 ms of each packet
    start = next(i for i, d in enumerate(tail_db) if d > -30)
    cut = next(i for i in range(start, len(tail_db)) if tail_db[i] < -30)
    back = next(i for i in range(cut, len(tail_db)) if tail_db[i] > -30)
    # the first packet sent while held already ends silent (encoder reset: no tail of the old audio)
    assert tail_db[cut] < -60 and tail_db[cut - 1] > -20, tail_db[cut - 2: cut + 2]
    assert back - cut >= 12  # ~300 ms of silence while held
    # joined without the gap, what the caller heard is the answer, uninterrupted: nothing skipped or repeated
    # (a skipped or repeated 20 ms frame shifts a 660 Hz tone by 0.2 cycle and drops this well below 0.9)
    heard = np.concatenate(frames_[start:cut] + frames_[back:])
    corr, _ = best_correlation(model[2400:-4800], heard, 24000)
    assert corr > 0.95, corr
    assert abs(dominant_frequency(np.concatenate(frames_[back + 1: back + 20]), 24000) - 660) < 5


def test_quiet_caller_frames_never_pause(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    activate(segment, 0, peer, port)
    slot = segment.slot(0)
    with running_worker(segment, **PAUSE):
        assert wait_for(lambda: len(peer.recv_all()) > 0)
        slot.downlink.write(tone(660, 2.0, 24000).tobytes())
        assert wait_for(lambda: slot.counters.get("frames_down") >= 5)
        send_paced(peer, port, peer.packets(tone(300, 0.6, 48000, QUIET)))
        assert wait_for(lambda: slot.counters.get("frames_up") >= 20)
        assert wait_for(lambda: slot.counters.get("frames_down") == 100)
        c = slot.counters.snapshot()
    peer.close()
    assert c["pauses"] == 0 and slot.hold_words()[0] == 0


def test_greeting_is_never_paused_but_what_follows_is(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    activate(segment, 1, peer, port)
    slot = segment.slot(1)
    with running_worker(segment, **PAUSE):
        assert wait_for(lambda: len(peer.recv_all()) > 0)
        slot.downlink.write(tone(440, 1.0, 24000).tobytes())  # the greeting (AI disclosure)
        slot.protect_until = slot.downlink.write_cursor  # as the AI worker publishes it
        slot.downlink.write(tone(660, 2.0, 24000).tobytes())  # the model's answer after it
        assert wait_for(lambda: slot.counters.get("frames_down") >= 5)
        send_paced(peer, port, peer.packets(tone(300, 0.2, 48000, LOUD)))
        assert slot.counters.get("pauses") == 0 and slot.downlink.read_cursor < slot.protect_until
        assert wait_for(lambda: slot.downlink.read_cursor > slot.protect_until + 960)
        send_paced(peer, port, peer.packets(tone(300, 0.06, 48000, QUIET)))  # re-arms after the loud run
        send_paced(peer, port, peer.packets(tone(300, 0.1, 48000, LOUD)))
        assert wait_for(lambda: slot.counters.get("pauses") == 1)
    peer.close()


def test_unanswered_hold_times_out(segment: ShardSegment, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.media import worker as media_worker

    monkeypatch.setattr(media_worker, "HOLD_MAX_NS", 300_000_000)  # no AI worker releases it
    peer, port = Peer(), free_port_pair()
    activate(segment, 2, peer, port)
    slot = segment.slot(2)
    with running_worker(segment, **PAUSE):
        assert wait_for(lambda: len(peer.recv_all()) > 0)
        slot.downlink.write(tone(660, 2.0, 24000).tobytes())
        assert wait_for(lambda: slot.counters.get("frames_down") >= 5)
        send_paced(peer, port, peer.packets(tone(300, 0.1, 48000, LOUD)))
        assert wait_for(lambda: slot.counters.get("pauses") == 1)
        t0 = time.monotonic()
        assert wait_for(lambda: slot.counters.get("pause_timeouts") == 1)
        assert 0.2 < time.monotonic() - t0 < 1.5
        assert wait_for(lambda: slot.counters.get("frames_down") == 100)  # then the rest plays
        hold, release = slot.hold_words()
    peer.close()
    assert hold == 1 and release == 0  # the slot still says held: only the media worker gave up on it
