"""Per-session credentials: short-lived HMAC tokens bound to one session id and its ``sub``.

Why not the caller's JWT for the whole call: a JWT lives ≤ 15 min (``auth.max_ttl_seconds``) and is
minted by the caller's backend, so a call longer than that would need a fresh JWT from the backend for
every poll or hang-up, and a leaked JWT opens *every* session of its ``sub``. The 201 of
``POST /v1/sessions`` therefore carries a session token that authorises trickle/GET/DELETE/refresh/resume
of that one session only; the client swaps it for a fresh one with ``POST /v1/sessions/{id}/refresh``
in the last :data:`REFRESH_WINDOW_SECONDS` of its life (the seed's sliding refresh). The call itself never
depends on a token: an expired token stops signalling, not audio.

Format: ``vst1.<base64url(JSON {"sid", "sub", "exp", "iat"})>.<base64url(HMAC-SHA256(key, "vst1." +
payload))>``. HMAC (stdlib) rather than a JWT: there is exactly one issuer and one verifier class (our
boxes), one algorithm and no header to negotiate, so nothing of a JWT library's attack surface is
needed. The key comes from ``auth.session_token_key_file`` (a credential shared by the fleet, so any
box verifies a token another box issued); without one each process draws a random key, which is right
for a single box and makes its tokens die with the process. Tokens are not stored anywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass

from appliance.config import AuthConfig, ConfigError, secret

log = logging.getLogger(__name__)

PREFIX = "vst1."
REFRESH_WINDOW_SECONDS = 120  # a refresh is accepted only when less than this is left
MAX_TTL_SECONDS = 900
MAX_TOKEN_BYTES = 1024
MIN_KEY_BYTES = 32


class SessionTokenError(Exception):
    """A session token is malformed, forged or expired (``detail`` says which)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class SessionGrant:
    """What a verified session token allows: signalling for ``session_id`` on behalf of ``sub``."""

    session_id: str
    sub: str
    expires_at: float
    issued_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_session_token(token: str) -> bool:
    """True for our token format (a JWT starts with ``eyJ``, never with :data:`PREFIX`)."""
    return token.startswith(PREFIX)


class SessionTokens:
    """Issues and verifies session tokens with one HMAC key."""

    def __init__(self, key: bytes, ttl_seconds: int = 600) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"auth.session_token_key_file: key of {len(key)} bytes, need ≥ {MIN_KEY_BYTES}")
        if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
            raise ConfigError(f"auth.session_token_ttl_seconds: expected 1..{MAX_TTL_SECONDS}")
        self._key = key
        self.ttl = ttl_seconds

    @classmethod
    def from_config(cls, cfg: AuthConfig) -> SessionTokens:
        """The key file's text (≥ 32 bytes), or a random per-process key when none is configured."""
        if not cfg.session_token_key_file:
            log.warning("auth.session_token_key_file not set: session tokens use a random per-process key "
                        "(they verify on this box only and die with the process)")
            return cls(secrets.token_bytes(32), cfg.session_token_ttl_seconds)
        key = secret("", cfg.session_token_key_file)
        return cls(key.encode(), cfg.session_token_ttl_seconds)

    def _mac(self, signing_input: str) -> str:
        return _b64(hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest())

    def issue(self, session_id: str, sub: str, *, now: float | None = None,
              ttl_seconds: int | None = None) -> tuple[str, float]:
        """A token for ``session_id``/``sub`` and its expiry (unix time)."""
        issued = int(time.time() if now is None else now)
        exp = issued + (self.ttl if ttl_seconds is None else ttl_seconds)
        payload = _b64(json.dumps({"sid": session_id, "sub": sub, "iat": issued, "exp": exp},
                                  separators=(",", ":")).encode())
        signing_input = PREFIX + payload
        return f"{signing_input}.{self._mac(signing_input)}", float(exp)

    def verify(self, token: str, *, now: float | None = None) -> SessionGrant:
        """The grant of a genuine, unexpired token, or :class:`SessionTokenError`."""
        if len(token) > MAX_TOKEN_BYTES:
            raise SessionTokenError("session token too large")
        if not is_session_token(token):
            raise SessionTokenError("not a session token")
        signing_input, dot, mac = token.rpartition(".")
        if not dot or signing_input.count(".") != 1:
            raise SessionTokenError("malformed session token")
        if not hmac.compare_digest(mac.encode(), self._mac(signing_input).encode()):
            raise SessionTokenError("bad session token signature")
        try:
            claims = json.loads(_unb64(signing_input[len(PREFIX):]))
        except (ValueError, binascii.Error) as exc:  # cannot happen for a token we signed
            raise SessionTokenError("malformed session token") from exc
        sid, sub, exp, iat = (claims.get(k) for k in ("sid", "sub", "exp", "iat"))
        if not (isinstance(sid, str) and isinstance(sub, str) and isinstance(exp, int)
                and isinstance(iat, int)):
            raise SessionTokenError("malformed session token")
        if exp <= (time.time() if now is None else now):
            raise SessionTokenError("session token expired; refresh it before it expires, or use a JWT")
        return SessionGrant(sid, sub, float(exp), float(iat))
