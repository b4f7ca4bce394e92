"""The audit trail in PostgreSQL: which record items become audit entries, the one ordered append, the
signed checkpoints, reading it back and verifying it (the chain itself: ``compliance.audit``).

Single writer, in order: entries are appended only by the supervisor's record writer (from the record
items it ships: the AI worker's model/turn/tool/keypad events, the supervisor's call lifecycle, and the
``audit`` items the admin API spools for every request it serves) and by the operator's CLI commands
(``keys``, ``records purge``), each inside a transaction holding one advisory lock, so entries from
several boxes still form one chain. Tables: ``audit_log``, ``audit_checkpoints``, ``audit_anchor``
(migration 0004; a trigger refuses UPDATE and any DELETE outside a retention purge).

The checkpoint signing key is an Ed25519 private key in a credential (``compliance.audit_signing_key_file``,
raw 32 bytes base64; created like the master key when missing). ``voice-appliance audit verify`` needs
only the public key (``--public-key``; default: derived from the credential).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.compliance.audit import (
    AuditEntry,
    Checkpoint,
    VerifyResult,
    canonical,
    seal,
    sign_checkpoint,
    verify,
)
from appliance.config import credential_path

AUDIT_LOCK = 0x7661_6175_6474  # pg_advisory_xact_lock key ("vaaudt")

# AI worker / supervisor record events → audit actions (ids, names and timings only, never content)
EVENT_ACTIONS = {
    "model_live": "model.session_opened",
    "model_reconnecting": "model.session_resuming",
    "model_degraded": "model.session_degraded",
    "turn": "turn.answered",
    "tool_call": "tool.called",
    "keypad": "keypad.entry",
    "secure_entry_started": "keypad.secure_entry_started",
    "secure_entry": "keypad.secure_entry",  # that one happened and its outcome, never the digits
    "consent": "consent.recorded",
    "worker_restart": "worker.restarted",
    "recording_started": "recording.started",
    "recording_paused": "recording.paused",
    "recording_resumed": "recording.resumed",
}
_EVENT_FIELDS = {"turn": ("speech_ms", "response_ms"), "tool_call": ("name", "duration_ms", "outcome"),
                 "keypad": ("digits",), "model_degraded": ("reason",), "model_reconnecting": ("reason",),
                 "secure_entry_started": ("via",), "secure_entry": ("via", "outcome", "duration_ms"),
                 "consent": ("given", "how", "policy", "purposes"),
                 "recording_paused": ("reason",), "recording_resumed": ("reason",)}


@dataclass(frozen=True)
class Record:
    """One entry to append (before it is chained)."""

    at: float
    actor: str
    action: str
    subject: str = ""
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    every_entries: int = 1000
    every_seconds: float = 300.0


def from_item(it: dict[str, Any]) -> Record | None:
    """The audit entry a record item makes, or None."""
    kind, call, at = it.get("kind"), str(it.get("call") or ""), float(it.get("at") or time.time())
    match kind:
        case "audit":
            return Record(at, str(it.get("actor") or "system")[:200], str(it.get("action") or "")[:100],
                          str(it.get("subject") or call)[:200], dict(it.get("details") or {}))
        case "call.created":
            return Record(at, "system", "call.created", call,
                          {"box": it.get("box"), "mode": it.get("mode"), "model": it.get("model")})
        case "call.resumed":
            return Record(at, "system", "call.resumed", call, {"box": it.get("box")})
        case "call.ended":
            return Record(at, "system", "call.ended", call, {"reason": it.get("reason")})
        case "event":
            typ = str(it.get("type") or "")
            action = EVENT_ACTIONS.get(typ)
            if action is None:
                return None
            data = it.get("data") or {}
            details = {k: data[k] for k in _EVENT_FIELDS.get(typ, ()) if k in data}
            if it.get("offset_ms") is not None:
                details["offset_ms"] = it.get("offset_ms")
            return Record(at, "ai-worker", action, call, details)
    return None


# -- keys ----------------------------------------------------------------------------------------
def signing_key_path(cfg: Any) -> Path:
    configured = cfg.compliance.audit_signing_key_file
    if configured:
        return credential_path(configured)
    return Path(cfg.paths.state_dir) / "secrets" / "audit-signing-key"


def load_signing_key(cfg: Any, *, create: bool = True) -> Ed25519PrivateKey:
    path = signing_key_path(cfg)
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw,
                                                         serialization.PrivateFormat.Raw,
                                                         serialization.NoEncryption())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(raw).decode() + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    raw = base64.b64decode(path.read_text().strip(), validate=True)
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


# -- PostgreSQL ----------------------------------------------------------------------------------
_ENTRY_COLS = "seq, at, actor, action, subject, details, prev, hash"


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(seq=int(row[0]), at=float(row[1]), actor=row[2], action=row[3], subject=row[4],
                      details=json.loads(row[5]), prev=row[6], hash=row[7])


async def append(conn: Any, records: Iterable[Record | None], *, signer: Signer | None = None,
                 now: float | None = None) -> int:
    """Chain and insert ``records`` (inside the caller's transaction); sign a checkpoint when due."""
    todo = [r for r in records if r is not None]
    if not todo:
        return 0
    now = time.time() if now is None else now
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK,))
    cur = await conn.execute(f"SELECT {_ENTRY_COLS} FROM audit_log ORDER BY seq DESC LIMIT 1")
    row = await cur.fetchone()
    prev: AuditEntry | None = _entry(row) if row else None
    if prev is None:
        cur = await conn.execute("SELECT seq, hash FROM audit_anchor")
        anchor = await cur.fetchone()
        if anchor:
            prev = AuditEntry(seq=int(anchor[0]), at=0.0, actor="", action="", subject="", hash=anchor[1])
    rows = []
    for r in todo:
        prev = seal(prev, at=r.at, actor=r.actor, action=r.action, subject=r.subject,
                    details=_plain(r.details or {}))
        rows.append((prev.seq, round(prev.at, 6), prev.actor, prev.action, prev.subject,
                     canonical(dict(prev.details)).decode(), prev.prev, prev.hash))
    async with conn.cursor() as c:
        await c.executemany(f"INSERT INTO audit_log ({_ENTRY_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)", rows)
    assert prev is not None
    if signer is not None:
        cur = await conn.execute("SELECT seq, at FROM audit_checkpoints ORDER BY seq DESC LIMIT 1")
        last = await cur.fetchone()
        if last is None or prev.seq - int(last[0]) >= signer.every_entries or \
                now - float(last[1]) >= signer.every_seconds:
            await checkpoint(conn, signer.key, now)
    return len(rows)


