"""`voice-appliance token`: development JWTs and the dev key pair they are signed with.

In production a caller's own backend mints tokens; the appliance only verifies them. For a newcomer
(`make run`) and for tests this command creates an RSA key pair (``--generate-keys DIR``) and mints
short-lived RS256 tokens with the claims the API requires (sub, aud, iss, scope, iat, exp, jti).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance.auth import ALGORITHM
from appliance.config import ConfigError, load_config

PRIVATE_NAME = "jwt-private.pem"
PUBLIC_NAME = "jwt-public.pem"


def generate_keys(
    directory: str | os.PathLike[str], *, bits: int = 2048, overwrite: bool = False
) -> tuple[Path, Path]:
    """Create ``jwt-private.pem`` (mode 0600) and ``jwt-public.pem`` in ``directory``; returns both paths.

    Existing keys are kept unless ``overwrite`` (re-running `make run` must not invalidate tokens).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    if priv_path.exists() and pub_path.exists() and not overwrite:
        return priv_path, pub_path
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_pem)
    pub_path.write_bytes(pub_pem)
    return priv_path, pub_path


def mint(
    private_key_pem: bytes | str,
    *,
    sub: str,
    audience: str = "voice-appliance",
    issuer: str = "",
    scope: str = "voice:session",
    ttl_seconds: int = 600,
    now: float | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """Return a compact RS256 JWT for ``sub`` valid ``ttl_seconds`` from ``now``."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {
        "sub": sub,
        "aud": audience,
        "scope": scope,
        "iat": issued,
        "exp": issued + int(ttl_seconds),
        "jti": secrets.token_urlsafe(12),
    }
    if issuer:
        claims["iss"] = issuer
    claims.update(extra or {})
    key = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")
    parser.add_argument("--generate-keys", metavar="DIR", help="create a dev key pair in DIR and exit")
    parser.add_argument("--force", action="store_true", help="with --generate-keys: replace existing keys")
    parser.add_argument("--key", help="private key PEM (default: auth.jwt_private_key_file)")
    parser.add_argument("--sub", default="dev-user", help="subject (the caller's user id)")
    parser.add_argument("--ttl", type=int, default=600, help="lifetime in seconds (≤ auth.max_ttl_seconds)")
    parser.add_argument("--scope", help="scope(s), comma- or space-separated (default: auth.required_scope;"
                                        " admin API: calls:read,calls:write,records:read,records:delete,"
                                        "audit:read)")


def main(args: argparse.Namespace) -> int:
    if args.generate_keys:
        priv, pub = generate_keys(args.generate_keys, overwrite=args.force)
        print(f"private key: {priv}\npublic key:  {pub}")
        return 0
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    key_file = args.key or cfg.auth.jwt_private_key_file
    if not key_file:
        print("no private key: pass --key or set auth.jwt_private_key_file", file=sys.stderr)
        return 2
    if not 1 <= args.ttl <= cfg.auth.max_ttl_seconds:
        print(f"--ttl must be 1..{cfg.auth.max_ttl_seconds} s (auth.max_ttl_seconds)", file=sys.stderr)
        return 2
    try:
        pem = Path(key_file).read_bytes()
    except OSError as exc:
        print(f"cannot read {key_file}: {exc.strerror}", file=sys.stderr)
        return 2
    scope = args.scope if args.scope is not None else cfg.auth.required_scope
    scope = " ".join(s for s in scope.replace(",", " ").split())  # --scope calls:read,records:read
    print(mint(pem, sub=args.sub, audience=cfg.auth.audience, issuer=cfg.auth.issuer, scope=scope,
               ttl_seconds=args.ttl))
    return 0
