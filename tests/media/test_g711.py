"""G.711 codec tables, the soxr stream choice (one frame out per frame in), and a PCMU session through
the worker and through a real AudioBridge room."""

from __future__ import annotations

import itertools
import os
import random
import time

import numpy as np
import pytest
import soxr

from appliance.janus import AUDIOBRIDGE, JanusClient
from shm.segment import ShardSegment
from tests.harness.audio import dominant_frequency, tone
from tests.harness.janus import JanusInstance, WebRtcCaller
from tests.media.conftest import free_port_pair, running_worker
from tests.media.test_janus_nosip import _read_uplink, _wait
from tests.media.test_worker_loopback import Peer, read_uplink, wait_for
from workers.media import g711
from workers.media.rtp import build_rtp, parse_rtp


def test_tables_match_the_itu_reference_points() -> None:
    assert (g711.ULAW_DECODE[[0x00, 0x80, 0xFF, 0x7F]] == [-32124, 32124, 0, 0]).all()
    assert (g711.ALAW_DECODE[[0xD5, 0x55, 0x2A, 0xAA]] == [8, -8, -32256, 32256]).all()
    for pt, table in ((g711.PCMU, g711.ULAW_DECODE), (g711.PCMA, g711.ALAW_DECODE)):
        codes = np.arange(256, dtype=np.uint8)
        # encoding a decoded value gives a code that decodes to the same value (exact inverse)
        again = np.frombuffer(g711.encode(table[codes], pt), np.uint8)
        assert (table[again] == table[codes]).all()


@pytest.mark.parametrize("pt", [g711.PCMU, g711.PCMA])
def test_roundtrip_snr(pt: int) -> None:
    x = tone(1000, 0.5, 8000, amplitude=0.5)
    y = g711.decode(g711.encode(x, pt), pt).astype(np.float64)
    snr = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y) ** 2))
    assert snr > 30  # G.711 is ~38 dB on a loud tone


def test_uplink_resampler_releases_one_frame_per_frame() -> None:
    up = g711.G711Uplink(g711.PCMU)
    x = tone(440, 1.0, 8000)
    outs = [up.decode(g711.encode(x[i : i + 160], g711.PCMU)) for i in range(0, 8000, 160)]
    lens = [len(o) // 2 for o in outs]
    assert min(lens[1:]) >= 316 and max(lens) <= 324  # never bursty (HQ would hold ~100 ms back)
    pcm = np.frombuffer(b"".join(outs), np.int16)
    assert abs(dominant_frequency(pcm[1600:], 16000) - 440) < 5
    assert len(up.conceal()) > 0


def test_downlink_encodes_one_packet_per_frame() -> None:
    down = g711.G711Downlink(g711.PCMA)
    x = tone(660, 1.0, 24000)
    pkts = [down.encode(x[i : i + 480].tobytes()) for i in range(0, 24000, 480)]
    assert {len(p) for p in pkts} == {160}
    pcm = g711.decode(b"".join(pkts), g711.PCMA)
    assert abs(dominant_frequency(pcm[800:], 8000) - 660) < 5


def test_pcmu_session_through_the_worker(segment: ShardSegment) -> None:
    peer, port = Peer(), free_port_pair()
    segment.slot(0).activate(session_id=f"pcmu-{os.getpid()}", local_rtp_port=port,
                             remote_rtp_ip=peer.addr[0], remote_rtp_port=peer.addr[1], payload_type=0,
                             channels=1, dtmf_payload_type=-1, mode="room")
    x = tone(440, 1.5, 8000)
    with running_worker(segment):
        time.sleep(0.15)
        t0 = time.monotonic()
        for i, k in enumerate(range(0, len(x) - 160 + 1, 160)):
            peer.sock.sendto(build_rtp(0, 100 + i, i * 160, 77, g711.encode(x[k : k + 160], 0)),
                             ("127.0.0.1", port))
            delay = t0 + (i + 1) * 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        up = read_uplink(segment, 0, 50)
        segment.slot(0).downlink.write(tone(660, 1.0, 24000).tobytes())
        got: list[bytes] = []
        assert wait_for(lambda: bool(got.extend(peer.recv_all())) or segment.slot(0).counters.get(
            "frames_down") >= 50)
        time.sleep(0.2)
        got += peer.recv_all()
    peer.close()
    assert abs(dominant_frequency(up[-16000:], 16000) - 440) < 5
    parsed = [parse_rtp(p) for p in got]
    assert {p.payload_type for p in parsed} == {0} and {len(p.payload) for p in parsed} == {160}
    assert all((b.timestamp - a.timestamp) & 0xFFFFFFFF == 160 for a, b in itertools.pairwise(parsed))
    pcm = g711.decode(b"".join(p.payload for p in parsed), 0)
    loud = np.flatnonzero(np.abs(pcm) > 3000)
    assert abs(dominant_frequency(pcm[loud[0] : loud[0] + 8000], 8000) - 660) < 5


@pytest.mark.janus
async def test_pcmu_participant_in_a_real_audiobridge_room(janus: JanusInstance,
                                                           segment: ShardSegment) -> None:
    room = random.randrange(10_000, 1_000_000)
    caller = WebRtcCaller(tone(440, 30.0, 48000, amplitude=0.3))
    slot = segment.slot(2)
    try:
        with running_worker(segment, host=janus.host_ip):
            async with JanusClient(janus.url, api_secret=janus.api_secret) as client:
                session = await client.create_session()
                admin = await session.attach(AUDIOBRIDGE)
                await admin.audiobridge_create_room(room, admin_key=janus.audiobridge_admin_key,
                                                    sampling_rate=16000)
                port = free_port_pair(janus.host_ip)
                slot.activate(session_id=f"pcmu-room-{os.getpid()}", local_rtp_port=port,
                              remote_rtp_ip="", remote_rtp_port=0, payload_type=0, channels=1,
                              dtmf_payload_type=-1, mode="room")
                rtp = {"ip": janus.host_ip, "port": port, "payload_type": 0}
                data, _ = await admin.message({"request": "join", "room": room, "display": "ai",
                                               "codec": "pcmu", "rtp": rtp})
                assert data["audiobridge"] == "joined", data
                slot.set_remote(data["rtp"]["ip"], data["rtp"]["port"])
                h = await session.attach(AUDIOBRIDGE)
                sdp = await h.audiobridge_join_webrtc(room, (await caller.offer())["sdp"], display="caller")
                await caller.accept({"type": "answer", "sdp": sdp})
                assert await _wait(lambda: slot.counters.get("rx_packets") > 50, 15), janus.log_text()[-3000:]
                up = await _read_uplink(segment, 2, 2.0)
                caller.clear_received()
                slot.downlink.write(tone(660, 1.5, 24000).tobytes())
                assert await _wait(lambda: slot.counters.get("frames_down") >= 75)
                await _wait(lambda: False, 0.6)
                down = caller.received()
    finally:
        await caller.close()
    tail = up[-16000:]
    assert (np.abs(tail) > 500).mean() > 0.5
    assert abs(dominant_frequency(tail, 16000) - 440) < 5
    loud = np.flatnonzero(np.abs(down) > 2000)
    assert len(loud) > 0
    heard = down[loud[0] : loud[0] + 48000]
    # Janus 1.1.2's AudioBridge upsamples G.711 without an image filter (8000-660 Hz shows up as well);
    # judge the telephone band the G.711 participant actually sent
    band = soxr.resample(heard[4800:-4800], 48000, 8000)
    assert abs(dominant_frequency(band, 8000) - 660) < 8
