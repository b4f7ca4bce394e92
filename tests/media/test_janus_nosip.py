"""A real WebRTC caller (aiortc) through real Janus NoSIP into the media worker and back.

Janus runs in its own netns (tests/harness/janus.py); the worker binds the veth's root-side address,
exactly as it binds 127.0.0.1 in production. Audio content is checked in both directions.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
import soxr

from appliance.janus import NOSIP, JanusClient, plain_rtp_answer
from shm.segment import EventCode, ShardSegment
from tests.harness.audio import best_correlation, dominant_frequency, envelope_correlation, speech, tone
from tests.harness.janus import JanusInstance, WebRtcCaller
from tests.media.conftest import free_port_pair, running_worker

pytestmark = pytest.mark.janus


async def _wait(cond, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return False


async def _read_uplink(seg: ShardSegment, index: int, seconds: float) -> np.ndarray:
    ring = seg.slot(index).uplink
    out: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        while ring.available() >= 640:
            out.append(ring.read(640) or b"")
        await asyncio.sleep(0.02)
    return np.frombuffer(b"".join(out), np.int16)


async def connect_nosip(janus: JanusInstance, client: JanusClient, caller: WebRtcCaller, seg: ShardSegment,
                        index: int, dtmf: bool = False) -> int:
    """NoSIP generate/process with the worker's port in the answer; activates the slot. Returns the port."""
    handle = await (await client.create_session()).attach(NOSIP)
    side = await handle.nosip_generate((await caller.offer())["sdp"], info=f"slot{index}")
    assert side.ip == janus.ns_ip and side.port > 0
    port = free_port_pair(janus.host_ip)
    seg.slot(index).activate(session_id=f"nosip-{index}-{os.getpid()}", local_rtp_port=port,
                             remote_rtp_ip=side.ip, remote_rtp_port=side.port, payload_type=side.payload_type,
                             channels=2, mode="direct",
                             dtmf_payload_type=side.telephone_event_payload_type if dtmf else -1)
    te = side.telephone_event_payload_type if dtmf else None
    answer = plain_rtp_answer(janus.host_ip, port, side.payload_type, telephone_event_payload_type=te)
    sdp = await handle.nosip_process_answer(answer)
    await caller.accept({"type": "answer", "sdp": sdp})
    return port


async def test_webrtc_caller_through_nosip_both_directions(janus: JanusInstance,
                                                           segment: ShardSegment) -> None:
    caller = WebRtcCaller(tone(440, 30.0, 48000, amplitude=0.3))
    with running_worker(segment, host=janus.host_ip):
        async with JanusClient(janus.url, api_secret=janus.api_secret) as client:
            await connect_nosip(janus, client, caller, segment, 0)
            counters = segment.slot(0).counters
            assert await _wait(lambda: counters.get("rx_packets") > 25), janus.log_text()[-3000:]
            up = await _read_uplink(segment, 0, 1.5)
            # the model speaks: 1 s of 660 Hz at 24 kHz into the downlink ring
            caller.clear_received()
            segment.slot(0).downlink.write(tone(660, 1.0, 24000).tobytes())
            assert await _wait(lambda: counters.get("frames_down") >= 50)
            await asyncio.sleep(0.5)
            down = caller.received()
            await caller.close()
    assert len(up) >= 16000
    assert abs(dominant_frequency(up[-16000:], 16000) - 440) < 5
    assert (np.abs(up[-16000:]) > 1000).mean() > 0.5
    loud = np.flatnonzero(np.abs(down) > 3000)
    assert len(loud) > 0, "caller heard nothing"
    speech = down[loud[0] : loud[0] + 48000]
    assert abs(dominant_frequency(speech[4800:-4800], 48000) - 660) < 5
    c = segment.slot(0).counters.snapshot()
    assert c["rx_invalid"] == 0 and c["rx_dropped"] == 0


