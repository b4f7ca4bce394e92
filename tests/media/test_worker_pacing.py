"""The media worker's pacing with an injected clock: every call's packet of a tick leaves at the deadline
whatever the number of calls (prepared ``lead_ns`` ahead, sent back to back), and a barge-in flush
between prepare and send still cuts the audio in that tick.

Per-session CPU cost is simulated by advancing the virtual clock inside each Opus encode, so the test
measures the schedule, not this machine's speed (the paired real-time figures are in docs/benchmarks.md).
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from appliance.config import MediaConfig
from shm.segment import ShardSegment, ring_bytes
from tests.harness.audio import tone
from tests.media.conftest import free_port_pair
from workers.media.pacing import PERIOD_NS
from workers.media.rtp import parse_rtp
from workers.media.worker import LEAD_MARGIN_NS, MediaSession, MediaWorker

PT = 111
ENCODE_COST_NS = 100_000  # what one Opus encode + framing costs per call (~0.1 ms, issue 17)
STEP_NS = 10_000  # the virtual clock's resolution as the test drives the loop


class Capture:
    """Stands in for a session's RTP socket on the send side: records (virtual time, packet)."""

    def __init__(self, real: socket.socket, clock: Callable[[], int]) -> None:
        self.real, self.clock = real, clock
        self.sent: list[tuple[int, bytes]] = []

    def sendto(self, data: bytes, _addr: object) -> int:
        self.sent.append((self.clock(), bytes(data)))
        return len(data)

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


class Rig:
    """A segment with ``n`` active calls, a worker on a virtual clock, costly encoders, captured sends."""

    def __init__(self, n: int) -> None:
        iid = "mp" + secrets.token_hex(4)
        up, down = ring_bytes(2000, 8000)
        self.seg = ShardSegment.create(f"/va-{iid}-s0", slots=n, uplink_bytes=up, downlink_bytes=down,
                                       instance_id=iid)
        for i in range(n):
            self.seg.slot(i).activate(
                session_id=f"p{i}-{os.getpid()}", local_rtp_port=free_port_pair(), remote_rtp_ip="127.0.0.1",
                remote_rtp_port=9, payload_type=PT, channels=2, dtmf_payload_type=101, mode="direct")
        self.now = 10**12
        cfg = MediaConfig(rtp_host="127.0.0.1", pause_on_speech_dbfs=0.0)
        self.worker = MediaWorker(self.seg, cfg, host="127.0.0.1", clock=lambda: self.now)
        self.worker.scan()
        assert len(self.worker.sessions) == n
        self.caps: dict[int, Capture] = {}
        self.encodes: dict[int, int] = {}
        for i, sess in self.worker.sessions.items():
            self._instrument(i, sess)

    def _instrument(self, i: int, sess: MediaSession) -> None:
        cap = Capture(sess.rtp, lambda: self.now)
        sess.rtp = cap  # type: ignore[assignment]
        self.caps[i] = cap
        self.encodes[i] = 0
        real_encode = sess.encoder.encode

        def encode(pcm: bytes, _i: int = i, _real: Any = real_encode) -> bytes:
            self.now += ENCODE_COST_NS
            self.encodes[_i] += 1
            return _real(pcm)

        sess.encoder.encode = encode  # type: ignore[method-assign]

    def speak(self, seconds: float = 1.0) -> None:
        pcm = tone(440, seconds, 24000).tobytes()
        for i in self.caps:
            assert self.seg.slot(i).downlink.write(pcm)

    def step(self) -> None:
        self.now += STEP_NS
        self.worker.run_once(max_wait=0)

    def run_until(self, cond: Callable[[], bool], limit_ns: int = 2_000_000_000) -> None:
        end = self.now + limit_ns
        while not cond():
            assert self.now < end, "condition not reached"
            self.step()

    def close(self) -> None:
        self.worker.close()
        self.seg.close()
        self.seg.unlink()


@pytest.fixture
def rig_factory() -> Iterator[Callable[[int], Rig]]:
    rigs: list[Rig] = []

    def make(n: int) -> Rig:
        rigs.append(Rig(n))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def _lateness_ns(rig: Rig, t: int) -> int:
    """How far after its tick's deadline a packet sent at ``t`` left."""
    return (t - rig.worker.pacer.start) % PERIOD_NS


