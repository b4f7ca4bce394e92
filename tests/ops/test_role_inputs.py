"""The roles refuse bad inputs before touching a host: vault placeholders (CHANGE-ME), empty or short
secrets, a public box without a certificate, values outside the argument specs.

Runs ansible-playbook in check mode against localhost with ``--tags validate`` (argument-spec validation
always runs; only the roles' validation asserts are tagged), so nothing on this machine is changed. The
positive cases pass the same gate, so each refusal is the check itself, not a broken harness.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.ops.conftest import ANSIBLE_DIR, VENV_BIN

pytestmark = pytest.mark.slow  # ~4 s of ansible-playbook per case

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
GOOD = "k" * 32
PUB = "-----BEGIN PUBLIC KEY-----\nMII\n-----END PUBLIC KEY-----"
CREDS = {"gemini_api_key": "", "jwt_public_key.pem": PUB,
         "turn_secret": GOOD, "janus_api_secret": GOOD, "janus_admin_secret": GOOD,
         "audiobridge_admin_key": GOOD}
APPLIANCE = {"appliance_deb": "/nonexistent/voice-appliance.deb", "appliance_credentials": CREDS,
             "appliance_tls_cert_pem": CERT, "appliance_tls_key_pem": KEY,
             "appliance_auth_issuer": "https://idp.example.test"}
JANUS = {"janus_api_secret": GOOD, "janus_admin_secret": GOOD, "janus_audiobridge_admin_key": GOOD}


def run_role(tmp_path: Path, role: str, variables: dict) -> subprocess.CompletedProcess:
    play = tmp_path / "play.yml"
    play.write_text(json.dumps([{"hosts": "localhost", "gather_facts": True, "connection": "local",
                                 "roles": [role]}]))
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps(variables))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
           "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp")}
    return subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "--check", "--tags",
                           "validate", "-e", f"@{extra}", str(play)], cwd=ANSIBLE_DIR, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("role", "variables", "refusal"), [
    ("coturn", {"coturn_static_auth_secret": "CHANGE-ME"}, "placeholder (CHANGE-ME)"),
    ("coturn", {"coturn_static_auth_secret": ""}, "coturn_static_auth_secret is empty"),
    ("coturn", {}, "missing required arguments: coturn_static_auth_secret"),
    ("janus", {**JANUS, "janus_admin_secret": "changeme"}, "janus_admin_secret is empty, short"),
    ("appliance", {**APPLIANCE, "appliance_credentials": {**CREDS, "turn_secret": "CHANGE-ME"}},
     "appliance_credentials.turn_secret: empty or still"),
    ("appliance", {**APPLIANCE, "appliance_credentials": {**CREDS, "janus_api_secret": " "}},
     "appliance_credentials.janus_api_secret: empty or still"),
    ("appliance", {**APPLIANCE, "appliance_tls_cert_pem": ""}, "appliance_tls_mode=box serves public HTTPS"),
    ("appliance", {**APPLIANCE, "appliance_tls_mode": "none"}, "appliance_tls_mode must be one of"),
    ("appliance", {k: v for k, v in APPLIANCE.items() if k != "appliance_auth_issuer"},
     "missing required arguments: appliance_auth_issuer"),
    ("appliance", {**APPLIANCE, "appliance_tls_key_pem": "-----BEGIN PRIVATE KEY-----\n  ...\n-----END"},
     "appliance_tls_mode=box serves public HTTPS"),  # the vault example's placeholder PEM
])
def test_bad_input_is_refused(tmp_path, role, variables, refusal):
    res = run_role(tmp_path, role, variables)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and refusal in out, out[-3000:]
    assert GOOD not in out  # a secret never reaches the output, not even a good one


@pytest.mark.parametrize(("role", "variables"), [
    ("coturn", {"coturn_static_auth_secret": GOOD}),
    ("janus", JANUS),
    ("appliance", APPLIANCE),
    ("appliance", {**APPLIANCE, "appliance_tls_cert_pem": "", "appliance_tls_mode": "loadbalancer"}),
])
def test_good_input_passes(tmp_path, role, variables):
    res = run_role(tmp_path, role, variables)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert GOOD not in res.stdout + res.stderr
