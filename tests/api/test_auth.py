"""RS256 JWT verification: valid tokens pass, the attack set is refused with a reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from appliance.auth import AuthError, JwtVerifier
from appliance.config import ConfigError
from appliance.token import generate_keys, mint

ISS = "https://idp.test"


def good(private_pem: bytes, **kw) -> str:
    args = {"sub": "alice", "issuer": ISS, "ttl_seconds": 600}
    args.update(kw)
    return mint(private_pem, **args)


def b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_valid_token(verifier, private_pem):
    p = verifier.verify_authorization("Bearer " + good(private_pem))
    assert p.sub == "alice" and "voice:session" in p.scopes
    # scp list form (Azure/Okta style) also carries scopes
    tok = good(private_pem, scope="", extra={"scp": ["voice:session", "other"]})
    assert verifier.verify(tok).scopes == {"voice:session", "other"}


def attack_tokens(private_pem: bytes, public_pem: bytes) -> dict[str, str]:
    now = int(time.time())
    base = {"sub": "alice", "aud": "voice-appliance", "iss": ISS, "scope": "voice:session",
            "iat": now, "exp": now + 600}
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    ec_key = ec.generate_private_key(ec.SECP256R1())
    # HS256 "signed" with the public key as the HMAC secret (the classic key-confusion attack);
    # PyJWT refuses to do it for us, so build it by hand.
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(base)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    hs256 = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    def rs(claims: dict) -> str:
        return jwt.encode(claims, private_pem, algorithm="RS256")

    def without(name: str, claims: dict = base) -> dict:
        return {k: v for k, v in claims.items() if k != name}

    valid = rs(base)
    h, p, s = valid.split(".")
    tampered_payload = b64({**base, "sub": "mallory"})
    return {
        "expired": jwt.encode({**base, "iat": now - 1000, "exp": now - 100}, private_pem, algorithm="RS256"),
        "alg_none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(base)}.",
        "alg_none_caps": f"{b64({'alg': 'NONE', 'typ': 'JWT'})}.{b64(base)}.",
        "hs256_with_public_key": hs256,
        "wrong_audience": jwt.encode({**base, "aud": "someone-else"}, private_pem, algorithm="RS256"),
        "wrong_issuer": jwt.encode({**base, "iss": "https://evil.test"}, private_pem, algorithm="RS256"),
        "missing_scope": jwt.encode({**base, "scope": "profile email"}, private_pem, algorithm="RS256"),
        "no_scope_claim": jwt.encode({k: v for k, v in base.items() if k != "scope"}, private_pem,
                                     algorithm="RS256"),
        "ttl_too_long": jwt.encode({**base, "exp": now + 3600}, private_pem, algorithm="RS256"),
        "ttl_too_long_no_iat": rs(without("iat", {**base, "exp": now + 3600})),
        "missing_exp": rs(without("exp")),
        "missing_sub": rs(without("sub")),
        "not_yet_valid": jwt.encode({**base, "nbf": now + 300}, private_pem, algorithm="RS256"),
        "other_key": jwt.encode(base, other_pem, algorithm="RS256"),
        "es256": jwt.encode(base, ec_key, algorithm="ES256"),
        "ps256_same_key": jwt.encode(base, private_pem, algorithm="PS256"),
        "tampered_payload": f"{h}.{tampered_payload}.{s}",
        "malformed_garbage": "not.a.jwt",
        "malformed_two_parts": f"{h}.{p}",
        "malformed_bad_base64": f"{h}.@@@@.{s}",
        "malformed_header_json": f"{base64.urlsafe_b64encode(b'{nope').decode()}.{p}.{s}",
        "empty": "",
        "huge": "a" * 20000,
    }


def test_attack_set_refused(verifier, private_pem, public_pem):
    tokens = attack_tokens(private_pem, public_pem)
    for name, token in tokens.items():
        with pytest.raises(AuthError) as err:
            verifier.verify(token)
        assert err.value.detail, name
    # spot-check that the reasons say what is wrong
    reasons = {}
    for name in ("expired", "alg_none", "hs256_with_public_key", "wrong_audience", "missing_scope",
                 "ttl_too_long", "other_key"):
        try:
            verifier.verify(tokens[name])
        except AuthError as exc:
            reasons[name] = exc.detail
    assert "expired" in reasons["expired"]
    assert "not allowed" in reasons["alg_none"] and "not allowed" in reasons["hs256_with_public_key"]
    assert "audience" in reasons["wrong_audience"]
    assert "scope" in reasons["missing_scope"]
    assert "lifetime" in reasons["ttl_too_long"]
    assert "signature" in reasons["other_key"]


def test_leeway_accepts_small_skew(verifier, private_pem):
    now = int(time.time())
    tok = jwt.encode({"sub": "a", "aud": "voice-appliance", "iss": ISS, "scope": "voice:session",
                      "iat": now - 620, "exp": now - 10}, private_pem, algorithm="RS256")
    assert verifier.verify(tok).sub == "a"  # expired 10 s ago, within the 30 s leeway


def test_authorization_header_forms(verifier, private_pem):
    for header in (None, "", "Basic abc", "Bearer", "Bearer   "):
        with pytest.raises(AuthError):
            verifier.verify_authorization(header)
    assert verifier.verify_authorization("bearer " + good(private_pem)).sub == "alice"


def test_only_rsa_public_keys_configurable(tmp_path):
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigError, match="RSA"):
        JwtVerifier(ec_pub, audience="x")
    with pytest.raises(ConfigError, match="PEM"):
        JwtVerifier(b"secret-hmac-key", audience="x")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigError, match="bits"):
        JwtVerifier(small, audience="x")


def test_token_cli_generates_keys_and_mints(tmp_path):
    keys = tmp_path / "keys"
    cli = [sys.executable, "-m", "appliance", "token"]
    out = subprocess.run([*cli, "--generate-keys", str(keys)], capture_output=True, text=True, check=True)
    assert "jwt-private.pem" in out.stdout
    priv = keys / "jwt-private.pem"
    assert priv.stat().st_mode & 0o077 == 0
    first = priv.read_bytes()
    generate_keys(keys)  # re-running keeps the existing pair
    assert priv.read_bytes() == first
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[auth]\njwt_private_key_file = "{priv}"\nissuer = "{ISS}"\n')
    res = subprocess.run([*cli, "--config", str(cfg), "--sub", "zoe", "--ttl", "300"],
                         capture_output=True, text=True, check=True)
    token = res.stdout.strip()
    v = JwtVerifier((keys / "jwt-public.pem").read_bytes(), audience="voice-appliance", issuer=ISS)
    p = v.verify(token)
    assert p.sub == "zoe" and p.expires_at - time.time() <= 300
    bad = subprocess.run([*cli, "--config", str(cfg), "--ttl", "3600"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--ttl" in bad.stderr
