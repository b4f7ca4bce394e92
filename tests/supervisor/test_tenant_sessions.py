"""Tenants and model routing through the real supervisor (real Janus, Redis, workers, aiortc callers):
the token's tenant and the routed model reach the slot options and the session record, the primary's
breaker opened in Redis sends the next call to the fallback, an unknown tenant is a 403."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest
import redis.asyncio as aioredis
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from appliance.breaker import Breaker, BreakerSettings, model_breaker_name
from appliance.token import mint
from shm.segment import ShardSegment, segment_name
from tests.supervisor.conftest import start_supervisor, stop_supervisor, wait_until

pytestmark = [pytest.mark.janus, pytest.mark.slow]

PRIMARY = f"gemini-2.5-flash-native-audio-t{secrets.token_hex(3)}"  # its own breaker key in the shared Redis
FALLBACK = "gemini-3.1-flash-live-preview"


async def caller() -> RTCPeerConnection:
    pc = RTCPeerConnection()
    pc.addTrack(AudioStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def test_tenant_and_routed_model_reach_slot_and_record(tmp_path, redis_srv, janus):
    tenants = {"bank": {"model": PRIMARY, "fallback_model": FALLBACK, "voice": "Kore",
                        "system_instruction": "You are the bank's agent."}}
    sup = start_supervisor(tmp_path, redis_srv.url, janus, slots=2, extra={"tenants": tenants})
    r = aioredis.from_url(redis_srv.url)
    pcs: list[RTCPeerConnection] = []
    seg = ShardSegment.attach(segment_name(sup.instance, 0))
    try:
        def auth(**claims) -> dict[str, str]:
            return {"Authorization": "Bearer " + mint(sup.private_key, sub="alice", extra=claims)}

        async with httpx.AsyncClient(base_url=sup.api, timeout=20) as http:
            async def create(body: dict | None = None, **claims) -> httpx.Response:
                pc = await caller()
                pcs.append(pc)
                return await http.post("/v1/sessions", headers=auth(**claims),
                                       json={"type": "offer", "sdp": pc.localDescription.sdp, **(body or {})})

            bad = await create(tenant="bakery")
            assert bad.status_code == 403, bad.text
            assert bad.json() == {"error": "unknown_tenant",
                                  "detail": "tenant 'bakery' is not configured on this appliance"}
            first = await create(tenant="bank")
            assert first.status_code == 201, (first.text, sup.log_tail())
            # the primary's breaker opens (as the AI workers would record it): the next call is routed away
            b = Breaker(model_breaker_name(PRIMARY), BreakerSettings(), r)
            for _ in range(3):
                await b.record(False)
            assert b.state == "open"
            no_opt_out = await create({"recording": "off"}, tenant="bank")  # a call can only opt in
            assert no_opt_out.status_code == 400 and "recording" in no_opt_out.text, no_opt_out.text
            second = await create({"recording": "audio"}, tenant="bank")  # this call opts in to recording
            assert second.status_code == 201, second.text
            default = await create()  # the default tenant (no claim)
            assert default.status_code == 503  # two slots: capacity, not a tenant problem
            want = {first.json()["session_id"]: PRIMARY, second.json()["session_id"]: FALLBACK}
            seen = {}
            for i in range(2):
                info = seg.slot(i).snapshot()
                assert info is not None
                seen[info.session_id] = (info.options.get("tenant"), info.options.get("model"),
                                         info.options.get("recording"))
            assert seen == {first.json()["session_id"]: ("bank", PRIMARY, None),
                            second.json()["session_id"]: ("bank", FALLBACK, "audio")}
            for sid, model in want.items():
                rec = json.loads(await r.get(f"va:session:{sid}"))
                assert (rec["tenant"], rec["model"]) == ("bank", model)
                got = await http.get(f"/v1/sessions/{sid}", headers=auth(tenant="bank"))
                details = got.json()["details"]
                assert (details["tenant"], details["model"]) == ("bank", model)
            text = (await http.get(f"http://127.0.0.1:{sup.metrics_port}/metrics")).text
            for model, route in ((PRIMARY, "primary"), (FALLBACK, "breaker_open")):
                line = f'va_tenant_sessions_total{{model="{model}",route="{route}",tenant="bank"}} 1.0'
                assert line in text
            for sid in want:
                gone = await http.delete(f"/v1/sessions/{sid}", headers=auth(tenant="bank"))
                assert gone.status_code == 204
            await wait_until(lambda: all(seg.slot(i).snapshot() is None for i in range(2)), what="slots free")
    finally:
        for pc in pcs:
            await pc.close()
        seg.close()
        await r.aclose()
        stop_supervisor(sup)
