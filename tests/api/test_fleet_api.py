"""Fleet rules of the session API: box-named session ids (clear 404s, never a silent drop) and the
client IP behind trusted proxies (X-Forwarded-For), with the real rate limiter on a real redis-server.

The control plane is :class:`tests.api.service_double.InMemoryService`, as in test_api.py.
"""

from __future__ import annotations

import time

import pytest

from appliance.api import SessionInfo, create_app
from appliance.config import LimitsConfig, derive_box_id, load_config, replace
from appliance.ratelimit import RateLimiter
from tests.api.service_double import InMemoryService
from tests.api.test_api import _empty, auth, client_for, offer_body
from tests.api.test_auth import ISS


def make_cfg(tmp_path, keypair, **api):
    return replace(load_config(None, env={"VA_CONFIG": str(_empty(tmp_path))}),
                   auth={"jwt_public_key_file": str(keypair[1]), "issuer": ISS},
                   api={"box_id": "box-1", **api})


def _session(service: InMemoryService, sid: str, sub: str = "alice", state: str = "active",
             **details) -> None:
    now = time.time()
    service.sessions[sid] = SessionInfo(sid, sub, state, "direct", now, now + 3600, details)
    service.candidates[sid] = []


CAND = {"candidate": "candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host", "sdpMid": "0"}


async def test_ids_naming_another_box_or_unknown_get_a_404_that_says_why(tmp_path, keypair, private_pem):
    service = InMemoryService()
    _session(service, "box-1.mine0000000000000000")
    _session(service, "box-2.theirs00000000000000")  # even if this box somehow knew it
    h = auth(private_pem)
    async with client_for(create_app(make_cfg(tmp_path, keypair), service)) as api:
        assert (await api.get("/v1/sessions/box-1.mine0000000000000000", headers=h)).status_code == 200
        for method, path, body in (("GET", "", None), ("DELETE", "", None), ("POST", "/ice", CAND)):
            r = await api.request(method, "/v1/sessions/box-2.theirs00000000000000" + path, headers=h,
                                  json=body)
            assert r.status_code == 404, (method, r.text)
            assert r.json()["error"] == "wrong_box"
            assert "'box-2'" in r.json()["detail"] and "'box-1'" in r.json()["detail"]
            r = await api.request(method, "/v1/sessions/box-1.unknown0000000000000" + path, headers=h,
                                  json=body)
            assert r.status_code == 404 and r.json()["error"] == "not_found", (method, r.text)
            assert "unknown, expired or ended" in r.json()["detail"]
        assert service.candidates["box-2.theirs00000000000000"] == []  # nothing reached the service
        assert "box-2.theirs00000000000000" in service.sessions
        r = await api.get("/v1/sessions/Box_1.x", headers=h)  # not an id at all
        assert r.status_code == 404 and "malformed" in r.json()["detail"]
        # someone else's session on this box: the plain 404 (ids cannot be probed)
        r = await api.get("/v1/sessions/box-1.mine0000000000000000", headers=auth(private_pem, sub="eve"))
        assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_moved_session_tells_its_owner_the_new_id(tmp_path, keypair, private_pem):
    service = InMemoryService()
    _session(service, "box-1.old00000000000000000", state="moved", moved_to="box-3.new0000000000000000",
             box="box-3")
    h = auth(private_pem)
    async with client_for(create_app(make_cfg(tmp_path, keypair), service)) as api:
        r = await api.get("/v1/sessions/box-1.old00000000000000000", headers=h)
        assert r.status_code == 200 and r.json()["state"] == "moved"
        assert r.json()["details"]["moved_to"] == "box-3.new0000000000000000"
        for method, path, body in (("DELETE", "", None), ("POST", "/ice", CAND)):
            r = await api.request(method, "/v1/sessions/box-1.old00000000000000000" + path, headers=h,
                                  json=body)
            assert r.status_code == 404 and r.json()["error"] == "moved", r.text
            assert "box-3.new0000000000000000" in r.json()["detail"]
        assert "box-1.old00000000000000000" in service.sessions
        r = await api.get("/v1/sessions/box-1.old00000000000000000", headers=auth(private_pem, sub="eve"))
        assert r.status_code == 404 and "box-3" not in r.text


@pytest.mark.parametrize("xff, expected", [
    ("203.0.113.5", "203.0.113.5"),
    ("1.2.3.4, 203.0.113.5, 10.0.0.6", "203.0.113.5"),  # forged left part ignored, inner LB skipped
    ("garbage, 203.0.113.5", "203.0.113.5"),
    ("203.0.113.5, garbage", "10.0.0.5"),  # a trusted hop wrote garbage: fall back to the peer
    ("10.0.0.7", "10.0.0.7"),  # only trusted hops: the leftmost one
    ("", "10.0.0.5"),
    ("[2001:db8::5]", "2001:db8::5"),
])
async def test_client_ip_from_trusted_proxy(tmp_path, keypair, private_pem, xff, expected):
    service = InMemoryService()
    cfg = make_cfg(tmp_path, keypair, trusted_proxies=["10.0.0.0/24"])
    async with client_for(create_app(cfg, service), ip="10.0.0.5") as api:
        headers = {**auth(private_pem), **({"X-Forwarded-For": xff} if xff else {})}
        r = await api.post("/v1/sessions", json=offer_body(), headers=headers)
        assert r.status_code == 201, r.text
    assert service.created_with[-1][2].ip == expected


async def test_callers_behind_one_proxy_get_their_own_buckets(tmp_path, keypair, private_pem, aredis, prefix):
    """Per-IP limits (refused credentials, unauthenticated paths; docs/security.md) use the client IP."""
    service = InMemoryService()
    cfg = make_cfg(tmp_path, keypair, trusted_proxies=["10.0.0.5/32"])
    limiter = RateLimiter(aredis, LimitsConfig(auth_failures_per_minute=1), prefix=prefix)
    app = create_app(cfg, service, limiter=limiter)
    bad = {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}

    async def create(peer: str, xff: str | None, headers: dict[str, str] = bad) -> int:
        async with client_for(app, ip=peer) as api:
            extra = {"X-Forwarded-For": xff} if xff else {}
            r = await api.post("/v1/sessions", json=offer_body(), headers={**headers, **extra})
            return r.status_code

    # two callers behind the load balancer: one bucket each
    assert await create("10.0.0.5", "203.0.113.1") == 401
    assert await create("10.0.0.5", "203.0.113.2") == 401
    assert await create("10.0.0.5", "203.0.113.1") == 429
    assert await create("10.0.0.5", "203.0.113.2") == 429
    # an untrusted peer cannot pick its bucket (or its logged address) with the header
    assert await create("198.51.100.7", "203.0.113.3") == 401
    assert await create("198.51.100.7", "203.0.113.4") == 429
    assert await create("198.51.100.7", "203.0.113.4", auth(private_pem)) == 201
    assert service.created_with[-1][2].ip == "198.51.100.7"


def test_box_id_from_hostname():
    assert derive_box_id("Box-1.example.com") == "box-1"
    assert derive_box_id("web_01") == "web-01"
    assert derive_box_id("-" * 40) == "box"
    assert len(derive_box_id("a" * 60)) == 31
