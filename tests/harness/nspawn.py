"""A booted Debian 12 test host: a cached debootstrap rootfs run under ``systemd-nspawn --boot``.

Why nspawn: this machine's PID 1 is not systemd and there is no container engine, but nspawn boots a real
systemd (units, credentials, sandboxing, Restart=, watchdog all take effect) in ~1 s (FACTS). The rootfs
is built once per package list and cached under ``/var/cache/voice-appliance-tests``; every boot runs on
a copy-on-write overlay (``--volatile=overlay``) so runs never see each other's changes.

Networking: the container gets its own network namespace that we create, joined by a veth pair to a
second "peer" namespace standing in for the Internet. Nothing is added to the machine's main namespace
(a drop-policy ruleset is only ever loaded inside the container).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("VA_OPS_CACHE", "/var/cache/voice-appliance-tests"))
SUITE = "bookworm"
# debootstrap's own set (resolved by debootstrap), then everything the playbook installs, pre-installed so
# the container needs no network: the playbook's apt tasks then converge without downloading anything.
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-apt", "ca-certificates", "iproute2"]
EXTRA_PACKAGES = [
    "procps",
    "janus",
    "coturn",
    "redis-server",
    "redis-sentinel",  # the redis role in its fleet form (tests/ops/test_redis_role.py)
    "nftables",
    "openssh-server",
    "auditd",
    "unattended-upgrades",
    "apt-listchanges",
    "needrestart",
    "kmod",
    "sudo",
    "certbot",
    "pebble",
    "systemd-timesyncd",
    "openssl",
    "haproxy",
    "libopus0",
    "postgresql-15",  # the postgres role (the container has no mirror: everything it installs is here)
    "ssl-cert",
    "espeak-ng",
    "sox",
    "python3-venv",
    "libpython3.11",
    "netbase",
    "prometheus",  # the monitoring role (tests/ops/monitoring-playbook.yml)
    "prometheus-alertmanager",
    "prometheus-redis-exporter",  # the redis role (redis_exporter)
]
PEER_ADDR = "192.0.2.1"  # documentation range, only ever inside our own namespaces
HOST_ADDR = "192.0.2.2"


def run(
    cmd: list[str], check: bool = True, timeout: float = 600, **kw: object
) -> subprocess.CompletedProcess[str]:
    """subprocess.run with text output captured; raises with stderr in the message on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise RuntimeError(f"{' '.join(cmd)} → {proc.returncode}\n{tail}")
    return proc


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (so debootstrap reaches what apt reaches)."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(p.read_text())
    for text in texts:
        for m in re.finditer(r"(?:URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)/?\s", text, re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


def rootfs_key() -> str:
    return hashlib.sha256(" ".join([SUITE, *BASE_PACKAGES, "|", *EXTRA_PACKAGES]).encode()).hexdigest()[:12]


def ensure_rootfs(cache_dir: Path = CACHE_DIR) -> Path:
    """Build (once) and return a bookworm rootfs with systemd and every package the playbook installs."""
    root = cache_dir / f"rootfs-{rootfs_key()}"
    if (root / ".complete").exists():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".building-{rootfs_key()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(tmp),
            debian_mirror(),
        ],
        timeout=1800,
    )
    policy = tmp / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy("/etc/resolv.conf", tmp / "etc/resolv.conf")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    run(
        ["chroot", str(tmp), "apt-get", "install", "-y", "-q", "--no-install-recommends", *EXTRA_PACKAGES],
        env=env,
        timeout=1800,
    )
    run(["chroot", str(tmp), "apt-get", "clean"], env=env)
    policy.unlink()
    (tmp / "etc/resolv.conf").unlink(missing_ok=True)
    (tmp / "etc/machine-id").write_text("")  # systemd creates a fresh one at each boot
    (tmp / ".complete").write_text(rootfs_key() + "\n")
    tmp.rename(root)
    return root


