"""The session API app over HTTP (httpx ASGI transport): contract, auth, ownership, limits, errors.

The control plane is :class:`tests.api.service_double.InMemoryService` (a test double of the
supervisor's SessionService); JWT verification, rate limiting (real redis-server), body limits, SDP
validation and TURN credentials are the real code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

import httpx
import pytest

from appliance.api import UpstreamError, create_app
from appliance.config import LimitsConfig, load_config, replace
from appliance.ratelimit import RateLimiter
from appliance.token import mint
from appliance.turn import turn_user
from tests.api.conftest import TURN_SECRET
from tests.api.sdp_fixtures import CHROME_OFFER
from tests.api.service_double import InMemoryService
from tests.api.test_auth import ISS, attack_tokens


def _empty(tmp_path):
    p = tmp_path / "empty.toml"
    p.write_text("")
    return p


@pytest.fixture
def service():
    return InMemoryService()


def client_for(app, ip="198.51.100.10") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 50000)), base_url="http://t")


@pytest.fixture
async def api(cfg, service):
    async with client_for(create_app(cfg, service)) as c:
        yield c


def auth(private_pem, sub="alice", **kw):
    return {"Authorization": "Bearer " + mint(private_pem, sub=sub, issuer=ISS, **kw)}


def offer_body(**kw):
    return {"sdp": CHROME_OFFER, "type": "offer", **kw}


async def test_session_lifecycle(api, service, private_pem):
    h = auth(private_pem)
    r = await api.post("/v1/sessions", json=offer_body(voice="Kore", language="de-DE"), headers=h)
    assert r.status_code == 201, r.text
    body = r.json()
    sid = body["session_id"]
    assert body["type"] == "answer" and body["sdp"].startswith("v=0")
    assert r.headers["location"] == f"/v1/sessions/{sid}" and r.headers["cache-control"] == "no-store"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["expires_at"])
    assert len(body["resume_token"]) >= 32
    # TURN credentials are coturn REST credentials for this caller (a keyed hash of sub), valid ≤ 10 min
    (turn,) = body["ice_servers"]
    assert turn["urls"][0] == "turn:turn.example.test:3478?transport=udp"
    expiry, user = turn["username"].split(":")
    assert user == turn_user(TURN_SECRET, "alice") and 0 < int(expiry) - time.time() <= 500
    mac = hmac.new(TURN_SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(mac).decode()
    # the control plane got the validated offer and the caller identity
    _, options, client = service.created_with[0]
    assert (options.voice, options.language, options.mode) == ("Kore", "de-DE", "direct")
    assert options.offer.opus_payload_type == 111
    assert client.sub == "alice" and client.ip == "198.51.100.10"

    cand = {"candidate": "candidate:1 1 udp 2122260223 192.0.2.5 54321 typ host", "sdpMid": "0",
            "sdpMLineIndex": 0}
    assert (await api.post(f"/v1/sessions/{sid}/ice", json=cand, headers=h)).status_code == 204
    assert (await api.post(f"/v1/sessions/{sid}/ice", json={"completed": True}, headers=h)).status_code == 204
    empty = {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0}
    assert (await api.post(f"/v1/sessions/{sid}/ice", json=empty, headers=h)).status_code == 204
    first, done, done_too = service.candidates[sid]
    assert first.candidate.startswith("candidate:1 ") and first.sdp_mid == "0"
    assert done is None and done_too is None

    r = await api.get(f"/v1/sessions/{sid}", headers=h)
    assert r.status_code == 200 and r.json()["state"] == "connecting"
    assert r.json()["details"]["voice"] == "Kore"
    assert (await api.delete(f"/v1/sessions/{sid}", headers=h)).status_code == 204
    r = await api.get(f"/v1/sessions/{sid}", headers=h)
    assert r.status_code == 404 and r.json() == {
        "error": "not_found", "detail": "no such session on this box (unknown, expired or ended)"}


async def test_only_owner_touches_session(api, service, private_pem):
    r = await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, "alice"))
    sid = r.json()["session_id"]
    bob = auth(private_pem, "bob")
    assert (await api.get(f"/v1/sessions/{sid}", headers=bob)).status_code == 404
    assert (await api.delete(f"/v1/sessions/{sid}", headers=bob)).status_code == 404
    r = await api.post(f"/v1/sessions/{sid}/ice", json={"completed": True}, headers=bob)
    assert r.status_code == 404
    assert sid in service.sessions and service.candidates[sid] == []
    assert (await api.get("/v1/sessions/../../etc", headers=bob)).status_code == 404


async def test_attack_set_is_401_json(api, service, private_pem, public_pem):
    for name, token in attack_tokens(private_pem, public_pem).items():
        r = await api.post("/v1/sessions", json=offer_body(), headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, (name, r.text)
        assert set(r.json()) == {"error", "detail"} and r.headers["www-authenticate"].startswith("Bearer")
    for headers in ({}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        r = await api.get("/v1/sessions/s_x", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "invalid_request"
    assert service.sessions == {}


@pytest.mark.parametrize(
    ("body", "status", "error", "reason"),
    [
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (b"[1,2]", 400, "invalid_request", "JSON object"),
        (b'{"sdp": "v=0", "type": "answer"}', 400, "invalid_request", "type"),
        (b'{"type": "offer"}', 400, "invalid_request", "sdp"),
        (b'{"sdp": "v=0\\r\\n", "type": "offer"}', 400, "invalid_sdp", "missing o= line"),
        (b'{"sdp": "x", "type": "offer", "evil": 1}', 400, "invalid_request", "evil"),
        (b'{"sdp": "x", "type": "offer", "mode": "party"}', 400, "invalid_request", "mode"),
        (b'{"sdp": "x", "type": "offer", "voice": "../../x"}', 400, "invalid_request", "voice"),
    ],
)
async def test_bad_create_bodies(api, private_pem, body, status, error, reason):
    h = {**auth(private_pem), "Content-Type": "application/json"}
    r = await api.post("/v1/sessions", content=body, headers=h)
    assert r.status_code == status and r.json()["error"] == error, r.text
    assert reason in r.json()["detail"]


async def test_body_limits_and_content_type(api, private_pem):
    h = auth(private_pem)
    big = offer_body(sdp=CHROME_OFFER + "a=x\r\n" * 2000)
    r = await api.post("/v1/sessions", json=big, headers=h)
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    async def chunks():  # no Content-Length: the limit still holds while streaming
        for _ in range(100):
            yield b" " * 100

    r = await api.post("/v1/sessions", content=chunks(), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = await api.post("/v1/sessions", content=b"sdp=x", headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 415


async def test_bad_ice_bodies(api, private_pem):
    h = auth(private_pem)
    sid = (await api.post("/v1/sessions", json=offer_body(), headers=h)).json()["session_id"]
    bad = [
        {},
        {"candidate": "rm -rf /", "sdpMid": "0"},
        {"candidate": "candidate:1 1 udp 1 x 1 typ host"},
        {"completed": True, "candidate": "candidate:1"},
        {"candidate": "c" * 2000, "sdpMid": "0"},
        {"candidate": "candidate:1", "sdpMLineIndex": -1},
    ]
    for body in bad:
        r = await api.post(f"/v1/sessions/{sid}/ice", json=body, headers=h)
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", (body, r.text)


async def test_full_and_not_ready_are_503(cfg, service, private_pem):
    service.capacity = 1
    async with client_for(create_app(cfg, service)) as api:
        h = auth(private_pem)
        assert (await api.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 201
        r = await api.post("/v1/sessions", json=offer_body(), headers=h)
        assert r.status_code == 503 and r.headers["retry-after"] == "7" and r.json()["error"] == "capacity"
        assert (await api.get("/readyz")).status_code == 200
        service.is_ready = False  # draining
        r = await api.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        r = await api.post("/v1/sessions", json=offer_body(), headers=h)
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        assert (await api.get("/healthz")).json()["status"] == "ok"


async def test_service_failures_are_clean(cfg, service, private_pem):
    app = create_app(cfg, service, create_timeout=0.2)
    async with client_for(app) as api:
        h = auth(private_pem)
        # a 5xx never echoes internal detail (Janus's reason, its URL): that goes to the log only
        service.fail_with = UpstreamError("janus refused: http://127.0.0.1:8088/janus said 490")
        r = await api.post("/v1/sessions", json=offer_body(), headers=h)
        assert r.status_code == 502 and r.json()["error"] == "upstream"
        assert "janus" not in r.text.lower() and "127.0.0.1" not in r.text and "490" not in r.text
        service.fail_with = UpstreamError("state store at redis://10.0.0.5 down", status=503, retry_after=2)
        r = await api.post("/v1/sessions", json=offer_body(), headers=h)
        assert r.status_code == 503 and "redis" not in r.text and r.headers["retry-after"] == "2"
        service.fail_with = RuntimeError("bug in the control plane")
        r = await api.post("/v1/sessions", json=offer_body(), headers=h)
        assert r.status_code == 500 and r.json()["error"] == "internal" and "bug" not in r.text
        service.fail_with, service.delay = None, 1.0
        r = await api.post("/v1/sessions", json=offer_body(), headers=h)
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        service.delay = 0
        assert (await api.post("/v1/sessions", json=offer_body(), headers=h)).status_code == 201
        r = await api.put("/v1/sessions", json={})
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
        r = await api.get("/nope")
        assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_openapi_document(api):
    r = await api.get("/openapi.json")
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    sid = "/v1/sessions/{session_id}"
    assert set(doc["paths"]) == {"/v1/sessions", sid, f"{sid}/ice", f"{sid}/refresh", "/v1/ice-servers",
                                 "/healthz", "/readyz"}
    ice = doc["paths"]["/v1/ice-servers"]["get"]
    assert ice["security"] == [{"bearer": []}] and {"200", "401", "429"} <= set(ice["responses"])
    assert set(doc["components"]["schemas"]["IceServersResponse"]["properties"]) == {"ice_servers", "ttl"}
    assert "CreateSessionRequest" in doc["components"]["schemas"]


async def test_ice_servers_before_the_offer(api, service, private_pem):
    """GET /v1/ice-servers: fresh coturn credentials a relay-only caller can gather relay candidates with."""
    r = await api.get("/v1/ice-servers", headers=auth(private_pem))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["ttl"] == 500
    (turn,) = body["ice_servers"]
    host = "turn.example.test"
    assert turn["urls"] == [f"turn:{host}:3478?transport=udp", f"turn:{host}:3478?transport=tcp",
                            f"turns:{host}:5349?transport=tcp"]
    expiry, user = turn["username"].split(":")
    assert 500 - 5 <= int(expiry) - time.time() <= 500
    assert user == turn_user(TURN_SECRET, "alice") and "alice" not in user  # keyed hash (coturn logs it)
    mac = hmac.new(TURN_SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(mac).decode()
    again = (await api.get("/v1/ice-servers", headers=auth(private_pem))).json()["ice_servers"][0]
    assert again["username"].split(":")[1] == user  # stable per caller: coturn's user-quota binds
    other = (await api.get("/v1/ice-servers", headers=auth(private_pem, sub="bob"))).json()["ice_servers"][0]
    assert other["username"].split(":")[1] != user
    assert service.sessions == {}  # no session was created


async def test_ice_servers_need_a_valid_token(api, private_pem, public_pem):
    for headers in ({}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        r = await api.get("/v1/ice-servers", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "invalid_request", r.text
        assert "ice_servers" not in r.text
    for name, token in attack_tokens(private_pem, public_pem).items():
        r = await api.get("/v1/ice-servers", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and set(r.json()) == {"error", "detail"}, (name, r.text)
    assert (await api.post("/v1/ice-servers", headers=auth(private_pem))).status_code == 405


async def test_ice_servers_ttl_capped_at_ten_minutes_and_stun_first(tmp_path, keypair, service, private_pem):
    cfg = replace(load_config(None, env={"VA_CONFIG": str(_empty(tmp_path))}),
                  auth={"jwt_public_key_file": str(keypair[1]), "issuer": ISS},
                  turn={"secret": TURN_SECRET, "ttl_seconds": 600, "uris": ["turn:192.0.2.7:3478"],
                        "stun_uris": ["stun:192.0.2.7:3478"]})
    async with client_for(create_app(cfg, service)) as api:
        body = (await api.get("/v1/ice-servers", headers=auth(private_pem))).json()
    assert body["ttl"] == 600
    stun, turn = body["ice_servers"]
    assert stun == {"urls": ["stun:192.0.2.7:3478"]} and turn["urls"] == ["turn:192.0.2.7:3478"]
    assert int(turn["username"].split(":")[0]) - time.time() <= 600
    with pytest.raises(ValueError, match=r"turn\.ttl_seconds"):  # config refuses more than ten minutes
        replace(cfg, turn={"ttl_seconds": 601})
    no_turn = replace(cfg, turn={"secret": ""})
    async with client_for(create_app(no_turn, service)) as api:
        body = (await api.get("/v1/ice-servers", headers=auth(private_pem))).json()
    assert body["ice_servers"] == [{"urls": ["stun:192.0.2.7:3478"]}]  # no secret: no TURN entry


async def test_ice_servers_signalling_rate_limit(cfg, service, private_pem, aredis, prefix):
    limits = LimitsConfig(signalling_per_minute=5, auth_failures_per_minute=2)
    limiter = RateLimiter(aredis, limits, prefix)
    async with client_for(create_app(cfg, service, limiter=limiter), "203.0.113.9") as api:
        codes = [(await api.get("/v1/ice-servers", headers=auth(private_pem))).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]  # per sub
        assert (await api.get("/v1/ice-servers", headers=auth(private_pem, "bob"))).status_code == 200
        codes = [(await api.get("/v1/ice-servers")).status_code for _ in range(3)]
        assert codes == [401, 401, 429]  # refused credentials: per IP
