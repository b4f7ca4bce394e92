"""RS256 JWT verification: valid tokens pass, the attack set is refused with a reason."""

from __future__ import annotations

import base64
import functools
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


@functools.cache
def _attacker_keys() -> tuple[rsa.RSAPrivateKey, bytes, ec.EllipticCurvePrivateKey]:
    """Keys the attacker controls (made once: RSA key generation is slow on a loaded box)."""
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    return other_key, other_pem, ec.generate_private_key(ec.SECP256R1())


def attack_tokens(private_pem: bytes, public_pem: bytes) -> dict[str, str]:
    now = int(time.time())
    base = {"sub": "alice", "aud": "voice-appliance", "iss": ISS, "scope": "voice:session",
            "iat": now, "exp": now + 600}
    other_key, other_pem, ec_key = _attacker_keys()
    # HS256 "signed" with the public key as the HMAC secret (the classic key-confusion attack);
    # PyJWT refuses to do it for us, so build it by hand.
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(base)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    hs256 = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    def rs(claims: dict) -> str:
        return jwt.encode(claims, private_pem, algorithm="RS256")

    def without(name: str, claims: dict = base) -> dict:
        return {k: v for k, v in claims.items() if k != name}

    def attacker(headers: dict, key=other_pem) -> str:
        return jwt.encode(base, key, algorithm="RS256", headers=headers)

    attacker_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(other_key.public_key()))
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
        "oversized_but_signed": rs({**base, "pad": "x" * 9000}),
        # crit: an extension we do not implement must make the token invalid (RFC 7515 §4.1.11)
        "crit_header": jwt.encode(base, private_pem, algorithm="RS256",
                                  headers={"crit": ["exp"], "exp": now + 600}),
        "crit_unknown_ext": jwt.encode(base, private_pem, algorithm="RS256",
                                       headers={"crit": ["x-ext"], "x-ext": 1}),
        # key injection: the token names a key the attacker controls
        "kid_path_injection": attacker({"kid": "../../../../dev/null"}),
        "kid_sql_injection": attacker({"kid": "x' UNION SELECT 'secret"}),
        "jku_injection": attacker({"jku": "https://evil.test/jwks.json", "kid": "evil"}),
        "jwk_embedded": attacker({"jwk": attacker_jwk}),
        "x5u_injection": attacker({"x5u": "https://evil.test/cert.pem"}),
        "jku_even_with_our_key": jwt.encode(base, private_pem, algorithm="RS256",
                                            headers={"jku": "https://evil.test/jwks.json"}),
    }


ATTACKS = (
    "expired", "alg_none", "alg_none_caps", "hs256_with_public_key", "wrong_audience", "wrong_issuer",
    "missing_scope", "no_scope_claim", "ttl_too_long", "ttl_too_long_no_iat", "missing_exp", "missing_sub",
    "not_yet_valid", "other_key", "es256", "ps256_same_key", "tampered_payload", "malformed_garbage",
    "malformed_two_parts", "malformed_bad_base64", "malformed_header_json", "empty", "huge",
    "oversized_but_signed", "crit_header", "crit_unknown_ext", "kid_path_injection", "kid_sql_injection",
    "jku_injection", "jwk_embedded", "x5u_injection", "jku_even_with_our_key",
)


@pytest.fixture(scope="module")
def attacks(private_pem, public_pem) -> dict[str, str]:
    return attack_tokens(private_pem, public_pem)


def test_attack_list_is_complete(attacks):
    assert set(ATTACKS) == set(attacks)


@pytest.mark.parametrize("name", ATTACKS)
def test_each_attack_is_refused(verifier, attacks, name):
    with pytest.raises(AuthError) as err:
        verifier.verify(attacks[name])
    assert err.value.detail


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
    for name in ("crit_header", "crit_unknown_ext"):
        with pytest.raises(AuthError, match="critical"):
            verifier.verify(tokens[name])
    for name in ("jku_injection", "jwk_embedded", "x5u_injection", "jku_even_with_our_key"):
        with pytest.raises(AuthError, match="not allowed"):
            verifier.verify(tokens[name])
    for name in ("kid_path_injection", "kid_sql_injection"):  # kid is ignored: our key decides
        with pytest.raises(AuthError, match="signature"):
            verifier.verify(tokens[name])
    with pytest.raises(AuthError, match="too large"):
        verifier.verify(tokens["oversized_but_signed"])


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