async def test_dtmf_from_the_caller_becomes_slot_events(janus: JanusInstance, segment: ShardSegment) -> None:
    caller = WebRtcCaller(tone(440, 30.0, 48000, amplitude=0.3), dtmf=True)
    try:
        with running_worker(segment, host=janus.host_ip):
            async with JanusClient(janus.url, api_secret=janus.api_secret) as client:
                await connect_nosip(janus, client, caller, segment, 0, dtmf=True)
                slot = segment.slot(0)
                assert slot.dtmf_payload_type >= 0
                assert await _wait(lambda: slot.counters.get("rx_packets") > 25)
                caller.send_dtmf("5#", duration_ms=120)
                assert await _wait(lambda: slot.counters.get("dtmf_events") >= 2), slot.counters.snapshot()
                events = slot.pop_events()
    finally:
        await caller.close()
    assert [e for e in events if e[0] == EventCode.DTMF] == [(EventCode.DTMF, 5), (EventCode.DTMF, 11)]
    assert [e[1] for e in events if e[0] == EventCode.DTMF_END] == [120, 120]


async def test_three_concurrent_calls_stay_separate(janus: JanusInstance, segment: ShardSegment) -> None:
    """Three callers with different tones at once: each slot hears its own caller, and each caller
    hears its own slot's model audio (no cross-talk between ports/slots)."""
    up_tones, down_tones = (300, 500, 700), (400, 600, 800)
    callers = [WebRtcCaller(tone(f, 30.0, 48000, amplitude=0.3)) for f in up_tones]
    try:
        with running_worker(segment, host=janus.host_ip):
            async with JanusClient(janus.url, api_secret=janus.api_secret) as client:
                for i, caller in enumerate(callers):
                    await connect_nosip(janus, client, caller, segment, i)
                assert await _wait(lambda: all(segment.slot(i).counters.get("rx_packets") > 25
                                               for i in range(3)))
                for i in range(3):
                    segment.slot(i).uplink.skip(10**6)
                    callers[i].clear_received()
                    segment.slot(i).downlink.write(tone(down_tones[i], 1.0, 24000).tobytes())
                await asyncio.sleep(1.4)
                ups = []
                for i in range(3):
                    ring = segment.slot(i).uplink
                    ups.append(np.frombuffer(ring.read(ring.available() // 640 * 640) or b"", np.int16))
                downs = [c.received() for c in callers]
    finally:
        for c in callers:
            await c.close()
    for i in range(3):
        assert abs(dominant_frequency(ups[i][-16000:], 16000) - up_tones[i]) < 5
        loud = np.flatnonzero(np.abs(downs[i]) > 3000)
        assert len(loud) > 0, f"caller {i} heard nothing"
        heard = downs[i][loud[0] : loud[0] + 24000]
        assert abs(dominant_frequency(heard[2400:], 48000) - down_tones[i]) < 8


async def test_speech_both_ways_correlates(janus: JanusInstance, segment: ShardSegment) -> None:
    """espeak-ng speech from the caller reaches the uplink ring, and model speech reaches the caller,
    recognisably (waveform correlation at 16 kHz, envelope correlation through two Opus hops)."""
    said = speech("The quick brown fox jumps over the lazy dog.", 48000)
    model = speech("Hello, how can I help you today?", 24000)
    caller = WebRtcCaller(np.concatenate([np.zeros(9600, np.int16), said]))
    try:
        with running_worker(segment, host=janus.host_ip):
            async with JanusClient(janus.url, api_secret=janus.api_secret) as client:
                await connect_nosip(janus, client, caller, segment, 0)
                up = await _read_uplink(segment, 0, len(said) / 48000 + 1.5)
                caller.clear_received()
                segment.slot(0).downlink.write(model.tobytes())
                await asyncio.sleep(len(model) / 24000 + 0.8)
                down = caller.received()
    finally:
        await caller.close()
    ref16 = soxr.resample(said, 48000, 16000).astype(np.int16)
    corr, _lag = best_correlation(ref16, up, 16000)
    env_up = envelope_correlation(ref16, up, 16000)
    ref48 = soxr.resample(model, 24000, 48000).astype(np.int16)
    env_down = envelope_correlation(ref48, down, 48000)
    print(f"\nspeech: uplink waveform corr {corr:.2f} envelope {env_up:.2f}; "
          f"downlink envelope {env_down:.2f}")
    assert env_up > 0.85 and corr > 0.4  # measured 0.95 and 0.64
    assert env_down > 0.85  # measured 0.98
