"""Session credentials: the create response's session token, its scope, refresh and expiry.

The token authorises trickle/GET/DELETE/refresh/resume of its own session only, lives ≤ 15 min, is
refreshed in its last 2 minutes, and its expiry never ends the call. Real API app and HMAC code; the
control plane is the in-memory double.
"""

from __future__ import annotations

import time

import pytest

from appliance.api import create_app
from appliance.config import AuthConfig, ConfigError
from appliance.session_token import REFRESH_WINDOW_SECONDS, SessionTokenError, SessionTokens
from tests.api.service_double import InMemoryService
from tests.api.test_api import auth, client_for, offer_body

KEY = b"k" * 32


@pytest.fixture
def tokens() -> SessionTokens:
    return SessionTokens(KEY, ttl_seconds=600)


@pytest.fixture
def service() -> InMemoryService:
    return InMemoryService()


@pytest.fixture
async def api(cfg, service, tokens):
    async with client_for(create_app(cfg, service, tokens=tokens)) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + token}


async def create(api, private_pem, sub="alice") -> dict:
    r = await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, sub))
    assert r.status_code == 201, r.text
    return r.json()


async def test_session_token_authorises_its_session(api, service, private_pem):
    body = await create(api, private_pem)
    sid, st = body["session_id"], body["session_token"]
    assert st.startswith("vst1.")
    exp = time.mktime(time.strptime(body["session_token_expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert 590 <= exp - time.time() <= 600  # ≤ 15 min, here the default 10
    h = bearer(st)
    assert (await api.get(f"/v1/sessions/{sid}", headers=h)).status_code == 200
    r = await api.post(f"/v1/sessions/{sid}/ice", json={"completed": True}, headers=h)
    assert r.status_code == 204
    assert (await api.delete(f"/v1/sessions/{sid}", headers=h)).status_code == 204
    assert sid not in service.sessions


async def test_session_token_is_for_one_session_only(api, service, private_pem):
    a, b = await create(api, private_pem), await create(api, private_pem)  # same sub, two sessions
    ha = bearer(a["session_token"])
    done = {"json": {"completed": True}}
    routes = (("GET", "", {}), ("DELETE", "", {}), ("POST", "/ice", done), ("POST", "/refresh", {}))
    for method, path, kw in routes:
        r = await api.request(method, f"/v1/sessions/{b['session_id']}{path}", headers=ha, **kw)
        assert r.status_code == 403 and r.json()["error"] == "forbidden", (method, path, r.text)
    assert b["session_id"] in service.sessions
    # it does not create new sessions either
    r = await api.post("/v1/sessions", json=offer_body(), headers=ha)
    assert r.status_code == 403 and "resume" in r.json()["detail"]


async def test_forged_and_foreign_tokens_are_401(cfg, api, private_pem):
    body = await create(api, private_pem)
    sid, st = body["session_id"], body["session_token"]
    head, payload, mac = st.split(".")
    other_box = SessionTokens(b"x" * 32).issue(sid, "alice")[0]  # another key: not our fleet
    forged = (f"{head}.{payload}.{mac[:-2]}AA", f"{head}.{payload[:-2]}x.{mac}", other_box, "vst1.",
              "vst1.a.b.c")
    for bad in forged:
        r = await api.get(f"/v1/sessions/{sid}", headers=bearer(bad))
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (bad, r.text)


async def test_expired_token_stops_signalling_not_the_call(api, service, tokens, private_pem):
    body = await create(api, private_pem)
    sid = body["session_id"]
    expired, _ = tokens.issue(sid, "alice", now=time.time() - 700)
    r = await api.get(f"/v1/sessions/{sid}", headers=bearer(expired))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    assert sid in service.sessions  # the call keeps running past any token
    # the owner's JWT still reaches it, and mints a fresh session token
    r = await api.post(f"/v1/sessions/{sid}/refresh", headers=auth(private_pem))
    assert r.status_code == 200 and r.json()["session_token"].startswith("vst1.")
    fresh = bearer(r.json()["session_token"])
    assert (await api.get(f"/v1/sessions/{sid}", headers=fresh)).status_code == 200


async def test_refresh_only_in_the_last_two_minutes(api, tokens, private_pem):
    body = await create(api, private_pem)
    sid = body["session_id"]
    r = await api.post(f"/v1/sessions/{sid}/refresh", headers=bearer(body["session_token"]))
    assert r.status_code == 409 and r.json()["error"] == "too_early"
    assert 470 <= int(r.headers["retry-after"]) <= 481  # 600 s left - the 120 s window
    nearly, _ = tokens.issue(sid, "alice", now=time.time() - (600 - REFRESH_WINDOW_SECONDS + 5))
    r = await api.post(f"/v1/sessions/{sid}/refresh", headers=bearer(nearly))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    fresh = r.json()
    grant = tokens.verify(fresh["session_token"])
    assert grant.session_id == sid and grant.sub == "alice" and grant.expires_at - time.time() > 590
    # a token of the same session with another sub (cannot be forged without the key) is still 404
    mallory, _ = tokens.issue(sid, "mallory", now=time.time() - 500)
    assert (await api.post(f"/v1/sessions/{sid}/refresh", headers=bearer(mallory))).status_code == 404


async def test_refresh_after_end_is_refused(api, tokens, private_pem):
    body = await create(api, private_pem)
    sid = body["session_id"]
    late, _ = tokens.issue(sid, "alice", now=time.time() - 550)
    assert (await api.delete(f"/v1/sessions/{sid}", headers=bearer(body["session_token"]))).status_code == 204
    r = await api.post(f"/v1/sessions/{sid}/refresh", headers=bearer(late))
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert (await api.post(f"/v1/sessions/{sid}/refresh", headers=auth(private_pem))).status_code == 404


async def test_session_token_resumes_its_own_session_only(api, private_pem):
    a, b = await create(api, private_pem), await create(api, private_pem)
    # b's resume token with a's session token: refused, and b's token is not spent
    r = await api.post("/v1/sessions", json=offer_body(resume_token=b["resume_token"]),
                       headers=bearer(a["session_token"]))
    assert r.status_code == 400 and r.json()["error"] == "invalid_resume"
    r = await api.post("/v1/sessions", json=offer_body(resume_token=a["resume_token"]),
                       headers=bearer(a["session_token"]))
    assert r.status_code == 201 and r.json()["session_id"] == a["session_id"]
    assert (await api.get(f"/v1/sessions/{a['session_id']}",
                          headers=bearer(r.json()["session_token"]))).status_code == 200


async def test_fleet_shares_the_key_file(tmp_path, cfg, private_pem):
    key_file = tmp_path / "session-token-key"
    key_file.write_text("s" * 43 + "\n")
    shared = AuthConfig(session_token_key_file=str(key_file))
    service = InMemoryService()  # one session store for both boxes (Redis in production)
    box1 = create_app(cfg, service, tokens=SessionTokens.from_config(shared))
    box2 = create_app(cfg, service, tokens=SessionTokens.from_config(shared))
    async with client_for(box1) as api1, client_for(box2) as api2:
        body = await create(api1, private_pem)
        r = await api2.get(f"/v1/sessions/{body['session_id']}", headers=bearer(body["session_token"]))
        assert r.status_code == 200
    key_file.write_text("short")
    with pytest.raises(ConfigError, match="session_token_key_file"):
        SessionTokens.from_config(shared)
    with pytest.raises(ConfigError, match="session_token_ttl"):
        SessionTokens(KEY, ttl_seconds=3600)


def test_token_format_unit(tokens):
    token, exp = tokens.issue("box1.abc", "alice", now=1000.0)
    assert exp == 1600.0
    assert tokens.verify(token, now=1599).session_id == "box1.abc"  # a '.' in the session id is fine
    with pytest.raises(SessionTokenError, match="expired"):
        tokens.verify(token, now=1600)
    with pytest.raises(SessionTokenError, match="too large"):
        tokens.verify("vst1." + "a" * 2000)
