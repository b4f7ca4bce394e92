"""A real coturn (turnserver) for tests: loopback, ``use-auth-secret``, free ports, stopped by PID.

    with coturn_server(tmp_path, secret="s3cret") as turn:
        ok, out = uclient_check(turn, username, password)   # turnutils_uclient allocate + relay

``listen_ip`` may be another loopback address (127.0.0.2 inside the Janus namespace) and ``netns`` runs
the server inside ``ip netns exec NS``. Loopback peers are allowed by default (tests only; production
denies them); ``allow_loopback_peers=False`` keeps coturn's default denial (e.g. relaying to a Janus on a
veth address needs no loopback peer). ``verbose=True`` makes coturn log each session, including its
``usage: … username=<U>, rp=…, rb=…, sp=…, sb=…`` traffic counters (proof that media was relayed).
``extra_args`` adds command-line options (e.g. the production peer policy from the Ansible template),
``relay_ips`` extra relay addresses (an IPv6 one for v6 allocations) and ``run_as`` a user to run as
(Debian's ``turnserver``, so an nftables ``meta skuid`` rule can match it; its files then live in a
directory that user owns).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.procs import pid_gone
from tests.harness.procs import stop

TURNSERVER = "/usr/bin/turnserver"
UCLIENT = "/usr/bin/turnutils_uclient"


def _free_udp_tcp_port(host: str) -> int:
    for _ in range(50):
        with socket.socket() as t:
            t.bind((host, 0))
            port = t.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    return not pid_gone(pid)



_STUN_PROBE = """
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.2)
tid = os.urandom(12)
s.sendto(b"\\x00\\x01\\x00\\x00\\x21\\x12\\xa4\\x42" + tid, (sys.argv[1], int(sys.argv[2])))
try:
    data = s.recv(2048)
    print("ok" if data[:2] == b"\\x01\\x01" and data[8:20] == tid else "bad")
except OSError:
    print("no")
"""


def _stun_probe(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        tid = os.urandom(12)
        s.sendto(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + tid, (host, port))
        try:
            data = s.recv(2048)
        except OSError:
            return False
        return data[:2] == b"\x01\x01" and data[8:20] == tid


@dataclass
class CoturnServer:
    workdir: Path
    secret: str
    listen_ip: str = "127.0.0.1"
    netns: str | None = None
    realm: str = "voice-appliance.test"
    port: int = 0
    relay_min_port: int = 0
    relay_max_port: int = 0
    allow_loopback_peers: bool = True
    verbose: bool = False
    extra_args: list[str] = field(default_factory=list)
    relay_ips: list[str] = field(default_factory=list)
    run_as: str | None = None
    tls: tuple[str, str] | None = None  # (cert, key): TLS on tls_port instead of --no-tls
    tls_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"turn:{self.listen_ip}:{self.port}?transport=udp"

    @property
    def log_path(self) -> Path:
        return self.workdir / "turnserver.log"

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _user_prefix(self) -> list[str]:
        if not self.run_as:
            return []
        return ["setpriv", f"--reuid={self.run_as}", f"--regid={self.run_as}", "--clear-groups"]

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return ["--no-tls"]
        if not self.tls_port:
            self.tls_port = _free_udp_tcp_port(self.listen_ip)
        return [f"--tls-listening-port={self.tls_port}", f"--cert={self.tls[0]}", f"--pkey={self.tls[1]}"]

    def start(self, timeout: float = 5.0) -> None:
        if self.run_as:  # pytest's tmp dirs are root-only: the user gets a directory of its own
            self.workdir = Path(tempfile.mkdtemp(prefix="va-turn-"))
            shutil.chown(self.workdir, self.run_as, self.run_as)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_udp_tcp_port(self.listen_ip) if not self.netns else 34780
        if not self.relay_min_port:
            # above the Janus (20000-39999) and media worker (40000-44999) ranges
            base = 45000 + (os.getpid() * 37 + self.port) % 14000
            self.relay_min_port, self.relay_max_port = base, base + 200
        cmd = [
            *self._prefix(), *self._user_prefix(), TURNSERVER, "-n", "--no-cli", *self._tls_args(),
            "--no-dtls", "--fingerprint",
            "--use-auth-secret", f"--static-auth-secret={self.secret}", f"--realm={self.realm}",
            f"--listening-ip={self.listen_ip}", f"--relay-ip={self.listen_ip}",
            f"--listening-port={self.port}", f"--min-port={self.relay_min_port}",
            f"--max-port={self.relay_max_port}", "--no-multicast-peers",
            *(["--allow-loopback-peers"] if self.allow_loopback_peers else []),
            *(["--verbose"] if self.verbose else []),
            f"--log-file={self.log_path}", "--simple-log", "--no-stdout-log",
            f"--pidfile={self.workdir / 'turnserver.pid'}", f"--db={self.workdir / 'turndb'}",
            "--no-software-attribute",
            *[f"--relay-ip={ip}" for ip in self.relay_ips], *self.extra_args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"turnserver exited: {self._log_tail()}")
            if self._stun_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"turnserver did not start: {self._log_tail()}")

    def _stun_ping(self) -> bool:
        """One STUN Binding request; True when a Binding success response comes back."""
        if self.netns:
            res = subprocess.run(
                [*self._prefix(), "python3", "-c", _STUN_PROBE, self.listen_ip, str(self.port)],
                capture_output=True, text=True, timeout=5,
            )
            return res.stdout.strip() == "ok"
        return _stun_probe(self.listen_ip, self.port)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-800:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if not self.proc:
            return
        proc, self.proc = self.proc, None
        stop(proc, timeout)
        assert not _alive(proc.pid), "turnserver still running"
        if self.run_as:
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def coturn_server(
    workdir: Path, secret: str, listen_ip: str = "127.0.0.1", netns: str | None = None,
    allow_loopback_peers: bool = True, verbose: bool = False, port: int = 0,
    relay_ports: tuple[int, int] = (0, 0), extra_args: list[str] | None = None,
    relay_ips: list[str] | None = None, run_as: str | None = None, tls: tuple[str, str] | None = None,
) -> Iterator[CoturnServer]:
    """Start turnserver with ``use-auth-secret``; always stopped (by PID) on exit."""
    srv = CoturnServer(Path(workdir), secret, listen_ip=listen_ip, netns=netns,
                       allow_loopback_peers=allow_loopback_peers, verbose=verbose, port=port,
                       relay_min_port=relay_ports[0], relay_max_port=relay_ports[1],
                       extra_args=list(extra_args or []), relay_ips=list(relay_ips or []), run_as=run_as,
                       tls=tls)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def uclient_check(srv: CoturnServer, username: str, password: str, timeout: float = 20.0) -> tuple[bool, str]:
    """Allocate a relay with ``turnutils_uclient`` and pass 10 messages client-to-client through it.

    Returns (success, output). Success means every message came back through the relay.
    """
    cmd = [
        *srv._prefix(), UCLIENT, "-y", "-n", "10", "-c", "-z", "5", "-u", username, "-w", password,
        "-p", str(srv.port), "-L", srv.listen_ip, "-e", srv.listen_ip, srv.listen_ip,
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return False, f"timeout: {exc.stdout or ''}"
    out = res.stdout + res.stderr
    ok = res.returncode == 0 and "Total lost packets 0 (0.000000%)" in out and "401" not in out
    return ok, out
