"""A tamper-evident audit trail: append-only entries, each carrying the previous entry's hash, plus
signed checkpoints.

What it proves (docs/compliance.md): editing an entry changes its hash; removing or reordering entries
breaks a ``prev`` link or the sequence; rewriting the whole tail after an edit is caught by the next
signed checkpoint, whose Ed25519 signature only the checkpoint key can make (the verifier needs only the
public key, so an auditor can check a copy without being able to forge one). What it cannot prove
alone: that the newest entries after the last checkpoint were not cut off — checkpoints are made every
``compliance.audit_checkpoint_entries`` entries and at least every few minutes, so the window is small.

Entries hold ids, names and timings, never content (no transcript text, no digits): the audit trail is
kept for years (HIPAA's six) and must not become a second copy of personal data. Hashes are SHA-256 over
a canonical JSON encoding (sorted keys, no whitespace) so any language can re-verify them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: float
    actor: str  # "system", "ai-worker", "admin:<sub>"
    action: str  # "model.session_opened", "turn.answered", "admin.calls.read", ...
    subject: str  # a call id, a data-subject id, or ""
    details: Mapping[str, Any] = field(default_factory=dict)
    prev: str = GENESIS
    hash: str = ""

    def body(self) -> list[Any]:
        return [self.seq, round(self.at, 6), self.actor, self.action, self.subject, dict(self.details),
                self.prev]

    def computed_hash(self) -> str:
        return hashlib.sha256(canonical(self.body())).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: float
    signature: str  # hex Ed25519 over canonical([seq, hash, at])

    def message(self) -> bytes:
        return canonical([self.seq, self.hash, round(self.at, 6)])


def seal(prev: AuditEntry | None, *, seq: int | None = None, at: float, actor: str, action: str,
         subject: str = "", details: Mapping[str, Any] | None = None) -> AuditEntry:
    """The next entry after ``prev`` (``None`` for the first), its hash filled in."""
    entry = AuditEntry(seq=(prev.seq + 1 if prev else 1) if seq is None else seq, at=at, actor=actor,
                       action=action, subject=subject, details=dict(details or {}),
                       prev=prev.hash if prev else GENESIS)
    return AuditEntry(**{**entry.__dict__, "hash": entry.computed_hash()})


def sign_checkpoint(entry: AuditEntry, key: Ed25519PrivateKey, at: float) -> Checkpoint:
    unsigned = Checkpoint(entry.seq, entry.hash, at, "")
    return Checkpoint(entry.seq, entry.hash, at, key.sign(unsigned.message()).hex())


@dataclass
class VerifyResult:
    ok: bool
    entries: int
    checkpoints: int
    problems: list[str]


def verify(entries: Iterable[AuditEntry], checkpoints: Iterable[Checkpoint], public_key: Ed25519PublicKey,
           *, anchor: tuple[int, str] | None = None) -> VerifyResult:
    """Check order, links, hashes and checkpoint signatures. ``anchor`` = (seq, hash) of the entry just
    before the first one given (after a retention purge; the purge entry records it)."""
    problems: list[str] = []
    by_seq: dict[int, AuditEntry] = {}
    expect_seq, expect_prev = (anchor[0] + 1, anchor[1]) if anchor else (1, GENESIS)
    count = 0
    for entry in entries:
        count += 1
        if entry.seq != expect_seq:
            problems.append(f"entry {entry.seq}: expected sequence {expect_seq} (removed or reordered)")
        if entry.prev != expect_prev:
            problems.append(f"entry {entry.seq}: previous-hash link broken")
        if entry.computed_hash() != entry.hash:
            problems.append(f"entry {entry.seq}: content does not match its hash (edited)")
        by_seq[entry.seq] = entry
        expect_seq, expect_prev = entry.seq + 1, entry.hash
    n_cp = 0
    for cp in checkpoints:
        n_cp += 1
        try:
            public_key.verify(bytes.fromhex(cp.signature), cp.message())
        except (InvalidSignature, ValueError):
            problems.append(f"checkpoint at {cp.seq}: bad signature")
            continue
        target = by_seq.get(cp.seq)
        if target is None:
            if anchor is None or cp.seq > anchor[0]:
                problems.append(f"checkpoint at {cp.seq}: its entry is missing (truncated)")
        elif target.hash != cp.hash:
            problems.append(f"checkpoint at {cp.seq}: chain was rewritten since it was signed")
    return VerifyResult(not problems, count, n_cp, problems)
