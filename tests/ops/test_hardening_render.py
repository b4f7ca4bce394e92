"""The hardening role's rendered configuration for what a container cannot show (the booted container's
kernel is the machine's, and it mounts /tmp and /dev/shm itself): kernel sysctls, audit rules, mount
options, the module blacklist, unattended-upgrades origins. Expectations: tests/ops/baseline.py.
"""

from __future__ import annotations

import re

from tests.harness.roles import render
from tests.ops import baseline


def _sysctls(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([a-z0-9_.]+)\s*=\s*(\S+)", text, re.M))


def test_sysctls_cover_the_baseline_and_no_waived_key():
    net = _sysctls(render("hardening", "sysctl-net.conf.j2"))
    kernel = _sysctls(render("hardening", "sysctl-kernel.conf.j2"))
    for key, value in baseline.NET_SYSCTLS.items():
        assert net.get(key) == value, key
    for key, value in baseline.KERNEL_SYSCTLS.items():
        assert kernel.get(key) == value, key
    assert not set(baseline.WAIVED_SYSCTLS) & (set(net) | set(kernel))
    assert not {k for k in kernel if k.startswith("net.ipv4.") or k.startswith("net.ipv6.")}, \
        "per-namespace keys belong in the net file (applied in containers too)"

def test_audit_rules_watch_the_baseline():
    rules = render("hardening", "audit.rules.j2")
    for w in baseline.AUDIT_WATCHES:
        assert re.search(rf"^-(w {re.escape(w)} |a always,exit .*-S [a-z_,]*{w})", rules, re.M), w
    auditd = dict(ln.split(" = ", 1) for ln in render("hardening", "auditd-hardening.conf.j2").splitlines()
                  if " = " in ln)
    assert {k: auditd.get(k) for k in baseline.AUDITD_CONF} == baseline.AUDITD_CONF


def test_mount_options_and_module_blacklist():
    fstab = render("hardening", "fstab-hardening.j2")
    mounts = {f[1]: set(f[3].split(",")) for f in (ln.split() for ln in fstab.splitlines() if ln.strip())}
    for path, opts in baseline.MOUNTS.items():
        assert opts <= mounts[path], (path, mounts.get(path))
    assert "bind" in mounts["/var/tmp"]
    blacklist = render("hardening", "modprobe-blacklist.conf.j2")
    for m in baseline.MODULES:
        assert f"install {m} /bin/false" in blacklist and f"blacklist {m}" in blacklist, m
    assert "vfat" not in blacklist  # EFI system partitions


def test_unattended_upgrades_security_only():
    conf = render("hardening", "52voice-appliance-unattended-upgrades.j2")
    assert "#clear Unattended-Upgrade::Origins-Pattern;" in conf
    patterns = re.findall(r'^\s*"(origin=[^"]+)";', conf, re.M)
    assert patterns and all("label=Debian-Security" in p for p in patterns), patterns