@dataclass
class Container:
    """A booted nspawn container: run commands in it, reach it from the peer namespace."""

    name: str
    nspawn_pid: int
    leader: int  # the container's PID 1 (systemd) as seen from the host
    netns: str
    peer_netns: str
    root: Path
    log: Path

    def nsenter(self) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-a", "--"]

    def sh(self, script: str, check: bool = True, timeout: float = 300, input: str | None = None):
        """Run a shell script inside the container (all its namespaces, as root)."""
        return run([*self.nsenter(), "/bin/sh", "-c", script], check=check, timeout=timeout, input=input)

    def put(self, local: Path, remote: str) -> None:
        """Copy a host file into the container (its root is an overlay, not a host directory)."""
        with open(local, "rb") as src:
            subprocess.run([*self.nsenter(), "/bin/sh", "-c", f"cat > '{remote}'"], stdin=src, check=True)

    def peer(self, cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command in the peer namespace (the "Internet" side of the container's veth)."""
        return run(["ip", "netns", "exec", self.peer_netns, *cmd], check=check, timeout=timeout)

    def wait_running(self, timeout: float = 90) -> str:
        """Wait until systemd reports running/degraded; return the state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            p = self.sh("systemctl is-system-running 2>/dev/null || true", check=False, timeout=30)
            state = p.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"container {self.name} not up: {state!r}\n{self.log.read_text()[-3000:]}")


def _find_leader(nspawn_pid: int, timeout: float = 30) -> int:
    """The container's init: the descendant of nspawn whose PID-namespace pid is 1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                text = status.read_text()
                ppid = int(re.search(r"^PPid:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
                nspid = re.search(r"^NSpid:\s+(.*)$", text, re.M)
                if ppid == nspawn_pid and nspid and nspid.group(1).split()[-1] == "1":
                    return int(status.parent.name)
        time.sleep(0.1)
    raise TimeoutError("nspawn's init did not appear")


def _netns(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


@contextlib.contextmanager
def booted(root: Path, name: str = "va-ops", workdir: Path | None = None) -> Iterator[Container]:
    """Boot ``root`` (read-only; writes go to a tmpfs overlay) in its own netns with a peer netns."""
    suffix = f"{os.getpid()}"
    ct_ns, peer_ns = f"{name}-ct-{suffix}", f"{name}-peer-{suffix}"
    workdir = workdir or Path("/tmp")
    log = workdir / f"{name}-nspawn.log"
    proc: subprocess.Popen | None = None
    try:
        _netns(ct_ns)
        _netns(peer_ns)
        veth_ct, veth_peer = f"va{suffix}c"[-15:], f"va{suffix}p"[-15:]
        run(
            [
                "ip",
                "link",
                "add",
                veth_ct,
                "netns",
                ct_ns,
                "type",
                "veth",
                "peer",
                "name",
                veth_peer,
                "netns",
                peer_ns,
            ]
        )
        run(["ip", "-n", ct_ns, "link", "set", veth_ct, "name", "eth0"])
        run(["ip", "-n", ct_ns, "addr", "add", f"{HOST_ADDR}/24", "dev", "eth0"])
        run(["ip", "-n", ct_ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", ct_ns, "route", "add", "default", "via", PEER_ADDR])  # a host has a default route
        run(["ip", "-n", peer_ns, "addr", "add", f"{PEER_ADDR}/24", "dev", veth_peer])
        run(["ip", "-n", peer_ns, "link", "set", veth_peer, "up"])
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "-D",
                    str(root),
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    f"--network-namespace-path=/run/netns/{ct_ns}",
                    "--volatile=overlay",
                    f"--machine={name}",
                    "--console=passive",
                    "--capability=CAP_NET_ADMIN",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        leader = _find_leader(proc.pid)
        ct = Container(name, proc.pid, leader, ct_ns, peer_ns, root, log)
        ct.wait_running()
        yield ct
    finally:
        if proc is not None:
            _stop(proc)
        for ns in (ct_ns, peer_ns):
            run(["ip", "netns", "delete", ns], check=False)


def _stop(proc: subprocess.Popen) -> None:
    """Power the container off through nspawn (SIGRTMIN+4 to its init = poweroff); kill if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # nspawn forwards as a clean poweroff request
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.poll() is not None


if __name__ == "__main__":  # build the cache ahead of a test run: python -m tests.harness.nspawn
    print(ensure_rootfs())
