"""Consent refused through the real supervisor (real Janus, Redis, media + AI workers, an aiortc caller):
the tenant's ``opt_in`` step times out, the AI worker plays the goodbye and marks the slot, and the
supervisor ends the call cleanly — the session is gone and counted as ``consent_refused``."""

from __future__ import annotations

import httpx
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from appliance.token import mint
from tests.supervisor.conftest import start_supervisor, stop_supervisor, wait_until

pytestmark = [pytest.mark.janus, pytest.mark.slow]


async def test_refused_consent_ends_the_call(tmp_path, redis_srv, janus):
    sup = start_supervisor(tmp_path, redis_srv.url, janus, extra={
        "tenants": {"strict": {"consent": "opt_in", "greeting": "Hi, an AI here."}},
        "compliance": {"consent_timeout_seconds": 1, "consent_prompt": "Press 1 to agree.",
                       "consent_refused_message": "Goodbye."}})
    pc = RTCPeerConnection()
    pc.addTrack(AudioStreamTrack())  # silence: the caller never presses 1
    try:
        await pc.setLocalDescription(await pc.createOffer())
        auth = {"Authorization": "Bearer " + mint(sup.private_key, sub="carol", extra={"tenant": "strict"})}
        async with httpx.AsyncClient(base_url=sup.api, timeout=20) as http:
            r = await http.post("/v1/sessions", headers=auth,
                                json={"type": "offer", "sdp": pc.localDescription.sdp})
            assert r.status_code == 201, (r.text, sup.log_tail())
            sid = r.json()["session_id"]
            await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))

            async def gone() -> bool:
                return (await http.get(f"/v1/sessions/{sid}", headers=auth)).status_code == 404

            await wait_until(gone, limit=40, what="call ended after the refusal")
            text = (await http.get(f"http://127.0.0.1:{sup.metrics_port}/metrics")).text
            assert 'va_sessions_ended_total{reason="consent_refused"} 1.0' in text, sup.log_tail()
            assert "call ended: no consent" in sup.log.read_text()
    finally:
        await pc.close()
        stop_supervisor(sup)
