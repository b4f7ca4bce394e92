"""Retention: each data class is purged past its days, live and resumed calls never, the purge is
audited and the audit chain still verifies afterwards (anchor); the CLI runs it; a purge racing a live
call's writes deletes none of them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from appliance.compliance import trail
from appliance.compliance.retention import Policy, purge
from appliance.records import store
from tests.records.conftest import Db

DAY = 86400.0
POLICY = Policy(transcripts_days=1, call_metadata_days=2, audit_days=5)


def _call(cid: str, created: float, ended: float | None, *,
          resumed: float | None = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [
        {"id": f"{cid}-c", "kind": "call.created", "call": cid, "at": created, "box": "b", "sub": "s",
         "mode": "direct"},
        {"id": f"{cid}-t", "kind": "transcript", "call": cid, "at": created + 5, "speaker": "user",
         "offset_ms": 5, "text": "hello"},
        {"id": f"{cid}-e", "kind": "event", "call": cid, "at": created + 6, "type": "turn", "offset_ms": 5,
         "data": {"response_ms": 300}}]
    if ended is not None:
        items.append({"id": f"{cid}-x", "kind": "call.ended", "call": cid, "at": ended, "reason": "hangup",
                      "box": "b", "sub": "s", "quality": {}, "created_at": created})
    if resumed is not None:
        items.append({"id": f"{cid}-r", "kind": "call.resumed", "call": cid, "at": resumed, "box": "b"})
    return items


async def _counts(conn: psycopg.AsyncConnection, cid: str) -> tuple[int, int, int]:
    out = []
    for table, col in (("transcript_lines", "call_id"), ("call_events", "call_id"), ("calls", "id")):
        cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE {col} = %s", (cid,))
        out.append(int((await cur.fetchone())[0]))  # type: ignore[index]
    return out[0], out[1], out[2]


async def _load(conn: psycopg.AsyncConnection, items: list[dict[str, Any]]) -> None:
    async with conn.transaction():
        await store.apply_items(conn, items, webhooks=False)
        await trail.append(conn, [trail.from_item(it) for it in items])


async def test_purge_per_class_spares_live_and_resumed_and_is_audited(aconn: psycopg.AsyncConnection,
                                                                       pg_db: Db, tmp_path: Path) -> None:
    await store.migrate(aconn)
    now = time.time()
    old = now - 10 * DAY
    await _load(aconn, _call("b.old", old, old + 60))
    await _load(aconn, _call("b.meta", now - 1.5 * DAY, now - 1.5 * DAY + 60))  # transcript only goes
    await _load(aconn, _call("b.live", old, None))  # ended_at NULL: live somewhere in the fleet
    await _load(aconn, _call("b.here", old, old + 60))  # ended, but this box says it is live again
    await _load(aconn, _call("b.resumed", old, old + 60, resumed=now - 10))
    await _load(aconn, _call("b.recent", now - 3600, now - 3000))
    key = trail.load_signing_key(_cfg(tmp_path, pg_db))
    counts = await purge(aconn, POLICY, live=["b.here"], now=now, signer=trail.Signer(key))
    assert await _counts(aconn, "b.old") == (0, 0, 0)
    assert await _counts(aconn, "b.meta") == (0, 2, 1)  # events: turn + ended
    for cid in ("b.live", "b.here", "b.resumed", "b.recent"):
        t, e, c = await _counts(aconn, cid)
        assert t == 1 and e >= 1 and c == 1, cid
    assert counts["transcript_lines"] == 2 and counts["calls"] == 1
    # audit: entries of the old calls come first in the chain → that prefix is purged, the rest stays
    assert counts["audit_log"] > 0
    cur = await aconn.execute("SELECT action, details FROM audit_log ORDER BY seq DESC LIMIT 1")
    action, details = await cur.fetchone()  # type: ignore[misc]
    assert action == "retention.purged" and json.loads(details)["deleted"] == counts
    cur = await aconn.execute("SELECT seq FROM audit_anchor")
    assert (await cur.fetchone()) is not None
    result = await trail.verify_db(aconn, key.public_key())
    assert result.ok, result.problems


def _cfg(tmp_path: Path, db: Db) -> Any:
    from appliance.config import load_config

    return load_config(str(_cfg_file(tmp_path, db)))


def _cfg_file(tmp_path: Path, db: Db) -> Path:
    (tmp_path / "pgpass").write_text(db.password)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[records]\ndsn = "{db.dsn}"\n'
                   f'password_file = "{tmp_path / "pgpass"}"\n'
                   '[compliance]\nretention_days_transcripts = 1\nretention_days_call_metadata = 2\n')
    return cfg


async def test_records_purge_cli_and_verify(aconn: psycopg.AsyncConnection, pg_db: Db,
                                            tmp_path: Path) -> None:
    await store.migrate(aconn)
    old = time.time() - 10 * DAY
    await _load(aconn, _call("b.old", old, old + 60))
    cfg = _cfg_file(tmp_path, pg_db)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli", *argv, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60)

    p = await asyncio.to_thread(run, "records", "purge")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["deleted"]["transcript_lines"] == 1
    assert await _counts(aconn, "b.old") == (0, 0, 0)
    p = await asyncio.to_thread(run, "audit", "verify")
    assert p.returncode == 0, p.stderr


async def test_purge_racing_a_live_call_deletes_none_of_it(aconn: psycopg.AsyncConnection, pg_db: Db) -> None:
    """The live call started "long ago" by the clock of a box that is behind: its rows carry old times."""
    await store.migrate(aconn)
    old = time.time() - 10 * DAY
    await _load(aconn, _call("b.long", old, None))
    stop = asyncio.Event()
    written = 1

    async def writer() -> None:
        nonlocal written
        async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password,
                                                         autocommit=True) as conn:
            k = 0
            while not stop.is_set():
                k += 1
                await _load(conn, [{"id": f"line{k}", "kind": "transcript", "call": "b.long",
                                    "at": old + 10 + k, "speaker": "user", "offset_ms": k, "text": "x"}])
                written += 1
                await asyncio.sleep(0)

    task = asyncio.create_task(writer())
    for _ in range(20):
        await purge(aconn, POLICY, live=["b.long"])
        await asyncio.sleep(0.01)
    stop.set()
    await task
    t, _e, c = await _counts(aconn, "b.long")
    assert written > 5 and t == written and c == 1