def _plain(details: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe and exactly reproducible after a round trip through the table."""
    return json.loads(canonical({str(k): v for k, v in details.items()}))


async def checkpoint(conn: Any, key: Ed25519PrivateKey, now: float | None = None) -> Checkpoint | None:
    """Sign the newest entry (call under the audit lock, inside a transaction)."""
    cur = await conn.execute(f"SELECT {_ENTRY_COLS} FROM audit_log ORDER BY seq DESC LIMIT 1")
    row = await cur.fetchone()
    if row is None:
        return None
    cp = sign_checkpoint(_entry(row), key, round(time.time() if now is None else now, 6))
    await conn.execute("INSERT INTO audit_checkpoints (seq, hash, at, signature) VALUES (%s,%s,%s,%s)"
                       " ON CONFLICT (seq) DO NOTHING", (cp.seq, cp.hash, cp.at, cp.signature))
    return cp


async def verify_db(conn: Any, public_key: Ed25519PublicKey) -> VerifyResult:
    cur = await conn.execute("SELECT seq, hash FROM audit_anchor")
    anchor_row = await cur.fetchone()
    anchor = (int(anchor_row[0]), anchor_row[1]) if anchor_row else None
    cur = await conn.execute(f"SELECT {_ENTRY_COLS} FROM audit_log ORDER BY seq")
    entries = [_entry(r) for r in await cur.fetchall()]
    cur = await conn.execute("SELECT seq, hash, at, signature FROM audit_checkpoints ORDER BY seq")
    cps = [Checkpoint(int(r[0]), r[1], float(r[2]), r[3]) for r in await cur.fetchall()]
    return verify(entries, cps, public_key, anchor=anchor)


async def page(conn: Any, *, after: int, limit: int, subject: str | None = None) -> list[dict[str, Any]]:
    """Entries after sequence ``after``, oldest first (the admin API's ``GET /v1/admin/audit``)."""
    args: list[Any] = [after]
    sql = f"SELECT {_ENTRY_COLS} FROM audit_log WHERE seq > %s"
    if subject:
        sql += " AND subject = %s"
        args.append(subject)
    sql += " ORDER BY seq LIMIT %s"
    args.append(limit)
    cur = await conn.execute(sql, args)
    return [{"seq": e.seq, "at": e.at, "actor": e.actor, "action": e.action, "subject": e.subject,
             "details": dict(e.details), "prev": e.prev, "hash": e.hash}
            for e in (_entry(r) for r in await cur.fetchall())]
