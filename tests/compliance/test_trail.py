"""The audit trail in PostgreSQL: the record writer chains the AI worker's and the admin API's entries in
order, `voice-appliance audit verify` passes on the real table and names each kind of direct tampering
(UPDATE, DELETE, reorder), and the admin API serves it (paged) only with ``audit:read``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from appliance.auth import JwtVerifier
from appliance.compliance import trail
from appliance.config import load_config
from appliance.records.admin import create_admin_app
from appliance.records.spool import Spool
from appliance.records.usage import BUILTIN_PRICES
from appliance.records.writer import Database, RecordWriter
from appliance.token import generate_keys, mint
from tests.records.conftest import Db
from tests.records.test_admin import Box

AUD = "voice-appliance"


def _config(tmp_path: Path, db: Db) -> Path:
    (tmp_path / "pgpass").write_text(db.password)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[records]\ndsn = "{db.dsn}"\n'
                   f'password_file = "{tmp_path / "pgpass"}"\n')
    return cfg


def _verify(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "audit", "verify", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)


async def _ship_call(tmp_path: Path, db: Db, cfg: Path) -> RecordWriter:
    signer = trail.Signer(trail.load_signing_key(load_config(str(cfg))), every_entries=3)
    root = tmp_path / "spool"
    sp = Spool(root / "shard-0")
    cid = "box.a1"
    sp.append("call.created", cid, box="box", sub="alice", mode="direct", model="m")
    sp.append("event", cid, type="model_live", offset_ms=0, data={})
    sp.append("transcript", cid, speaker="user", offset_ms=5, text="secret words 4111 1111 1111 1111")
    sp.append("event", cid, type="turn", offset_ms=5, data={"speech_ms": 800, "response_ms": 420.5})
    sp.append("event", cid, type="tool_call", offset_ms=9, data={"name": "lookup", "duration_ms": 12.5,
                                                                 "outcome": "ok"})
    sp.append("event", cid, type="keypad", offset_ms=12, data={"digits": 4})
    sp.append("event", cid, type="model_reconnecting", offset_ms=20, data={"reason": "goAway"})
    sp.append("call.ended", cid, reason="hangup", box="box", sub="alice", quality={})
    sp.close()
    writer = RecordWriter(Database(db.dsn, db.password), root, signer=signer)
    assert await writer.drain(20)
    return writer


async def _rows(db: Db, sql: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(db.dsn, password=db.password) as conn:
        cur = await conn.execute(sql)
        return list(await cur.fetchall())


async def test_writer_chains_ai_events_in_order_and_verify_passes(pg_db: Db, tmp_path: Path) -> None:
    cfg = _config(tmp_path, pg_db)
    await _ship_call(tmp_path, pg_db, cfg)
    rows = await _rows(pg_db, "SELECT seq, actor, action, subject, details FROM audit_log ORDER BY seq")
    assert [r[2] for r in rows] == ["call.created", "model.session_opened", "turn.answered", "tool.called",
                                    "keypad.entry", "model.session_resuming", "call.ended",
                                    "transcript.masked"]
    assert [r[0] for r in rows] == list(range(1, 9))
    assert all(r[3] == "box.a1" for r in rows)
    dump = " ".join(str(r) for r in rows)
    assert "secret" not in dump and "4111" not in dump and "alice" not in dump  # ids/timings, no content
    assert '"digits":4' in rows[4][4] and '"response_ms":420.5' in rows[2][4]
    cps = await _rows(pg_db, "SELECT seq FROM audit_checkpoints ORDER BY seq")
    assert cps == [(8,)]  # every 3 entries: one batch of 8 → one checkpoint at its end
    p = await asyncio.to_thread(_verify, cfg)
    assert p.returncode == 0, p.stderr
    assert '"entries": 8' in p.stdout


TAMPER = {
    "edited": ["UPDATE audit_log SET details = '{\"digits\":5}' WHERE seq = 5"],
    "removed": ["DELETE FROM audit_log WHERE seq = 4"],
    "reordered": ["UPDATE audit_log SET seq = -1 WHERE seq = 3", "UPDATE audit_log SET seq = 3 WHERE seq = 4",
                  "UPDATE audit_log SET seq = 4 WHERE seq = -1"],
    "truncated": ["DELETE FROM audit_log WHERE seq >= 7"],
}
EXPECT = {"edited": "entry 5: content does not match its hash (edited)",
          "removed": "entry 5: expected sequence 4 (removed or reordered)",
          "reordered": "entry 3: previous-hash link broken",
          "truncated": "checkpoint at 8: its entry is missing (truncated)"}


@pytest.mark.parametrize("how", sorted(TAMPER))
async def test_verify_names_direct_tampering(pg_db: Db, tmp_path: Path, how: str) -> None:
    cfg = _config(tmp_path, pg_db)
    await _ship_call(tmp_path, pg_db, cfg)
    async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password,
                                                     autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute(TAMPER[how][0])  # the trigger refuses it
        # someone with the table owner's rights switches the trigger off: the chain still tells
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        for sql in TAMPER[how]:
            await conn.execute(sql)
    p = await asyncio.to_thread(_verify, cfg)
    assert p.returncode == 1
    assert EXPECT[how] in p.stderr, p.stderr


@pytest.fixture(scope="module")
def jwt_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    priv, pub = generate_keys(tmp_path_factory.mktemp("keys"))
    return Path(priv).read_bytes(), Path(pub).read_bytes()


async def test_admin_access_is_audited_and_readable_with_audit_read(pg_db: Db, tmp_path: Path,
                                                                    jwt_keys: tuple[bytes, bytes]) -> None:
    cfg = _config(tmp_path, pg_db)
    writer = await _ship_call(tmp_path, pg_db, cfg)
    sup = Spool(tmp_path / "spool" / "supervisor")

    def audit(actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        sup.append("audit", subject, actor=actor, action=action, subject=subject, details=details)

    app = create_admin_app(JwtVerifier(jwt_keys[1], audience=AUD, required_scope=""), Box(),
                           Database(pg_db.dsn, pg_db.password), prices=BUILTIN_PRICES, audit=audit)

    def tok(sub: str, scope: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + mint(jwt_keys[0], sub=sub, audience=AUD, scope=scope,
                                                  ttl_seconds=300)}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        ann = tok("ops-ann", "records:read")
        assert (await c.get("/v1/admin/calls/box.a1", headers=ann)).status_code == 200
        assert (await c.get("/v1/admin/audit", headers=ann)).status_code == 403
        sup.close()
        assert await writer.drain(20)
        r = await c.get("/v1/admin/audit?limit=5", headers=tok("auditor", "audit:read"))
        assert r.status_code == 200
        page1 = r.json()
        assert [e["seq"] for e in page1["entries"]] == [1, 2, 3, 4, 5] and page1["next"] == "5"
        r = await c.get(f"/v1/admin/audit?after={page1['next']}&limit=100",
                        headers=tok("auditor", "audit:read"))
        rest = r.json()["entries"]
        assert rest[0]["seq"] == 6 and r.json()["next"] is None
        admin = [e for e in rest if e["actor"].startswith("admin:")]
        assert [(e["actor"], e["action"], e["subject"], e["details"]["status"]) for e in admin] == [
            ("admin:ops-ann", "admin.get_call", "box.a1", 200),
            ("admin:ops-ann", "admin.audit_log", "", 403)]
        bad = await c.get("/v1/admin/audit?after=x", headers=tok("auditor", "audit:read"))
        assert bad.status_code == 400 and "after" in bad.json()["detail"]
    p = await asyncio.to_thread(_verify, cfg)
    assert p.returncode == 0, p.stderr
