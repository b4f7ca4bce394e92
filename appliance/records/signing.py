"""HMAC-SHA256 request signatures for webhooks and tool-call POSTs (the receiver's check is in
docs/operations.md "Webhooks").

Header ``X-VA-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>." + body)>``: signing the
timestamp with the body lets a receiver refuse replays older than its window (``verify``'s
``max_age_seconds``, default 300 s); ``X-VA-Event-Id`` is the idempotency key (a retry of the same
event carries the same id and the same body bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-VA-Signature"
EVENT_ID_HEADER = "X-VA-Event-Id"
EVENT_TYPE_HEADER = "X-VA-Event-Type"
DEFAULT_MAX_AGE_SECONDS = 300


class SignatureError(ValueError):
    """The signature header is missing, malformed, stale or wrong."""


def sign(key: bytes, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time() if timestamp is None else timestamp)
    mac = hmac.new(key, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def headers(key: bytes, body: bytes, *, event_id: str = "", event_type: str = "") -> dict[str, str]:
    """The headers of one signed POST (no signature header without a key)."""
    out = {"content-type": "application/json"}
    if key:
        out[SIGNATURE_HEADER] = sign(key, body)
    if event_id:
        out[EVENT_ID_HEADER] = event_id
    if event_type:
        out[EVENT_TYPE_HEADER] = event_type
    return out


def verify(key: bytes, body: bytes, header: str | None, *, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
           now: float | None = None) -> int:
    """Check a signature header; returns its timestamp or raises :class:`SignatureError`."""
    if not header:
        raise SignatureError("missing signature")
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        fields.setdefault(k, []).append(v)
    try:
        t = int(fields["t"][0])
    except (KeyError, ValueError):
        raise SignatureError("malformed signature header") from None
    now = time.time() if now is None else now
    if abs(now - t) > max_age_seconds:
        raise SignatureError("signature timestamp outside the replay window")
    expected = hmac.new(key, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, v) for v in fields.get("v1", [])):
        raise SignatureError("signature mismatch")
    return t
