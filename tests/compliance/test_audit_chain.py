"""The audit chain detects any edited, removed, reordered or rewritten entry."""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.compliance.audit import AuditEntry, seal, sign_checkpoint, verify

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()


def chain(n: int = 10) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    for i in range(n):
        out.append(seal(out[-1] if out else None, at=1000.0 + i, actor="ai-worker",
                        action="turn.answered", subject="box-1.abc", details={"turn": i, "ms": 120 + i}))
    return out


def test_intact_chain_verifies() -> None:
    entries = chain()
    cps = [sign_checkpoint(entries[4], KEY, 2000.0), sign_checkpoint(entries[9], KEY, 2001.0)]
    result = verify(entries, cps, PUB)
    assert result.ok, result.problems
    assert (result.entries, result.checkpoints) == (10, 2)


def test_edit_is_detected() -> None:
    entries = chain()
    entries[3] = dataclasses.replace(entries[3], details={"turn": 3, "ms": 1})
    result = verify(entries, [], PUB)
    assert not result.ok and any("entry 4: content" in p for p in result.problems)


def test_removal_and_reorder_are_detected() -> None:
    entries = chain()
    removed = entries[:5] + entries[6:]
    assert any("expected sequence 6" in p for p in verify(removed, [], PUB).problems)
    swapped = entries[:]
    swapped[2], swapped[3] = swapped[3], swapped[2]
    assert not verify(swapped, [], PUB).ok


def test_rewritten_tail_is_caught_by_the_signed_checkpoint() -> None:
    entries = chain()
    cp = sign_checkpoint(entries[7], KEY, 2000.0)
    forged = entries[:3]
    for i in range(3, 10):  # an attacker edits entry 4 and re-hashes everything after it
        forged.append(seal(forged[-1], at=1000.0 + i, actor="ai-worker", action="turn.answered",
                           subject="box-1.abc", details={"turn": i, "ms": 0}))
    result = verify(forged, [cp], PUB)
    assert not result.ok and any("rewritten" in p for p in result.problems)
    truncated = verify(entries[:6], [cp], PUB)
    assert any("truncated" in p for p in truncated.problems)


def test_forged_checkpoint_signature_is_detected() -> None:
    entries = chain()
    other = Ed25519PrivateKey.generate()
    assert any("bad signature" in p for p in verify(entries, [sign_checkpoint(entries[9], other, 1.0)],
                                                     PUB).problems)


def test_verification_from_a_retention_anchor() -> None:
    entries = chain()
    kept = entries[4:]
    assert verify(kept, [], PUB, anchor=(entries[3].seq, entries[3].hash)).ok
    assert not verify(kept, [], PUB).ok
