"""Retention: delete what is older than its data class allows, audit the purge; `voice-appliance records
purge` (a systemd timer runs it daily; the supervisor, and so `voice-appliance run`, every
``compliance.purge_interval_seconds``).

Data classes (``compliance.retention_days_*``): ``transcripts`` (transcript lines), ``call_metadata``
(the call row, its events, usage, delivered webhook rows and dead letters), ``audit`` (audit entries:
six years by default, HIPAA's figure; the last purged entry becomes the chain's anchor so `audit
verify` still passes), ``recordings`` (this box's call recordings, ``compliance.recordings``: the parts
of calls that ended before the cutoff; deleted in the same purge and counted in its audit entry).

Never the live call's data: a call qualifies only when it ENDED before the cutoff (``ended_at`` is
cleared again by ``call.resumed``), a line only when it is itself older than the cutoff, and the
supervisor passes the ids of its live calls, excluded whatever their timestamps say. Everything a live
call writes is newer than any cutoff (retention is whole days), so a purge racing a call deletes none
of it. Each class is one statement; the purge and its audit entry commit together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.compliance import trail
from appliance.config import ConfigError, load_config

DAY = 86400.0


@dataclass(frozen=True)
class Policy:
    transcripts_days: int
    call_metadata_days: int
    audit_days: int
    recordings_days: int = 90

    @classmethod
    def from_config(cls, cfg: Any) -> Policy:
        c = cfg.compliance
        for name in ("transcripts", "call_metadata", "audit", "recordings"):
            if int(getattr(c, f"retention_days_{name}")) < 1:
                raise ConfigError(f"compliance.retention_days_{name}: at least 1 day")
        return cls(c.retention_days_transcripts, c.retention_days_call_metadata, c.retention_days_audit,
                   c.retention_days_recordings)


def _cut(now: float, days: int) -> datetime:
    return datetime.fromtimestamp(now - days * DAY, UTC)


async def purge(conn: Any, policy: Policy, *, live: Iterable[str] = (), now: float | None = None,
                signer: trail.Signer | None = None, actor: str = "system:retention",
                recordings: Any = None) -> dict[str, int]:
    """One purge in one transaction; returns rows deleted per table (also in the audit entry).
    ``recordings`` (a ``compliance.recordings.RecordingStore``): this box's recording files too."""
    now = time.time() if now is None else now
    live_ids = sorted(set(live))
    t_cut, m_cut = _cut(now, policy.transcripts_days), _cut(now, policy.call_metadata_days)
    a_cut = now - policy.audit_days * DAY
    counts: dict[str, int] = {}
    ended_before = ("SELECT id FROM calls WHERE ended_at IS NOT NULL AND ended_at < %s AND id <> ALL(%s)")
    async with conn.transaction():
        cur = await conn.execute(
            "DELETE FROM transcript_lines t WHERE t.at < %s AND t.call_id <> ALL(%s) AND NOT EXISTS ("
            " SELECT 1 FROM calls c WHERE c.id = t.call_id AND (c.ended_at IS NULL OR c.ended_at >= %s))",
            (t_cut, live_ids, t_cut))
        counts["transcript_lines"] = cur.rowcount
        for table in ("call_events", "usage_reports", "webhook_dead_letters"):
            cur = await conn.execute(f"DELETE FROM {table} WHERE call_id IN ({ended_before})",
                                     (m_cut, live_ids))
            counts[table] = cur.rowcount
        cur = await conn.execute(f"DELETE FROM webhook_outbox WHERE delivered_at IS NOT NULL AND call_id IN"
                                 f" ({ended_before})", (m_cut, live_ids))
        counts["webhook_outbox"] = cur.rowcount
        cur = await conn.execute("DELETE FROM calls c WHERE c.ended_at IS NOT NULL AND c.ended_at < %s AND"
                                 " c.id <> ALL(%s) AND NOT EXISTS (SELECT 1 FROM transcript_lines t WHERE"
                                 " t.call_id = c.id)", (m_cut, live_ids))
        counts["calls"] = cur.rowcount
        counts["audit_log"] = await _purge_audit(conn, a_cut)
        cutoffs = {"transcripts": t_cut.isoformat(), "call_metadata": m_cut.isoformat(),
                   "audit": datetime.fromtimestamp(a_cut, UTC).isoformat()}
        if recordings is not None:
            counts["recordings"] = await asyncio.to_thread(recordings.purge, policy.recordings_days,
                                                           live=live_ids, now=now)
            cutoffs["recordings"] = _cut(now, policy.recordings_days).isoformat()
        await trail.append(conn, [trail.Record(now, actor, "retention.purged", "",
                                               {"deleted": counts, "cutoffs": cutoffs})],
                           signer=signer, now=now)
    return counts


async def _purge_audit(conn: Any, cutoff: float) -> int:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (trail.AUDIT_LOCK,))
    # the longest PREFIX of the chain older than the cutoff (an entry's time is its event's, so a late
    # old entry after a recent one stays until everything before it may go)
    cur = await conn.execute("SELECT seq, hash FROM audit_log WHERE seq < coalesce((SELECT min(seq) FROM"
                             " audit_log WHERE at >= %s), 9223372036854775807) ORDER BY seq DESC LIMIT 1",
                             (cutoff,))
    last = await cur.fetchone()
    if last is None:
        return 0
    await conn.execute("SET LOCAL va.audit_purge = 'on'")
    cur = await conn.execute("DELETE FROM audit_log WHERE seq <= %s", (last[0],))
    n = cur.rowcount
    await conn.execute("DELETE FROM audit_checkpoints WHERE seq <= %s", (last[0],))
    await conn.execute("INSERT INTO audit_anchor (id, seq, hash) VALUES (true, %s, %s) ON CONFLICT (id)"
                       " DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash", (last[0], last[1]))
    await conn.execute("SET LOCAL va.audit_purge = 'off'")
    return int(n)


# -- `voice-appliance records purge` -------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["purge"])
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")


async def _run(args: argparse.Namespace) -> dict[str, int]:
    from appliance.compliance.recordings import RecordingStore
    from appliance.records import store
    from appliance.records.writer import Database

    cfg = load_config(args.config)
    policy = Policy.from_config(cfg)
    recordings = RecordingStore.from_config(cfg)
    if not cfg.records.dsn:  # no database, no audit trail: only this box's recordings
        print("records purge: records.dsn is not set; purging recordings only", file=sys.stderr)
        return {"recordings": recordings.purge(policy.recordings_days)}
    c = cfg.compliance
    signer = trail.Signer(trail.load_signing_key(cfg), c.audit_checkpoint_entries, c.audit_checkpoint_seconds)
    db = Database.from_config(cfg)
    try:
        async with db.connection() as conn:
            await store.migrate(conn)
            return await purge(conn, policy, signer=signer, actor="cli:records-purge", recordings=recordings)
    finally:
        await db.close()


def main(args: argparse.Namespace) -> int:
    try:
        print(json.dumps({"deleted": asyncio.run(_run(args))}))
        return 0
    except (ConfigError, OSError) as exc:
        print(f"records purge: {exc}", file=sys.stderr)
        return 2