@pytest.mark.parametrize("n", [4, 32])
def test_every_packet_of_a_tick_leaves_at_the_deadline_whatever_n(rig_factory: Callable[[int], Rig],
                                                                   n: int) -> None:
    rig = rig_factory(n)
    rig.speak(1.0)
    rig.run_until(lambda: rig.worker.ticks >= 12)
    # the first two ticks learn the lead (the first prepare is slower than the initial 1 ms lead)
    late = [_lateness_ns(rig, t) for cap in rig.caps.values() for t, _ in cap.sent[3:]]
    assert len(late) >= n * 8
    # the old worker sent the k-th call's packet k x 0.1 ms late (3.2 ms for the 32nd)
    assert max(late) <= 2 * STEP_NS, f"packets left up to {max(late) / 1e3:.0f} µs after the deadline"
    # every one of them carried model audio (encoded ahead), nothing skipped: gapless seq and timestamps
    for i, cap in rig.caps.items():
        pkts = [parse_rtp(p) for _, p in cap.sent]
        assert all(p.payload != rig.worker.sessions[i].silence for p in pkts)
        assert all((b.sequence - a.sequence) & 0xFFFF == 1 for a, b in itertools.pairwise(pkts))
        assert all((b.timestamp - a.timestamp) & 0xFFFFFFFF == 960 for a, b in itertools.pairwise(pkts))
    # the downlink latency this adds is the lead: the prepare time plus a small margin, not more
    prep = n * ENCODE_COST_NS
    assert prep <= rig.worker.lead_ns <= prep + LEAD_MARGIN_NS + 2 * STEP_NS


def test_flush_between_prepare_and_send_drops_the_prepared_packet(rig_factory: Callable[[int], Rig]) -> None:
    rig = rig_factory(2)
    rig.speak(1.0)
    rig.run_until(lambda: len(rig.caps[0].sent) >= 5)  # just sent a tick
    sent0 = len(rig.caps[0].sent)
    enc0 = rig.encodes[0]
    rig.run_until(lambda: rig.encodes[0] > enc0)  # the next tick's audio packet is being built ...
    assert len(rig.caps[0].sent) == sent0, "encoded and sent at once: nothing is prepared ahead"
    sess0 = rig.worker.sessions[0]
    rig.seg.slot(0).downlink.request_flush()  # ... when the AI worker confirms a barge-in
    rig.run_until(lambda: len(rig.caps[0].sent) > sent0 and len(rig.caps[1].sent) > sent0)
    prev, flushed = parse_rtp(rig.caps[0].sent[sent0 - 1][1]), parse_rtp(rig.caps[0].sent[sent0][1])
    other = parse_rtp(rig.caps[1].sent[sent0][1])
    assert flushed.payload == sess0.silence  # the prepared audio never went out
    assert other.payload != rig.worker.sessions[1].silence  # the call without a flush kept its audio
    assert (flushed.sequence - prev.sequence) & 0xFFFF == 1  # same slot in the stream: no gap
    assert (flushed.timestamp - prev.timestamp) & 0xFFFFFFFF == 960
    assert sess0.stale_dropped == 1 and not sess0.speaking  # encoder reset: no tail of the old audio
    rig.run_until(lambda: len(rig.caps[0].sent) >= sent0 + 4)
    assert all(parse_rtp(p).payload == sess0.silence for _, p in rig.caps[0].sent[sent0:])
    assert rig.seg.slot(0).downlink.available() == 0  # the ring was flushed, not just skipped once


def test_backlog_after_a_stall_is_sent_at_once_not_waited_for(rig_factory: Callable[[int], Rig]) -> None:
    """A stalled process (2.5 ticks late) sends what is due right away; the pacer's burst rules hold."""
    rig = rig_factory(2)
    rig.speak(1.0)
    rig.run_until(lambda: rig.worker.ticks >= 4)
    before = len(rig.caps[0].sent)
    rig.now += PERIOD_NS * 5 // 2
    rig.worker.run_once(max_wait=0)
    assert len(rig.caps[0].sent) - before >= 2  # the overdue ticks went out in this one call
    ts = [parse_rtp(p).timestamp for _, p in rig.caps[0].sent]
    assert all((b - a) & 0xFFFFFFFF == 960 for a, b in itertools.pairwise(ts))
    assert np.all(np.diff([t for t, _ in rig.caps[0].sent]) >= 0)
