"""Static checks that need no container: unit sandboxing score, Ansible lint, the .deb and its lintian run."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.ops.conftest import ANSIBLE_DIR, REPO, VENV_BIN

# Session fixtures build the .deb and converge a host on first use: allow for that in the first test.
pytestmark = [pytest.mark.ops, pytest.mark.timeout(2400)]
UNIT = REPO / "systemd/voice-appliance.service"


def exposure(unit: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    return float(m.group(1))


def test_unit_exposure_at_most_2() -> None:
    assert exposure(UNIT) <= 2.0
    assert exposure(REPO / "systemd/voice-appliance-emulator.service") <= 2.0
    # --threshold makes systemd-analyze itself fail above the limit (what an operator would run).
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-1500:]


def test_unit_has_the_required_hardening() -> None:
    text = UNIT.read_text()
    for line in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
    ]:
        assert line in text, line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6$", text, re.M)
    creds = set(re.findall(r"^LoadCredential=([^:]+):", text, re.M))
    assert {
        "gemini_api_key",
        "jwt_public_key.pem",
        "turn_secret",
        "janus_api_secret",
        "janus_admin_secret",
    } <= creds


def test_role_drop_ins_are_the_canonical_files() -> None:
    """The roles install systemd/*.service.d/*.conf (symlinked), so tests and production use one file."""
    for svc in ("janus", "coturn"):
        role_file = ANSIBLE_DIR / f"roles/{svc}/files/{svc}.service.d/voice-appliance.conf"
        assert role_file.resolve() == (REPO / f"systemd/{svc}.service.d/voice-appliance.conf").resolve()


def test_ansible_lint_production_profile() -> None:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--offline", "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "passed" in (proc.stdout + proc.stderr)


def test_playbook_lists_every_role_for_the_example_inventory() -> None:
    """site.yml parses against the example Hetzner inventory; the fleet play includes the load balancer."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "--list-tasks", "--list-hosts", "site.yml"],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for task in (
        "hardening : Firewall ruleset",
        "coturn : Run coturn",
        "janus : Run Janus",
        "appliance : Install the package",
        "loadbalancer : HAProxy configuration",
        "loadbalancer : Keepalived configuration",
        "loadbalancer : Floating IP hook script",
        "redis : ACL users (appliance user limited to its key prefix, replication, Sentinel; default off)",
        "redis : Sentinel configuration (written once; Sentinel rewrites it)",
        "appliance : API TLS certificate and key",
        "CA key and certificate",
    ):
        assert task in proc.stdout, task
    for host in ("va-fsn1-1", "va-fsn1-3", "lb-fsn1-1", "lb-fsn1-2", "data-fsn1-1", "data-fsn1-2"):
        assert host in proc.stdout, host
    upgrade = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "--list-tasks", "upgrade.yml"], cwd=ANSIBLE_DIR, env=env,
        capture_output=True, text=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stdout[-3000:] + upgrade.stderr[-3000:]
    assert "Drain, wait for calls to end, force-migrate the rest" in upgrade.stdout


def test_deb_contents_and_lintian(deb) -> None:
    """lintian is clean apart from overrides that carry a reason; the package holds what operators need."""
    bad = [line for line in deb.lintian.splitlines() if re.match(r"^[EW]: ", line)]
    assert not bad, "\n".join(bad[:40])
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb.path)], capture_output=True, text=True, check=True
    ).stdout
    for path in [
        "./opt/venvs/voice-appliance/bin/voice-appliance",
        "./etc/voice-appliance/appliance.toml",
        "./usr/share/doc/voice-appliance/operations.md",
    ]:
        assert path in listing, path
    assert re.search(r"\./(usr/)?lib/systemd/system/voice-appliance\.service", listing)
    conffiles = subprocess.run(
        ["dpkg-deb", "-I", str(deb.path), "conffiles"], capture_output=True, text=True, check=True
    ).stdout
    assert "/etc/voice-appliance/appliance.toml" in conffiles
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb.path), "Depends", "Recommends"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("python3.11", "adduser", "janus", "coturn", "redis-server"):
        assert name in fields, name
    # The overrides file gives a reason (a comment) before every override.
    overrides = (REPO / "packaging/debian/voice-appliance.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(overrides):
        if line.startswith("voice-appliance:"):
            assert i > 0 and (
                overrides[i - 1].startswith("#") or overrides[i - 1].startswith("voice-appliance:")
            )
