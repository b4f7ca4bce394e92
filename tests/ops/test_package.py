"""The .deb's own life cycle on a booted Debian 12, without Ansible: install, reinstall, remove, purge.

Maintainer scripts must be idempotent (a second configure changes nothing, operator-set credentials are
never overwritten) and purge must remove what the package created.
"""

from __future__ import annotations

import pytest

from tests.harness import nspawn

# Session fixtures build the .deb and converge a host on first use: allow for that in the first test.
pytestmark = [pytest.mark.ops, pytest.mark.timeout(2400)]


def test_install_reinstall_purge(deb, rootfs, tmp_path) -> None:
    with nspawn.booted(rootfs, name="va-pkg", workdir=tmp_path) as ct:
        ct.put(deb.path, "/root/va.deb")
        ct.sh("dpkg -i /root/va.deb", timeout=600)

        assert ct.sh("getent passwd voice-appliance").stdout.split(":")[6].strip() in (
            "/usr/sbin/nologin",
            "/bin/false",
        )
        listing = ct.sh(
            "stat -c '%a %U %n' /etc/voice-appliance/credentials /etc/voice-appliance/credentials/* "
            "/var/lib/voice-appliance"
        ).stdout
        assert "700 root /etc/voice-appliance/credentials\n" in listing
        for name in ("turn_secret", "janus_api_secret", "janus_admin_secret", "audiobridge_admin_key"):
            assert f"600 root /etc/voice-appliance/credentials/{name}\n" in listing
        assert "750 voice-appliance /var/lib/voice-appliance" in listing
        generated = ct.sh("cat /etc/voice-appliance/credentials/turn_secret").stdout.strip()
        assert len(generated) >= 40
        assert ct.sh("systemctl is-enabled voice-appliance").stdout.strip() == "enabled"
        assert (
            ct.sh(
                "/opt/venvs/voice-appliance/bin/voice-appliance config check "
                "--config /etc/voice-appliance/appliance.toml"
            ).stdout.strip()
            == "config ok"
        )
        # The venv imports with Debian's interpreter, including the compiled wheels.
        ct.sh(
            "/opt/venvs/voice-appliance/bin/python -c "
            "'import numpy, onnxruntime, av, soxr, posix_ipc, google.genai'"
        )

        # An operator's secret survives reconfiguration; nothing else changes.
        ct.sh("printf operator-key > /etc/voice-appliance/credentials/gemini_api_key")
        before = ct.sh(
            "cd /etc/voice-appliance && ls -l --time-style=+%s credentials && md5sum credentials/*"
        ).stdout
        ct.sh("dpkg -i /root/va.deb && dpkg-reconfigure voice-appliance", timeout=600)
        after = ct.sh(
            "cd /etc/voice-appliance && ls -l --time-style=+%s credentials && md5sum credentials/*"
        ).stdout
        assert before == after
        assert ct.sh("cat /etc/voice-appliance/credentials/gemini_api_key").stdout == "operator-key"

        ct.sh("dpkg --remove voice-appliance")
        assert (
            ct.sh(
                "test -e /etc/voice-appliance/appliance.toml && test -d /etc/voice-appliance/credentials",
                check=False,
            ).returncode
            == 0
        ), "remove keeps configuration"
        ct.sh("dpkg --purge voice-appliance")
        gone = ct.sh(
            "ls -d /etc/voice-appliance /var/lib/voice-appliance /opt/venvs/voice-appliance 2>&1", check=False
        ).stdout
        assert gone.count("No such file or directory") == 3, gone
        assert ct.sh("systemctl cat voice-appliance", check=False).returncode != 0
