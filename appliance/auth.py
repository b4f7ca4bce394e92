"""RS256 JWT verification for the public session API.

Callers' backends mint short-lived tokens with their own identity system; the appliance only holds the
public key. Verification is PyJWT (a well-kept library) with everything a bearer token needs pinned
explicitly, because library defaults are where the classic JWT attacks live:

- the algorithm list is exactly ``["RS256"]`` and the header's ``alg`` is checked before decoding, so
  ``alg: none`` and HS256-signed-with-the-public-key tokens are rejected;
- the key must be an RSA public key of at least 2048 bits (a symmetric "key" cannot be configured);
- ``exp`` and ``sub`` are required, ``aud`` always checked, ``iss`` when configured, ``nbf``/``iat`` honoured
  with a small clock-skew leeway;
- the token may not live longer than ``auth.max_ttl_seconds`` (15 min): a long-lived token that leaks is a
  long-lived credential, so ``exp - iat`` (or ``exp - now`` without ``iat``) above the limit is refused;
- the scope (OAuth2 ``scope`` string or ``scp`` list) must contain ``auth.required_scope``;
- a ``crit`` header is refused (we implement no JWS extension, RFC 7515 §4.1.11 says reject), and so
  are key-carrying headers (``jku``, ``jwk``, ``x5u``, ``x5c``: RFC 8725 §3.10 — the key is pinned by
  configuration, a token never names its own); ``kid`` is ignored, never used to look a key up;
- PyJWT ≥ 2.12 (2.10.0 compared ``iss`` as a substring, CVE-2024-53861; before 2.12 ``crit`` was
  ignored, CVE-2026-32597). ``auth.issuer`` is required outside development (`config check`).

Every failure raises :class:`AuthError` with a short reason; the API turns it into 401 JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from appliance.config import AuthConfig, ConfigError

ALGORITHM = "RS256"
MAX_TOKEN_BYTES = 8192
KEY_HEADERS = ("jku", "jwk", "x5u", "x5c")
MIN_RSA_BITS = 2048


class AuthError(Exception):
    """A bearer token was missing or invalid. ``code`` is the OAuth2 error code, ``detail`` the reason."""

    def __init__(self, detail: str, code: str = "invalid_token") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    sub: str
    scopes: frozenset[str]
    expires_at: float
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def load_public_key(pem: bytes | str) -> RSAPublicKey:
    """Parse a PEM RSA public key; anything else (or a short key) is a configuration error."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"auth.jwt_public_key_file: not a PEM public key ({exc})") from exc
    if not isinstance(key, RSAPublicKey):
        raise ConfigError("auth.jwt_public_key_file: expected an RSA public key (RS256)")
    if key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"auth.jwt_public_key_file: RSA key of {key.key_size} bits, need ≥ {MIN_RSA_BITS}")
    return key


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    scope = claims.get("scope")
    scp = claims.get("scp")
    out: set[str] = set()
    if isinstance(scope, str):
        out.update(scope.split())
    if isinstance(scp, list):
        out.update(s for s in scp if isinstance(s, str))
    elif isinstance(scp, str):
        out.update(scp.split())
    return frozenset(out)


class JwtVerifier:
    """Verifies bearer tokens against one RSA public key with the rules in the module docstring."""

    def __init__(
        self,
        public_key: RSAPublicKey | bytes | str,
        *,
        audience: str,
        issuer: str = "",
        required_scope: str = "voice:session",
        max_ttl_seconds: int = 900,
        leeway_seconds: int = 30,
    ) -> None:
        self._key = public_key if isinstance(public_key, RSAPublicKey) else load_public_key(public_key)
        self.audience = audience
        self.issuer = issuer
        self.required_scope = required_scope
        self.max_ttl = max_ttl_seconds
        self.leeway = leeway_seconds
        self._jwt = jwt.PyJWT(options={"require": ["exp", "sub"], "verify_signature": True})

    @classmethod
    def from_config(cls, cfg: AuthConfig) -> JwtVerifier:
        """Build from ``[auth]``; a missing or unreadable key file is a :class:`ConfigError`."""
        if not cfg.jwt_public_key_file:
            raise ConfigError("auth.jwt_public_key_file: required (the RS256 public key callers' tokens use)")
        try:
            pem = Path(cfg.jwt_public_key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"auth.jwt_public_key_file: cannot read: {exc.strerror}") from exc
        return cls(
            pem,
            audience=cfg.audience,
            issuer=cfg.issuer,
            required_scope=cfg.required_scope,
            max_ttl_seconds=cfg.max_ttl_seconds,
            leeway_seconds=cfg.leeway_seconds,
        )

    def verify_authorization(self, header: str | None) -> Principal:
        """Verify an ``Authorization: Bearer …`` header value."""
        if not header:
            raise AuthError("missing Authorization header", code="invalid_request")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("expected 'Authorization: Bearer <token>'", code="invalid_request")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        """Verify one compact JWS and return its principal, or raise :class:`AuthError`."""
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"malformed token: {exc}") from exc
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise AuthError(f"algorithm {alg!r} not allowed (only {ALGORITHM})")
        if "crit" in header:
            raise AuthError("critical header extensions are not supported")
        named = [h for h in KEY_HEADERS if h in header]
        if named:
            raise AuthError(f"header {named[0]!r} not allowed (the verification key is configured)")
        now = time.time()
        try:
            decode_kwargs: dict[str, Any] = {
                "algorithms": [ALGORITHM],
                "audience": self.audience,
                "leeway": self.leeway,
            }
            if self.issuer:
                decode_kwargs["issuer"] = self.issuer
            claims = self._jwt.decode(token, self._key, **decode_kwargs)
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError("wrong audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("wrong issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing claim {exc.claim!r}") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("bad signature") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        return self._check_claims(claims, now)

    def _check_claims(self, claims: dict[str, Any], now: float) -> Principal:
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthError("claim 'exp' must be a number")
        if exp + self.leeway < now:
            raise AuthError("token expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf - self.leeway > now:
            raise AuthError("token not yet valid")
        iat = claims.get("iat")
        if iat is not None:
            if not isinstance(iat, int | float) or isinstance(iat, bool):
                raise AuthError("claim 'iat' must be a number")
            if iat - self.leeway > now:
                raise AuthError("token issued in the future")
            if exp - iat > self.max_ttl:
                raise AuthError(f"token lifetime {exp - iat:.0f} s exceeds the {self.max_ttl} s maximum")
        if exp - now > self.max_ttl + self.leeway:
            raise AuthError(f"token lifetime exceeds the {self.max_ttl} s maximum")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise AuthError("claim 'sub' must be a non-empty string")
        scopes = _scopes(claims)
        if self.required_scope and self.required_scope not in scopes:
            raise AuthError(f"scope {self.required_scope!r} required", code="insufficient_scope")
        return Principal(sub=sub, scopes=scopes, expires_at=float(exp), claims=claims)
