"""The admin API: every endpoint checks its scope, bad input gets a 4xx naming the parameter.

The database is a real PostgreSQL (tests/records/conftest.py); the box side (live calls, hang up,
drain) is a small in-memory stand-in for the supervisor here — tests/records/test_call_e2e.py drives
the real supervisor.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from appliance.auth import JwtVerifier
from appliance.records import store
from appliance.records.admin import SCOPES, create_admin_app
from appliance.records.usage import BUILTIN_PRICES
from appliance.records.writer import Database
from appliance.token import generate_keys, mint
from tests.records.conftest import Db

AUD = "voice-appliance"


class Box:
    def __init__(self) -> None:
        self.calls: dict[str, dict[str, Any]] = {
            "box.live1": {"id": "box.live1", "sub": "alice", "state": "live",
                          "created_at": "2026-12-01T10:00:00Z",
                          "model_state": "live", "quality": {"loss_ratio": 0.0, "jitter_ms": 1.0},
                          "duration_seconds": 3.0, "webrtc": "up"}}
        self.hung: list[str] = []
        self._draining = False
        self.t0 = 0.0

    def live_calls(self) -> list[dict[str, Any]]:
        return list(self.calls.values())

    def live_call(self, call_id: str) -> dict[str, Any] | None:
        return self.calls.get(call_id)

    async def hangup(self, call_id: str) -> bool:
        if call_id not in self.calls:
            return False
        self.hung.append(call_id)
        del self.calls[call_id]
        return True

    def set_draining(self, on: bool) -> None:
        self._draining = on

    @property
    def draining(self) -> bool:
        return self._draining


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    priv, pub = generate_keys(tmp_path_factory.mktemp("keys"))
    return Path(priv).read_bytes(), Path(pub).read_bytes()


def tok(keys: tuple[bytes, bytes], *scopes: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(keys[0], sub="op", audience=AUD, scope=" ".join(scopes),
                                              ttl_seconds=300)}


@pytest.fixture
async def env(pg_db: Db, keys: tuple[bytes, bytes]) -> Any:
    conn = await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password, autocommit=True)
    await store.migrate(conn)
    t = time.time()
    items = []
    for i in range(5):
        cid = f"box.c{i}"
        items += [{"id": f"cr{i}", "kind": "call.created", "call": cid, "at": t - 100 + i, "box": "box",
                   "sub": "alice" if i % 2 else "bob", "mode": "direct", "model": "m"},
                  {"id": f"tr{i}", "kind": "transcript", "call": cid, "at": t, "speaker": "user",
                   "offset_ms": 10, "text": f"hello {i}"},
                  {"id": f"en{i}", "kind": "call.ended", "call": cid, "at": t - 50 + i, "reason": "hangup",
                   "box": "box", "sub": "x", "quality": {}}]
    async with conn.transaction():
        await store.apply_items(conn, items, webhooks=False)
        await conn.execute("INSERT INTO webhook_dead_letters (event_id, call_id, type, body, attempts,"
                           " created_at) VALUES ('evt_x', 'box.c1', 'call.ended', '{}', 12, now())")
    await conn.close()
    verifier = JwtVerifier(keys[1], audience=AUD, required_scope="")
    db = Database(pg_db.dsn, pg_db.password)
    box = Box()
    box.t0 = t  # when the calls were made up (tests filter relative to it)
    app = create_admin_app(verifier, box, db, prices=BUILTIN_PRICES)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as client:
        yield client, box
    await db.close()


ENDPOINTS = [
    ("GET", "/v1/admin/calls", "calls:read"),
    ("GET", "/v1/admin/calls?state=live", "calls:read"),
    ("GET", "/v1/admin/calls/box.c1", "records:read"),
    ("DELETE", "/v1/admin/calls/box.c2", "records:delete"),
    ("POST", "/v1/admin/calls/box.live1/hangup", "calls:write"),
    ("POST", "/v1/admin/drain", "calls:write"),
    ("POST", "/v1/admin/undrain", "calls:write"),
    ("GET", "/v1/admin/usage", "records:read"),
    ("GET", "/v1/admin/webhooks/dead-letters", "audit:read"),
]


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
async def test_each_endpoint_checks_its_scope(env: Any, keys: tuple[bytes, bytes], method: str, path: str,
                                              scope: str) -> None:
    client, _ = env
    assert (await client.request(method, path)).status_code == 401
    caller = await client.request(method, path, headers=tok(keys, "voice:session"))
    assert caller.status_code == 403 and scope in caller.json()["detail"]
    others = await client.request(method, path, headers=tok(keys, *(s for s in SCOPES if s != scope)))
    assert others.status_code == 403
    ok = await client.request(method, path, headers=tok(keys, scope))
    assert ok.status_code in (200, 204), ok.text


async def test_list_filters_and_paging(env: Any, keys: tuple[bytes, bytes]) -> None:
    client, box = env
    h = tok(keys, "calls:read")
    r = await client.get("/v1/admin/calls?state=ended&limit=2", headers=h)
    body = r.json()
    assert [c["id"] for c in body["calls"]] == ["box.c4", "box.c3"] and body["next"]
    ids = [c["id"] for c in body["calls"]]
    while body["next"]:
        nxt = body["next"]
        body = (await client.get(f"/v1/admin/calls?state=ended&limit=2&cursor={nxt}", headers=h)).json()
        ids += [c["id"] for c in body["calls"]]
    assert ids == ["box.c4", "box.c3", "box.c2", "box.c1", "box.c0"]
    alice = (await client.get("/v1/admin/calls?sub=alice", headers=h)).json()["calls"]
    assert {c["id"] for c in alice} == {"box.c1", "box.c3"}
    since = box.t0 - 97.5  # created at t-100+i: only c3, c4
    recent = (await client.get(f"/v1/admin/calls?since={since}", headers=h)).json()["calls"]
    assert [c["id"] for c in recent] == ["box.c4", "box.c3"]
    live = (await client.get("/v1/admin/calls?state=live", headers=h)).json()["calls"]
    assert [c["id"] for c in live] == ["box.live1"] and live[0]["model_state"] == "live"


@pytest.mark.parametrize(("query", "param"), [
    ("state=gone", "state"), ("since=yesterday", "since"), ("until=2026-13-01", "until"),
    ("limit=0", "limit"), ("limit=abc", "limit"), ("cursor=!!", "cursor")])
async def test_malformed_filters_are_400_naming_the_parameter(env: Any, keys: tuple[bytes, bytes], query: str,
                                                              param: str) -> None:
    client, _ = env
    r = await client.get(f"/v1/admin/calls?{query}", headers=tok(keys, "calls:read"))
    assert r.status_code == 400 and r.json()["detail"].startswith(param + ":")


async def test_record_unknown_and_paged(env: Any, keys: tuple[bytes, bytes]) -> None:
    client, _ = env
    h = tok(keys, "records:read")
    assert (await client.get("/v1/admin/calls/box.nope", headers=h)).status_code == 404
    assert (await client.get("/v1/admin/calls/..%2F..", headers=h)).status_code == 404
    rec = (await client.get("/v1/admin/calls/box.c1", headers=h)).json()
    assert rec["transcript"] == [{"offset_ms": 10, "speaker": "caller", "text": "hello 1"}]
    assert rec["state"] == "ended" and rec["end_reason"] == "hangup" and "usage" in rec and "quality" in rec
    bad = await client.get("/v1/admin/calls/box.c1?transcript_limit=99999", headers=h)
    assert bad.status_code == 400 and "transcript_limit" in bad.json()["detail"]
    live = (await client.get("/v1/admin/calls/box.live1", headers=h)).json()
    assert live["state"] == "live" and live["live"]["model_state"] == "live"


async def test_hangup_drain_delete_dead_letters(env: Any, keys: tuple[bytes, bytes]) -> None:
    client, box = env
    w = tok(keys, "calls:write")
    assert (await client.post("/v1/admin/calls/box.other/hangup", headers=w)).status_code == 404
    assert (await client.post("/v1/admin/calls/box.live1/hangup", headers=w)).status_code == 200
    assert box.hung == ["box.live1"]
    assert (await client.post("/v1/admin/drain", headers=w)).json() == {"draining": True}
    assert box.draining
    assert (await client.post("/v1/admin/undrain", headers=w)).json() == {"draining": False}
    d = tok(keys, "records:delete", "records:read")
    assert (await client.delete("/v1/admin/calls/box.c0", headers=d)).status_code == 204
    assert (await client.get("/v1/admin/calls/box.c0", headers=d)).status_code == 404
    assert (await client.delete("/v1/admin/calls/box.c0", headers=d)).status_code == 404
    dl = (await client.get("/v1/admin/webhooks/dead-letters", headers=tok(keys, "audit:read"))).json()
    assert [x["event_id"] for x in dl["dead_letters"]] == ["evt_x"]
    assert dl["dead_letters"][0]["attempts"] == 12


async def test_openapi_and_database_down(env: Any, keys: tuple[bytes, bytes], pg_db: Db) -> None:
    client, _ = env
    spec = (await client.get("/v1/admin/openapi.json")).json()
    assert set(spec["paths"]) == {"/v1/admin/calls", "/v1/admin/calls/{call_id}",
                                  "/v1/admin/calls/{call_id}/hangup", "/v1/admin/drain", "/v1/admin/undrain",
                                  "/v1/admin/webhooks/dead-letters", "/v1/admin/audit", "/v1/admin/usage",
                                  "/v1/admin/subjects/{sub}", "/v1/admin/subjects/{sub}/export",
                                  "/v1/admin/calls/{call_id}/recording",
                                  "/v1/admin/calls/{call_id}/recording/metadata",
                                  "/v1/admin/calls/{call_id}/recording/pause",
                                  "/v1/admin/calls/{call_id}/recording/resume"}
    pg_db.pg.server.stop()
    r = await client.get("/v1/admin/calls", headers=tok(keys, "calls:read"))
    assert r.status_code == 503 and r.headers["retry-after"]
    live = await client.get("/v1/admin/calls?state=live", headers=tok(keys, "calls:read"))
    assert live.status_code == 200  # live calls never need the database


def test_token_cli_mints_admin_scopes(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    import subprocess
    import sys

    (tmp_path / "priv.pem").write_bytes(keys[0])
    (tmp_path / "pub.pem").write_bytes(keys[1])
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[auth]\njwt_public_key_file = "{tmp_path / "pub.pem"}"\n'
                   f'jwt_private_key_file = "{tmp_path / "priv.pem"}"\n')
    out = subprocess.run([sys.executable, "-m", "appliance", "token", "--config", str(cfg), "--sub", "ops-1",
                          "--scope", "calls:read,records:read"], capture_output=True, text=True, check=True)
    p = JwtVerifier(keys[1], audience=AUD, required_scope="").verify(out.stdout.strip())
    assert p.sub == "ops-1" and p.scopes == {"calls:read", "records:read"}
