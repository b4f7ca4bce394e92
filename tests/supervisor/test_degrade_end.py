"""The supervisor's half of a call the degradation menu ends (workers/ai/ivr.py): the AI worker writes
``model_state = "ended:<reason>"`` into the slot once the goodbye has played; the real supervisor (real
Janus, Redis, workers, an aiortc caller) tears the session down within its mirror period, frees the slot,
forgets the record and counts the reason. The worker's half (prompts, keypad, the record) is
tests/ai/test_ivr.py."""

from __future__ import annotations

import time

import httpx
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from appliance.token import mint
from shm.segment import ShardSegment, segment_name
from tests.supervisor.conftest import start_supervisor, stop_supervisor, wait_until

pytestmark = [pytest.mark.janus, pytest.mark.slow]


async def test_ended_by_the_degradation_menu_tears_the_session_down(tmp_path, redis_srv, janus):
    sup = start_supervisor(tmp_path, redis_srv.url, janus, slots=1)
    seg = ShardSegment.attach(segment_name(sup.instance, 0))
    pc = RTCPeerConnection()
    pc.addTrack(AudioStreamTrack())
    try:
        await pc.setLocalDescription(await pc.createOffer())
        auth = {"Authorization": "Bearer " + mint(sup.private_key, sub="alice")}
        async with httpx.AsyncClient(base_url=sup.api, timeout=20) as http:
            offer = {"type": "offer", "sdp": pc.localDescription.sdp}
            r = await http.post("/v1/sessions", headers=auth, json=offer)
            assert r.status_code == 201, (r.text, sup.log_tail())
            sid = r.json()["session_id"]
            slot = seg.slot(0)
            assert slot.snapshot() is not None
            slot.model_state = "ended:degraded_callback"  # what the AI worker writes after the goodbye
            t0 = time.monotonic()
            await wait_until(lambda: slot.snapshot() is None, 10, what="slot freed")
            assert time.monotonic() - t0 < 5
            got = await http.get(f"/v1/sessions/{sid}", headers=auth)
            assert got.status_code == 404, got.text  # finished: nothing to resume
            text = (await http.get(f"http://127.0.0.1:{sup.metrics_port}/metrics")).text
            assert 'va_sessions_ended_total{reason="degraded_callback"} 1.0' in text
    finally:
        await pc.close()
        seg.close()
        stop_supervisor(sup)
