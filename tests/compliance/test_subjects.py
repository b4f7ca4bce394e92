"""GDPR end to end over the real stores: records written through the encrypted spool and the writer
into PostgreSQL, session state in a real Redis, then the admin API exports a subject (decrypted) and
erases it — transcripts, events, usage, dead letters, Redis sessions — leaving another subject intact,
an audit tombstone without the subject's id, a receipt, and 404 for what is no longer there."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from appliance.auth import JwtVerifier
from appliance.compliance import trail
from appliance.compliance.atrest import db_keyring, spool_keyring
from appliance.compliance.envelope import MasterKeys
from appliance.records.admin import create_admin_app
from appliance.records.spool import Spool
from appliance.records.usage import BUILTIN_PRICES
from appliance.records.writer import Database, RecordWriter
from appliance.state import SessionRecord, SessionStore
from appliance.supervisor import _AdminControl
from appliance.token import generate_keys, mint
from tests.compliance.test_atrest import _all_text
from tests.records.conftest import Db
from tests.records.test_admin import Box
from tests.supervisor.conftest import redis_srv  # noqa: F401 - fixture

AUD = "voice-appliance"


class Control(Box):
    """The test's box for live calls; the subject methods are the supervisor's own (real Redis)."""

    def __init__(self, store: SessionStore) -> None:
        super().__init__()
        self.calls.clear()
        self.real = _AdminControl(SimpleNamespace(sessions=SimpleNamespace(store=store)))  # type: ignore[arg-type]

    async def subject_sessions(self, sub: str) -> list[dict[str, Any]]:
        return await self.real.subject_sessions(sub)

    async def delete_subject_sessions(self, sub: str) -> int:
        return await self.real.delete_subject_sessions(sub)


@pytest.fixture(scope="module")
def jwt_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    priv, pub = generate_keys(tmp_path_factory.mktemp("keys"))
    return Path(priv).read_bytes(), Path(pub).read_bytes()


def _calls(sp: Spool, cid: str, who: str, words: str) -> None:
    sp.append("call.created", cid, box="box", sub=who, mode="direct", model="m")
    sp.append("transcript", cid, speaker="user", offset_ms=5, text=f"{words} from {who}")
    sp.append("event", cid, type="turn", offset_ms=5, data={"speech_ms": 500, "response_ms": 300})
    sp.append("usage", cid, prompt_tokens=3, response_tokens=4, total_tokens=7)
    sp.append("call.ended", cid, reason="hangup", box="box", sub=who, quality={})


async def test_export_then_erase_a_subject(pg_db: Db, tmp_path: Path, redis_srv: Any,  # noqa: F811
                                           jwt_keys: tuple[bytes, bytes]) -> None:
    master = MasterKeys.parse(MasterKeys.new_line("m1"))
    root = tmp_path / "spool"
    shard = Spool(root / "shard-0", keyring=spool_keyring(master, root / "shard-0"))
    _calls(shard, "box.a1", "alice@example.com", "my flat is at 12 Elm Row")
    _calls(shard, "box.a2", "alice@example.com", "second call")
    _calls(shard, "box.b1", "bob", "bob's words")
    shard.close()
    key = trail.load_signing_key(SimpleNamespace(compliance=SimpleNamespace(audit_signing_key_file=""),
                                                 paths=SimpleNamespace(state_dir=str(tmp_path))))
    writer = RecordWriter(Database(pg_db.dsn, pg_db.password), root, master=master, signer=trail.Signer(key))
    assert await writer.drain(20)
    async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password,
                                                     autocommit=True) as conn:
        await conn.execute("INSERT INTO webhook_dead_letters (event_id, call_id, type, body, attempts,"
                           " created_at) VALUES ('evt_a', 'box.a1', 'call.ended', '{\"sub\":\"alice\"}', 9,"
                           " now())")

    client = aioredis.from_url(redis_srv.url)
    prefix = f"va{time.time_ns()}"  # this test's own key space in the shared Redis
    store = SessionStore(client, prefix=prefix)
    for sid, who, token_hash in (("box.a1", "alice@example.com", "h-a1"), ("box.b1", "bob", "h-b1")):
        rec = SessionRecord(session_id=sid, sub=who, resume_token_hash=token_hash, last_transcript="hi")
        await client.set(f"{prefix}:session:{sid}", rec.to_json())
        await client.set(f"{prefix}:resume:{token_hash}", sid)

    sup = Spool(root / "supervisor")

    def audit(actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        sup.append("audit", subject, actor=actor, action=action, subject=subject, details=details)

    control = Control(store)
    app = create_admin_app(JwtVerifier(jwt_keys[1], audience=AUD, required_scope=""), control,
                           Database(pg_db.dsn, pg_db.password), prices=BUILTIN_PRICES,
                           keyring=db_keyring(master), audit=audit)

    def tok(scope: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + mint(jwt_keys[0], sub="dpo", audience=AUD, scope=scope,
                                                  ttl_seconds=300)}

    alice = "/v1/admin/subjects/alice%40example.com"
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
            r = await c.get(alice + "/export", headers=tok("records:read"))
            assert r.status_code == 200, r.text
            exp = r.json()
            assert exp["sub"] == "alice@example.com"
            assert [x["id"] for x in exp["calls"]] == ["box.a1", "box.a2"]
            first = exp["calls"][0]["transcript"][0]["text"]
            assert first == "my flat is at 12 Elm Row from alice@example.com"  # opened for the export
            assert exp["calls"][0]["webhook_dead_letters"][0]["event_id"] == "evt_a"
            assert [s["session_id"] for s in exp["sessions"]] == ["box.a1"]

            assert (await c.delete(alice, headers=tok("records:read"))).status_code == 403
            control.calls["box.a9"] = {"id": "box.a9", "sub": "alice@example.com", "created_at": "x"}
            assert (await c.delete(alice, headers=tok("records:delete"))).status_code == 409  # live here
            del control.calls["box.a9"]
            r = await c.delete(alice, headers=tok("records:delete"))
            assert r.status_code == 200, r.text
            receipt = r.json()
            assert receipt["receipt_id"].startswith("del_") and receipt["by"] == "dpo"
            assert receipt["deleted"] == {"transcripts": 2, "events": 4, "usage": 2, "webhook_outbox": 0,
                                          "webhook_dead_letters": 1, "calls": 2, "redis_keys": 2}
            assert "alice" not in r.text

            assert (await c.delete(alice, headers=tok("records:delete"))).status_code == 404
            assert (await c.get(alice + "/export", headers=tok("records:read"))).status_code == 404
            nobody = await c.delete("/v1/admin/subjects/nobody", headers=tok("records:delete"))
            assert nobody.status_code == 404
            bad = await c.delete("/v1/admin/subjects/a%01b", headers=tok("records:delete"))
            assert bad.status_code == 400 and "sub" in bad.json()["detail"]
            bob = await c.get("/v1/admin/subjects/bob/export", headers=tok("records:read"))
            assert bob.status_code == 200 and [x["id"] for x in bob.json()["calls"]] == ["box.b1"]
    finally:
        keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}:*")]
        await client.delete(*keys) if keys else None
        await client.aclose()
    assert sorted(keys) == [f"{prefix}:resume:h-b1", f"{prefix}:session:box.b1"]  # alice's are gone

    sup.close()
    assert await writer.drain(20)
    dump = await _all_text(pg_db)
    assert "Elm Row" not in dump
    async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password) as conn:
        for table, col in (("calls", "id"), ("transcript_lines", "call_id"), ("call_events", "call_id"),
                           ("usage_reports", "call_id"), ("webhook_dead_letters", "call_id")):
            cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE {col} IN ('box.a1', 'box.a2')")
            assert (await cur.fetchone()) == (0,), table
        cur = await conn.execute("SELECT actor, subject, details FROM audit_log WHERE action ="
                                 " 'gdpr.subject_deleted'")
        (actor, subject, details), = await cur.fetchall()
        assert actor == "admin:dpo" and subject == receipt["receipt_id"] and '"calls":2' in details
        result = await trail.verify_db(conn, key.public_key())
        assert result.ok, result.problems
    assert "alice" not in dump  # nowhere in any table, the audit trail included
