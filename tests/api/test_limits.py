"""Limits after identity (appliance/ratelimit.py through the API app, real redis-server).

Per-sub request limits and the per-sub concurrent-session cap apply after the credential check, so a
client behind a shared address cannot lock out the others; per-IP limits apply only to unauthenticated
paths and to refused credentials. Two app instances on one Redis stand for two boxes of a fleet.
"""

from __future__ import annotations

import asyncio

import pytest

from appliance.api import UpstreamError, create_app
from appliance.config import LimitsConfig, RedisConfig
from appliance.ratelimit import RateLimiter, SessionCap
from appliance.state import redis_client
from tests.api.service_double import InMemoryService
from tests.api.test_api import auth, client_for, offer_body
from tests.harness.redis import redis_server

PROXY = "203.0.113.50"  # everyone behind one NAT / proxy


async def test_create_limit_is_per_sub_not_per_address(cfg, service, private_pem, aredis, prefix):
    limiter = RateLimiter(aredis, LimitsConfig(session_creates_per_minute=3), prefix)
    async with client_for(create_app(cfg, service, limiter=limiter), PROXY) as api:
        codes = [(await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, "alice"))
                  ).status_code for _ in range(4)]
        assert codes == [201, 201, 201, 429]
        r = await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, "alice"))
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 20
        assert r.json()["error"] == "rate_limited" and "for this user" in r.json()["detail"]
        # bob, behind the same address, is not affected by alice
        r = await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, "bob"))
        assert r.status_code == 201


async def test_signalling_limit_is_per_sub(cfg, service, private_pem, aredis, prefix):
    limiter = RateLimiter(aredis, LimitsConfig(signalling_per_minute=20), prefix)
    async with client_for(create_app(cfg, service, limiter=limiter), PROXY) as api:
        a = (await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, "alice"))).json()
        b = (await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, "bob"))).json()
        ha = {"Authorization": "Bearer " + a["session_token"]}
        url = f"/v1/sessions/{a['session_id']}"
        codes = [(await api.get(url, headers=ha)).status_code for _ in range(21)]
        assert codes == [200] * 20 + [429]
        r = await api.post(f"/v1/sessions/{a['session_id']}/ice", json={"completed": True}, headers=ha)
        assert r.status_code == 429  # the same user's bucket, whatever the route
        hb = {"Authorization": "Bearer " + b["session_token"]}
        assert (await api.get(f"/v1/sessions/{b['session_id']}", headers=hb)).status_code == 200


async def test_refused_credentials_limited_per_address(cfg, service, private_pem, aredis, prefix):
    limiter = RateLimiter(aredis, LimitsConfig(auth_failures_per_minute=3), prefix)
    app = create_app(cfg, service, limiter=limiter)
    async with client_for(app, PROXY) as api, client_for(app, "198.51.100.77") as other:
        bad = {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}
        codes = [(await api.post("/v1/sessions", json=offer_body(), headers=bad)).status_code
                 for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        r = await api.get("/v1/sessions/s_x", headers={"Authorization": "Bearer vst1.forged.mac"})
        assert r.status_code == 429 and "refused credentials" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        # a valid credential from the same address still works: limits follow identity
        r = await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, "carol"))
        assert r.status_code == 201
        assert (await other.post("/v1/sessions", json=offer_body(), headers=bad)).status_code == 401


async def test_unauthenticated_paths_limited_per_address_probes_never(cfg, service, aredis, prefix):
    limiter = RateLimiter(aredis, LimitsConfig(unauthenticated_per_minute=4), prefix)
    app = create_app(cfg, service, limiter=limiter)
    async with client_for(app, PROXY) as api, client_for(app, "198.51.100.78") as other:
        codes = [(await api.get("/openapi.json")).status_code for _ in range(5)]
        assert codes == [200] * 4 + [429]
        assert (await other.get("/openapi.json")).status_code == 200
        assert all([(await api.get("/healthz")).status_code == 200 for _ in range(10)])
        assert (await api.get("/readyz")).status_code == 200


async def test_concurrent_session_cap_is_fleet_wide(cfg, private_pem, aredis, prefix):
    limits = LimitsConfig(concurrent_sessions_per_sub=2)
    cap = SessionCap(aredis, limits, prefix)
    box1, box2 = InMemoryService(cap=cap), InMemoryService(cap=cap)
    app1, app2 = create_app(cfg, box1, cap=cap), create_app(cfg, box2, cap=cap)
    h = auth(private_pem, "alice")
    async with client_for(app1) as api1, client_for(app2) as api2:
        first = (await api1.post("/v1/sessions", json=offer_body(), headers=h)).json()
        assert (await api2.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 201
        r = await api1.post("/v1/sessions", json=offer_body(), headers=h)
        assert r.status_code == 429 and "2 live sessions" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        assert (await api2.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 429
        assert await cap.held("alice") == 2
        # another user is not capped by alice
        assert (await api1.post("/v1/sessions", json=offer_body(),
                                headers=auth(private_pem, "bob"))).status_code == 201
        # a session that ends gives its place back
        assert (await api1.delete(f"/v1/sessions/{first['session_id']}", headers=h)).status_code == 204
        assert await cap.held("alice") == 1
        assert (await api2.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 201
        # a failed setup does not keep its pending lease
        await api2.delete(f"/v1/sessions/{next(iter(box2.sessions))}", headers=h)
        box1.fail_with = UpstreamError("janus down")
        assert (await api1.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 502
        assert await cap.held("alice") == 1


async def test_cap_takes_parallel_creates_atomically(cfg, private_pem, aredis, prefix):
    cap = SessionCap(aredis, LimitsConfig(concurrent_sessions_per_sub=3), prefix)
    service = InMemoryService(cap=cap, delay=0.05)
    h = auth(private_pem, "dave")
    async with client_for(create_app(cfg, service, cap=cap)) as api:
        rs = await asyncio.gather(*[api.post("/v1/sessions", json=offer_body(), headers=h) for _ in range(8)])
    assert sorted(r.status_code for r in rs) == [201] * 3 + [429] * 5
    assert await cap.held("dave") == 3


async def test_cap_leases_expire_unless_renewed(aredis, prefix):
    """A box that dies without releasing stops counting once its leases run out; live ones are renewed."""
    cap = SessionCap(aredis, LimitsConfig(concurrent_sessions_per_sub=2), prefix)
    cap.LEASE_SECONDS = 0.6
    assert (await cap.acquire("erin", "p1", 5)).allowed
    await cap.confirm("erin", "p1", "s_live")
    await cap.confirm("erin", "p2", "s_dead_box")  # confirm never refuses (the slot was held)
    assert not (await cap.acquire("erin", "p3", 5)).allowed
    for _ in range(4):
        await asyncio.sleep(0.3)
        await cap.renew([("erin", "s_live")])
    assert await cap.held("erin") == 1
    assert (await cap.acquire("erin", "p3", 5)).allowed


async def test_cap_fails_open_when_redis_is_down(tmp_path, cfg, private_pem):
    with redis_server(tmp_path) as srv:
        client = redis_client(RedisConfig(url=srv.url), timeout=0.3)
        cap = SessionCap(client, LimitsConfig(concurrent_sessions_per_sub=1))
        service = InMemoryService(cap=cap)
        h = auth(private_pem, "frank")
        async with client_for(create_app(cfg, service, cap=cap)) as api:
            assert (await api.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 201
            assert (await api.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 429
            srv.stop()
            assert (await api.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 201
        await client.aclose()


@pytest.fixture
def service():
    return InMemoryService()
