"""The hardened state of the converged, booted Debian 12 container against our dev-sec style baseline
(tests/ops/baseline.py): what a container can show. Kernel sysctls, audit rules and mounts are the host
kernel's: tests/ops/test_hardening_render.py checks their rendered configuration instead.
"""

from __future__ import annotations

import re

import pytest

from tests.ops import baseline

pytestmark = [pytest.mark.ops, pytest.mark.timeout(2400)]


def test_network_sysctls_are_live(provisioned) -> None:
    ct = provisioned.ct
    keys = list(baseline.NET_SYSCTLS)
    out = ct.sh("sysctl " + " ".join(keys)).stdout
    live = dict(re.findall(r"^(\S+) = (\S+)$", out, re.M))
    assert {k: live.get(k) for k in keys} == baseline.NET_SYSCTLS


def test_sshd_effective_settings(provisioned) -> None:
    ct = provisioned.ct
    out = ct.sh("sshd -T -C user=root,host=x,addr=192.0.2.9").stdout
    effective = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert {k: effective.get(k) for k in baseline.SSHD} == baseline.SSHD
    for key in ("ciphers", "macs", "kexalgorithms", "hostkeyalgorithms"):
        algos = effective[key].split(",")
        assert not [a for a in algos if any(w in a for w in baseline.WEAK_SSH)], (key, algos)
    moduli = ct.sh("awk '!/^#/ && $5 + 0 < 3071' /etc/ssh/moduli | wc -l").stdout.strip()
    assert moduli == "0"


def test_file_modes(provisioned) -> None:
    ct = provisioned.ct
    for path, (max_mode, owner, group) in baseline.FILE_MODES.items():
        mode, o, g = ct.sh(f"stat -c '%a %U %G' {path}").stdout.split()
        assert int(mode, 8) & ~max_mode == 0 and (o, g) == (owner, group), (path, mode, o, g)
    # no world-writable file in the system directories
    ww = ct.sh("find /etc /usr /opt -xdev -type f -perm -0002 2>/dev/null | head").stdout.strip()
    assert ww == "", ww


def test_kernel_modules_refused(provisioned) -> None:
    ct = provisioned.ct
    for m in baseline.MODULES:
        out = ct.sh(f"modprobe -n -v {m} 2>&1 || true").stdout
        assert "install /bin/false" in out, (m, out)


def test_unattended_upgrades_security_only_and_needrestart(provisioned) -> None:
    ct = provisioned.ct
    dump = ct.sh("apt-config dump Unattended-Upgrade::Origins-Pattern "
                 "Unattended-Upgrade::Allowed-Origins").stdout
    patterns = re.findall(r'^Unattended-Upgrade::(?:Origins-Pattern|Allowed-Origins):: "([^"]+)";',
                          dump, re.M)
    assert patterns and all("Debian-Security" in p for p in patterns), dump
    # and unattended-upgrade itself agrees (it reads the merged configuration)
    dry = ct.sh("unattended-upgrade --dry-run -d 2>&1 | grep -m1 'Allowed origins are'", check=False).stdout
    assert "Debian-Security" in dry and "label=Debian," not in dry, dry
    nr = ct.sh("needrestart -b -r l 2>&1; echo rc=$?", check=False).stdout
    assert "rc=0" in nr, nr
    conf = ct.sh("cat /etc/needrestart/conf.d/60-voice-appliance.conf").stdout
    assert "$nrconf{restart} = 'a';" in conf and "voice\\-appliance" in conf


def test_auditd_actions(provisioned) -> None:
    ct = provisioned.ct
    conf = ct.sh("cat /etc/audit/auditd.conf").stdout
    live = dict(re.findall(r"^(\w+)\s*=\s*(\S+)", conf, re.M))
    assert {k: live.get(k) for k in baseline.AUDITD_CONF} == baseline.AUDITD_CONF
    rules = ct.sh("cat /etc/audit/rules.d/60-voice-appliance.rules").stdout
    for w in baseline.AUDIT_WATCHES:
        assert w in rules, w
