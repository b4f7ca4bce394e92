"""Encryption at rest applied to real records: spool bytes and every PostgreSQL column hold no transcript
plaintext (and no PAN); the admin API opens sealed lines, names a tampered one without crashing; and
`voice-appliance keys rotate` / `rewrap` run against the live database while old data stays readable."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from appliance.auth import JwtVerifier
from appliance.cli import main as cli_main
from appliance.compliance.atrest import db_keyring, ensure_master_key, spool_keyring
from appliance.compliance.envelope import MasterKeys
from appliance.records.admin import create_admin_app
from appliance.records.spool import Spool
from appliance.records.usage import BUILTIN_PRICES
from appliance.records.writer import Database, RecordWriter
from appliance.token import generate_keys, mint
from tests.records.conftest import Db
from tests.records.test_admin import Box

AUD = "voice-appliance"
SECRET = "my mother's maiden name is Zanzibarova"
PAN = "4111 1111 1111 1111"


def _master(tmp_path: Path) -> tuple[Path, MasterKeys]:
    path = tmp_path / "secrets" / "master-key"
    assert ensure_master_key(path)
    assert not ensure_master_key(path)  # never replaced once there
    assert path.stat().st_mode & 0o777 == 0o600
    return path, MasterKeys.from_file(path)


def _write_call(root: Path, master: MasterKeys, cid: str, text: str) -> Path:
    sp = Spool(root / "shard-0", keyring=spool_keyring(master, root / "shard-0"))
    sp.append("call.created", cid, box="box", sub="alice", mode="direct", model="m")
    sp.append("transcript", cid, speaker="user", offset_ms=10, text=text)
    sp.append("transcript", cid, speaker="model", offset_ms=900, text="thanks, noted")
    sp.append("call.ended", cid, reason="hangup", box="box", sub="alice", quality={})
    sp.sync()
    return root / "shard-0"


async def _all_text(db: Db) -> str:
    """Every row of every table in the database, as text."""
    out = []
    async with await psycopg.AsyncConnection.connect(db.dsn, password=db.password) as conn:
        cur = await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for (table,) in await cur.fetchall():
            c = await conn.execute(f'SELECT t::text FROM "{table}" t')
            out += [r[0] for r in await c.fetchall()]
    return "\n".join(out)


async def _cli(key_path: Path, *argv: str) -> int:
    return await asyncio.to_thread(_cli_sync, key_path, *argv)


def _cli_sync(key_path: Path, *argv: str) -> int:
    """The real `voice-appliance` command, in a subprocess (it runs its own event loop); it never
    prints master key material."""
    p = subprocess.run([sys.executable, "-m", "appliance.cli", *argv], capture_output=True, text=True,
                       timeout=60)
    for line in key_path.read_text().splitlines():
        assert line.split(":", 1)[1] not in p.stdout + p.stderr
    assert p.returncode == 0, p.stderr
    return p.returncode


def _headers(keys: tuple[bytes, bytes]) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(keys[0], sub="op", audience=AUD, scope="records:read",
                                              ttl_seconds=300)}


@pytest.fixture(scope="module")
def jwt_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    priv, pub = generate_keys(tmp_path_factory.mktemp("keys"))
    return Path(priv).read_bytes(), Path(pub).read_bytes()


async def _get(app: Any, keys: tuple[bytes, bytes], cid: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as c:
        return await c.get(f"/v1/admin/calls/{cid}", headers=_headers(keys))


def _app(db: Db, keys: tuple[bytes, bytes], master: MasterKeys) -> Any:
    verifier = JwtVerifier(keys[1], audience=AUD, required_scope="")
    return create_admin_app(verifier, Box(), Database(db.dsn, db.password), prices=BUILTIN_PRICES,
                            keyring=db_keyring(master))


async def test_no_plaintext_in_spool_or_database_and_api_opens(pg_db: Db, tmp_path: Path,
                                                               jwt_keys: tuple[bytes, bytes]) -> None:
    _, master = _master(tmp_path)
    root = tmp_path / "spool"
    shard = _write_call(root, master, "box.s1", f"{SECRET}, card {PAN}, cvv 123")
    spool_bytes = b"".join(p.read_bytes() for p in shard.iterdir())
    assert b"Zanzibarova" not in spool_bytes and b"4111" not in spool_bytes and b"noted" not in spool_bytes
    assert b"call.created" in spool_bytes  # the item frame itself stays readable for the writer

    writer = RecordWriter(Database(pg_db.dsn, pg_db.password), root, master=master)
    assert await writer.drain(20)
    dump = await _all_text(pg_db)
    assert "box.s1" in dump  # the dump really covers the records
    for plain in ("Zanzibarova", "4111", "noted", "[card number]"):
        assert plain not in dump, plain

    r = await _get(_app(pg_db, jwt_keys, master), jwt_keys, "box.s1")
    assert r.status_code == 200, r.text
    rec = r.json()
    texts = [t["text"] for t in rec["transcript"]]
    assert texts == [f"{SECRET}, card [card number], cvv [security code]", "thanks, noted"]
    assert "errors" not in rec
    masked = [e for e in rec["events"] if e["type"] == "pan_masked"]
    assert masked and masked[0]["data"] == {"pans": 1, "security_codes": 1}


async def test_tampered_ciphertext_is_a_named_error_not_a_crash(pg_db: Db, tmp_path: Path,
                                                                jwt_keys: tuple[bytes, bytes]) -> None:
    _, master = _master(tmp_path)
    root = tmp_path / "spool"
    _write_call(root, master, "box.t1", SECRET)
    assert await RecordWriter(Database(pg_db.dsn, pg_db.password), root, master=master).drain(20)
    async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password,
                                                     autocommit=True) as conn:
        cur = await conn.execute("SELECT id FROM transcript_lines WHERE speaker = 'caller'")
        (line_id,) = await cur.fetchone()  # type: ignore[misc]
        # flip the last byte (the GCM tag) of the caller's line
        await conn.execute("UPDATE transcript_lines SET text_sealed = overlay(text_sealed placing"
                           " decode(lpad(to_hex(get_byte(text_sealed, length(text_sealed) - 1) # 1), 2, '0'),"
                           " 'hex') from length(text_sealed)) WHERE id = %s", (line_id,))
    app = _app(pg_db, jwt_keys, master)
    r = await _get(app, jwt_keys, "box.t1")
    assert r.status_code == 200, r.text
    rec = r.json()
    bad, good = rec["transcript"]
    assert bad["text"] is None and bad["error"]["item"] == f"transcript_lines/{line_id}"
    assert "failed authentication" in bad["error"]["detail"]
    assert good["text"] == "thanks, noted"
    assert rec["errors"] == [bad["error"]]
    assert "Zanzibarova" not in r.text

    # the wrong master key: every line is a named error, still no crash and no plaintext
    other = _app(pg_db, jwt_keys, MasterKeys.parse(MasterKeys.new_line(master.current_id)))
    r = await _get(other, jwt_keys, "box.t1")
    assert r.status_code == 200 and all(t["text"] is None for t in r.json()["transcript"])
    assert "does not open under master key" in r.json()["errors"][1]["detail"]


async def test_keys_rotate_and_rewrap_without_downtime(pg_db: Db, tmp_path: Path,
                                                       jwt_keys: tuple[bytes, bytes]) -> None:
    key_path, master = _master(tmp_path)
    cfg = tmp_path / "appliance.toml"
    (tmp_path / "pgpass").write_text(pg_db.password)
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[records]\ndsn = "{pg_db.dsn}"\n'
                   f'password_file = "{tmp_path / "pgpass"}"\n'
                   f'[compliance]\nmaster_key_file = "{key_path}"\n')
    root = tmp_path / "spool"
    writer = RecordWriter(Database(pg_db.dsn, pg_db.password), root, master=master, idle_seconds=0.05)
    _write_call(root, master, "box.k1", "before rotation")
    assert await writer.drain(20)

    assert await _cli(key_path, "keys", "rotate", "--config", str(cfg)) == 0
    _write_call(root, master, "box.k2", "after rotation")
    assert await writer.drain(20)  # the same running writer: picks a new data key at its next batch
    async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password) as conn:
        cur = await conn.execute("SELECT count(*), count(*) FILTER (WHERE retired) FROM data_keys")
        assert await cur.fetchone() == (2, 1)

    # a new master line, rewrap, then the old line is dropped: everything still opens
    assert await _cli(key_path, "keys", "new-master", "--config", str(cfg)) == 0
    assert await _cli(key_path, "keys", "rewrap", "--config", str(cfg)) == 0
    lines = key_path.read_text().splitlines()
    assert len(lines) == 2
    key_path.write_text(lines[1] + "\n")
    new_master = MasterKeys.from_file(key_path)
    assert new_master.current_id == "m2"
    app = _app(pg_db, jwt_keys, new_master)
    for cid, text in (("box.k1", "before rotation"), ("box.k2", "after rotation")):
        r = await _get(app, jwt_keys, cid)
        assert r.status_code == 200 and r.json()["transcript"][0]["text"] == text, r.text
    async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password) as conn:
        cur = await conn.execute("SELECT DISTINCT kek_id FROM data_keys")
        assert [r[0] for r in await cur.fetchall()] == ["m2"]
        cur = await conn.execute("SELECT action, details FROM audit_log WHERE actor = 'cli:keys'"
                                 " ORDER BY seq")
        rows = await cur.fetchall()
        assert [r[0] for r in rows] == ["keys.rotate", "keys.rewrap"]
        assert '"rewrapped":2' in rows[1][1]


def test_keys_cli_reports_a_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n')
    assert cli_main(["keys", "rotate", "--config", str(cfg)]) == 2
    assert "records.dsn" in capsys.readouterr().err


def test_supervisor_run_creates_the_master_key(tmp_path: Path) -> None:
    from appliance.compliance.atrest import load_master
    from appliance.config import load_config

    cfg_file = tmp_path / "appliance.toml"
    cfg_file.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n')
    cfg = load_config(str(cfg_file))
    m = load_master(cfg)
    assert (tmp_path / "secrets" / "master-key").exists()
    assert load_master(cfg).current_id == m.current_id


async def test_webhook_outbox_and_dead_letters_stay_sealed(pg_db: Db, tmp_path: Path) -> None:
    """The outbox holds the transcript events until delivered and their fixed bodies for retries, the
    dead letters for good: all sealed; the receiver still gets the (masked) plain text."""
    from appliance.records.webhooks import WebhookSender
    from tests.records.test_webhooks import Receiver

    _, master = _master(tmp_path)
    root = tmp_path / "spool"
    _write_call(root, master, "box.w1", f"{SECRET}, card {PAN}")
    assert await RecordWriter(Database(pg_db.dsn, pg_db.password), root, master=master,
                              webhooks=True).drain(20)
    receiver = Receiver()
    ok = WebhookSender(Database(pg_db.dsn, pg_db.password), receiver.url("fail"), b"k", prices=BUILTIN_PRICES,
                       poll_seconds=0.05, max_age_seconds=0, keyring=db_keyring(master))
    task = asyncio.create_task(ok.run())
    try:
        for _ in range(200):
            async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password) as conn:
                cur = await conn.execute("SELECT count(*) FROM webhook_outbox")
                if (await cur.fetchone()) == (0,):
                    break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ok.aclose()
        await ok.db.close()
        receiver.close()
    bodies = [json.loads(b) for _, _, b in receiver.got]
    lines = [b["data"]["text"] for b in bodies if b["type"] == "call.transcript"]
    assert f"{SECRET}, card [card number]" in lines
    ended = [b for b in bodies if b["type"] == "call.ended"]
    assert ended and ended[0]["data"]["transcript"][0]["text"].startswith(SECRET)
    dump = await _all_text(pg_db)
    assert "evt_" in dump  # the dead letters are there…
    for plain in ("Zanzibarova", "4111", "noted"):
        assert plain not in dump, plain  # …and sealed
