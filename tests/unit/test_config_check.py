"""`voice-appliance config check` refuses a production config without ``auth.issuer``.

Production = no JWT private key on the box (only the identity provider's public key). `voice-appliance
run` writes a development config that sets an issuer and a session-token key anyway.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from appliance.config import load_config
from appliance.runner import prepare

REPO = Path(__file__).resolve().parents[2]


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "config", "check", "--config", str(path)],
                          capture_output=True, text=True)


def test_production_config_needs_an_issuer(tmp_path):
    cfg = tmp_path / "prod.toml"
    cfg.write_text('[auth]\njwt_public_key_file = "/run/credentials/x/jwt.pem"\n')
    res = check(cfg)
    assert res.returncode == 2 and "auth.issuer: required in production" in res.stderr
    cfg.write_text('[auth]\njwt_public_key_file = "/run/credentials/x/jwt.pem"\nissuer = "https://id.example.com/"\n')
    res = check(cfg)
    assert res.returncode == 0 and res.stdout.strip() == "config ok"
    # `config show` still works (it is how an operator finds the problem)
    show = subprocess.run([sys.executable, "-m", "appliance", "config", "show", "--config", str(cfg)],
                          capture_output=True, text=True)
    assert show.returncode == 0


def test_development_config_from_run_passes_and_sets_issuer_and_session_key(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text("")
    plan = prepare(load_config(base, env={}), tmp_path / "state", with_janus=False, with_coturn=False)
    written = tomllib.loads(plan.config_path.read_text())
    assert written["auth"]["issuer"] == "voice-appliance-dev"
    key = Path(written["auth"]["session_token_key_file"])
    assert len(key.read_text().strip()) >= 32 and key.stat().st_mode & 0o077 == 0
    assert check(plan.config_path).returncode == 0


def test_packaged_config_passes_the_check():
    res = check(REPO / "packaging" / "etc" / "appliance.toml")
    assert res.returncode == 0, res.stderr
