"""AudioBridge room: a real WebRTC caller and the media worker as a plain-RTP participant (FACTS: the
worker must send first, from the port it announced). Audio content is checked both ways."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from appliance.janus import AUDIOBRIDGE, JanusClient
from shm.segment import ShardSegment
from tests.harness.audio import dominant_frequency, tone
from tests.harness.janus import JanusInstance, WebRtcCaller
from tests.media.conftest import free_port_pair, running_worker
from tests.media.test_janus_nosip import _read_uplink, _wait

pytestmark = pytest.mark.janus


async def test_audiobridge_plain_rtp_participant(janus: JanusInstance, segment: ShardSegment) -> None:
    room = random.randrange(10_000, 1_000_000)
    caller = WebRtcCaller(tone(440, 30.0, 48000, amplitude=0.3))
    slot = segment.slot(1)
    with running_worker(segment, host=janus.host_ip):
        async with JanusClient(janus.url, api_secret=janus.api_secret) as client:
            session = await client.create_session()
            admin = await session.attach(AUDIOBRIDGE)
            await admin.audiobridge_create_room(room, admin_key=janus.audiobridge_admin_key,
                                                sampling_rate=16000)
            # the worker joins as a plain-RTP participant; Janus's side is known only after the join
            port = free_port_pair(janus.host_ip)
            slot.activate(session_id=f"room-{os.getpid()}", local_rtp_port=port, remote_rtp_ip="",
                          remote_rtp_port=0, payload_type=111, channels=1, dtmf_payload_type=-1, mode="room")
            side, _pid = await admin.audiobridge_join_rtp(room, janus.host_ip, port, display="ai")
            slot.set_remote(side.ip, side.port)
            # the caller joins over WebRTC
            h = await session.attach(AUDIOBRIDGE)
            sdp = await h.audiobridge_join_webrtc(room, (await caller.offer())["sdp"], display="caller")
            await caller.accept({"type": "answer", "sdp": sdp})
            counters = slot.counters
            assert await _wait(lambda: counters.get("rx_packets") > 50, 15), janus.log_text()[-3000:]
            up = await _read_uplink(segment, 1, 2.0)
            caller.clear_received()
            slot.downlink.write(tone(660, 1.5, 24000).tobytes())
            assert await _wait(lambda: counters.get("frames_down") >= 75)
            await _wait(lambda: False, 0.6)
            down = caller.received()
            await caller.close()
    tail = up[-16000:]
    assert (np.abs(tail) > 500).mean() > 0.5, "the worker heard nothing from the room"
    assert abs(dominant_frequency(tail, 16000) - 440) < 5
    loud = np.flatnonzero(np.abs(down) > 2000)
    assert len(loud) > 0, "the caller heard nothing from the worker"
    heard = down[loud[0] : loud[0] + 48000]
    assert abs(dominant_frequency(heard[4800:-4800], 48000) - 660) < 8
