"""A whole fleet on one machine: 3 appliance boxes, 2 load balancers with a VRRP virtual IP, Redis
primary + replica + 3 Sentinels and one Live emulator, each host a network namespace.

Network (subnet range 10.214.0.0/16, namespaces ``va-f<tag>-<host>``, interfaces ``vf<tag>…``; nobody
else on the machine uses these): one Linux bridge in the root namespace is the fleet's private network
``10.214.K.0/24`` (K picked free under /tmp/va-fleet-netns.lock). Every host is a namespace with one veth
on the bridge::

    10.214.K.1    root namespace: the test (aiortc callers, httpx) and the Live emulator
    10.214.K.2-3  lb1, lb2: HAProxy + keepalived (unicast VRRP); the virtual IP is 10.214.K.100
    10.214.K.5-6  data1 (Redis primary + Sentinel), data2 (Redis replica + Sentinel); Sentinel 3 on lb1
    10.214.K.11+  box1…boxN: Janus (ICE on the box address), coturn, `voice-appliance supervisor`

On the test machine public and private network are the same bridge: callers reach the virtual IP for the
API and each box's own address for media, so media never crosses the load balancers, as in production.
Inside its namespace each host uses the production ports (443, 8443, 9642, 6379, 26379): namespaces
cannot collide with anything else on the machine.

HAProxy and keepalived run on configs rendered from the ``loadbalancer`` role's templates
(tests/harness/ansible_render.py): what ships is what is tested. TLS: a "site" CA signs the public
certificate HAProxy serves on the virtual IP; an internal CA signs each box's API certificate (DNS name =
box id) that HAProxy verifies (``verify required``), as the playbook's internal CA does.

Everything is started by PID and stopped by PID (a killed box: every PID in its namespace, from
``ip netns pids``); teardown deletes the namespaces and the bridge. Needs root.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import io
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import janus_conf
from appliance.procs import pid_gone
from appliance.runner import dumps_toml
from appliance.token import generate_keys, mint
from tests.harness import ansible_render
from tests.harness.coturn import CoturnServer
from tests.harness.emulator import Emulator, start_emulator
from tests.harness.shm import unique_instance_id

SUBNET_PREFIX = "10.214."
NETNS_PREFIX = "va-f"
_LOCK_FILE = "/tmp/va-fleet-netns.lock"
API_PORT = 8443
AGENT_PORT = 9642
METRICS_PORT = 9641
LB_PORT = 443
REDIS_PORT = 6379
SENTINEL_PORT = 26379
SENTINEL_MASTER = "va-main"
VIP_HOST = 100


def fleet_available() -> bool:
    """True when this machine can run the fleet (root; janus, haproxy, keepalived, redis, coturn)."""
    tools = ("ip", "janus", "haproxy", "keepalived", "redis-server", "redis-sentinel", "turnserver", "curl")
    return os.geteuid() == 0 and all(_which(t) for t in tools)


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None or Path(f"/usr/sbin/{name}").exists()


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


# ---- certificates ---------------------------------------------------------------------------------
@dataclass
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path  # the CA certificate (PEM)


def make_ca(path: Path, name: str) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(cert, key, path)


def issue(ca: Ca, cn: str, dns: list[str], ips: list[str], cert_path: Path, key_path: Path) -> None:
    """A server certificate signed by ``ca`` (key written 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# ---- hosts (namespaces) ---------------------------------------------------------------------------
@dataclass
class Host:
    """One namespace on the fleet bridge and the processes started in it."""

    name: str  # box1, lb1, data1, …
    netns: str
    ip: str
    host_if: str
    ns_if: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def popen(self, key: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with open(log, "ab") as out:
            self.procs[key] = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdout=out,
                                               stderr=subprocess.STDOUT, env=env)

    def run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def pids(self) -> list[int]:
        """Every process in this namespace (all of them were started by the harness)."""
        out = _run(["ip", "netns", "pids", self.netns], check=False).stdout
        return [int(p) for p in out.split()]

    def stop(self, key: str, sig: int = signal.SIGTERM, wait: float = 15) -> None:
        proc = self.procs.get(key)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace (a host dying), then reap our children."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        deadline = time.monotonic() + 10
        while any(not pid_gone(p) for p in self.pids()) and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class Box:
    host: Host
    box_id: str
    instance: str
    config: Path
    log: Path
    janus_log: Path
    coturn: CoturnServer | None = None

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def api(self) -> str:
        """The box's own API (TLS, internal CA), as the load balancers reach it."""
        return f"https://{self.host.ip}:{API_PORT}"

    @property
    def supervisor(self) -> subprocess.Popen[bytes]:
        return self.host.procs["supervisor"]

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def agent(self) -> str:
        """What the agent check answers now (as HAProxy asks it)."""
        with socket.create_connection((self.host.ip, AGENT_PORT), 2) as s:
            return s.recv(64).decode().strip()


@dataclass
class Lb:
    host: Host
    config: Path
    keepalived_config: Path
    stats_socket: Path
    log: Path
    keepalived_log: Path

    def stat(self) -> list[dict[str, str]]:
        """HAProxy's ``show stat`` rows of backend ``appliances`` (one per box)."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        s.connect(str(self.stats_socket))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return [r for r in rows if r["pxname"] == "appliances" and r["svname"] not in ("BACKEND", "FRONTEND")]

    def restart_haproxy(self) -> None:
        start_haproxy(self)

    def has_vip(self, vip: str) -> bool:
        return f"inet {vip}/" in self.host.run(["ip", "-4", "addr", "show"]).stdout

    @property
    def haproxy_alive(self) -> bool:
        p = self.host.procs.get("haproxy")
        return p is not None and p.poll() is None


@dataclass
class Fleet:
    """The running fleet (see the module docstring)."""

    tmp: Path
    subnet: str  # "10.214.K."
    bridge: str
    vip: str
    emulator: Emulator
    boxes: list[Box]
    lbs: list[Lb]
    data: list[Host]
    site_ca: Path  # trust this to talk to the virtual IP
    internal_ca: Path
    private_key: bytes
    redis_password: str

    @property
    def url(self) -> str:
        """The fleet's public API (the virtual IP)."""
        return f"https://{self.vip}:{LB_PORT}"

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(self.data[0].ip, SENTINEL_PORT), (self.data[1].ip, SENTINEL_PORT),
                (self.lbs[0].host.ip, SENTINEL_PORT)]

    def token(self, sub: str = "alice") -> str:
        return mint(self.private_key, sub=sub, audience="voice-appliance", scope="voice:session",
                    ttl_seconds=600)

    def box(self, box_id: str) -> Box:
        return next(b for b in self.boxes if b.box_id == box_id)

    def active_lb(self) -> Lb | None:
        holders = [lb for lb in self.lbs if lb.has_vip(self.vip)]
        return holders[0] if len(holders) == 1 else None

    def redis_primary(self) -> tuple[str, int]:
        """The primary as the Sentinels see it now."""
        import redis

        for host, port in self.sentinels:
            with contextlib.suppress(Exception):
                s = redis.Redis(host=host, port=port, socket_timeout=1)
                addr = s.execute_command("SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER)
                s.close()
                if addr:
                    return addr[0].decode(), int(addr[1])
        raise RuntimeError("no Sentinel answered")

    def redis_client(self, host: str | None = None) -> Any:
        import redis

        if host is None:
            host, _ = self.redis_primary()
        return redis.Redis(host=host, port=REDIS_PORT, username="va", password=self.redis_password,
                           socket_timeout=2)

    def add_client_address(self, ip: str) -> None:
        """A second caller address in the root namespace (two callers behind one LB)."""
        _run(["ip", "addr", "add", f"{ip}/32", "dev", self.bridge])

    def del_client_address(self, ip: str) -> None:
        _run(["ip", "addr", "del", f"{ip}/32", "dev", self.bridge], check=False)

    def logs(self) -> str:
        """Tails of every box's, LB's and keepalived's log (for assertion messages)."""
        parts = [f"--- {b.box_id}\n{b.log_tail(1500)}" for b in self.boxes]
        for lb in self.lbs:
            for p in (lb.log, lb.keepalived_log):
                with contextlib.suppress(OSError):
                    parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-800:]}")
        return "\n".join(parts)


# ---- building it ----------------------------------------------------------------------------------
def _used_k() -> set[int]:
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = parts[parts.index("inet") + 1]
            if addr.startswith(SUBNET_PREFIX):
                used.add(int(addr.split(".")[2]))
    return used


class _Net:
    """The bridge and its namespaces; ``close()`` deletes them all."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.bridge = f"vf{self.tag}br"
        self.hosts: list[Host] = []
        with open(_LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                free = [k for k in range(256) if k not in _used_k()]
                if not free:
                    raise RuntimeError("no free 10.214.K.0/24 fleet subnet")
                k = secrets.choice(free)
                self.subnet = f"{SUBNET_PREFIX}{k}."
                _run(["ip", "link", "add", self.bridge, "type", "bridge"])
                # Bridged frames between our namespaces must not meet the machine's iptables.
                _run(["ip", "link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0"],
                     check=False)
                _run(["ip", "addr", "add", f"{self.subnet}1/24", "dev", self.bridge])
                _run(["ip", "link", "set", self.bridge, "up"])
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, name: str, octet: int) -> Host:
        idx = len(self.hosts)
        netns = f"{NETNS_PREFIX}{self.tag}-{name}"
        host_if, ns_if = f"vf{self.tag}{idx:02d}h", f"vf{self.tag}{idx:02d}n"
        ip = f"{self.subnet}{octet}"
        _run(["ip", "netns", "add", netns])
        host = Host(name, netns, ip, host_if, ns_if)
        self.hosts.append(host)
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if])
        _run(["ip", "link", "set", ns_if, "netns", netns])
        _run(["ip", "link", "set", host_if, "master", self.bridge])
        _run(["ip", "link", "set", host_if, "up"])
        for argv in (["link", "set", "lo", "up"], ["addr", "add", f"{ip}/24", "dev", ns_if],
                     ["link", "set", ns_if, "up"], ["route", "add", "default", "via", f"{self.subnet}1"]):
            _run(["ip", "-n", netns, *argv])
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.kill_all()
            _run(["ip", "netns", "del", host.netns], check=False)
            _run(["ip", "link", "del", host.host_if], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)


def _wait(pred: Any, timeout: float, what: str, log: Any = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout} s ({last})\n{log() if log else ''}")


def _redis_ping(ip: str, port: int, password: str = "") -> bool:
    with socket.create_connection((ip, port), 0.5) as s:
        s.sendall((f"AUTH va {password}\r\nPING\r\n" if password else "PING\r\n").encode())
        time.sleep(0.02)
        return b"+PONG" in s.recv(64)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VA_")}
    env["VA_LOG_LEVEL"] = "info"
    return env


def start_box(fleet_tmp: Path, host: Host, box_id: str, *, emulator: Emulator, internal: Ca,
              pub_key: Path, priv_key: Path, redis_cfg: dict[str, Any], lb_ips: list[str], slots: int,
              drain_timeout: int, creates_per_minute: int) -> Box:
    tmp = fleet_tmp / box_id
    tmp.mkdir()
    # Janus: HTTP/admin API and plain RTP on the namespace's loopback, ICE on the box address.
    js = janus_conf.JanusSettings(http_ip="127.0.0.1", admin_ip="127.0.0.1", api_secret=secrets.token_hex(8),
                                  admin_secret=secrets.token_hex(8), public_ip=host.ip,
                                  ice_enforce_list=host.ip, plain_rtp_ip="127.0.0.1",
                                  audiobridge_admin_key=secrets.token_hex(8), debug_level=3)
    conf_dir = tmp / "janus"
    janus_conf.write(js, conf_dir)
    janus_log = tmp / "janus.log"
    host.popen("janus", [*janus_conf.command(conf_dir, str(janus_log)), "-N"], tmp / "janus.out")
    turn_secret = secrets.token_hex(12)
    coturn = CoturnServer(tmp / "coturn", turn_secret, listen_ip=host.ip, netns=host.netns, port=3478,
                          allow_loopback_peers=False)
    coturn.start()
    issue(internal, box_id, [box_id], [host.ip], tmp / "api.pem", tmp / "api.key")
    instance = unique_instance_id(f"f{box_id}")
    api: dict[str, Any] = {"host": host.ip, "port": API_PORT, "tls_cert_file": str(tmp / "api.pem"),
                           "tls_key_file": str(tmp / "api.key"), "public_host": host.ip,
                           "metrics_port": METRICS_PORT,
                           "agent_check_port": AGENT_PORT, "drain_timeout_seconds": drain_timeout,
                           "box_id": box_id, "private_host": host.ip,
                           "trusted_proxies": [f"{ip}/32" for ip in lb_ips]}
    sections: dict[str, Any] = {
        "api": api,
        "auth": {"jwt_public_key_file": str(pub_key), "jwt_private_key_file": str(priv_key)},
        "janus": {"url": f"http://127.0.0.1:{js.http_port}/janus",
                  "admin_url": f"http://127.0.0.1:{js.admin_port}/admin", "api_secret": js.api_secret,
                  "admin_secret": js.admin_secret, "audiobridge_admin_key": js.audiobridge_admin_key,
                  "keepalive_seconds": 5.0},
        "turn": {"secret": turn_secret, "uris": [f"turn:{host.ip}:3478?transport=udp"]},
        "redis": redis_cfg,
        "media": {"rtp_host": "127.0.0.1", "rtp_port_min": 40000, "rtp_port_max": 40000 + 2 * slots + 9},
        "shards": {"count": 1, "slots": slots, "heartbeat_timeout_seconds": 3.0},
        "paths": {"state_dir": str(tmp / "state"), "run_dir": str(tmp / "run"), "instance_id": instance},
        # per-IP limits apply to refused credentials (docs/security.md "Limits after identity"): the
        # rate-limit test sends unauthenticated creates from two addresses behind the LB
        "limits": {"session_creates_per_minute": creates_per_minute, "signalling_per_minute": 10000,
                   "auth_failures_per_minute": creates_per_minute},
        "model": {"api_key": emulator.api_key, "base_url": emulator.base_url, "ca_file": emulator.ca_file,
                  "max_retries": 5, "greeting": ""},
        # no greeting: the tests' echo checks start at once (the disclosure has its own tests)
        "compliance": {"ai_disclosure": False,
                       "ai_disclosure_off_reason": "fleet tests: the caller is a test harness"},
    }
    cfg = tmp / "appliance.toml"
    cfg.write_text(dumps_toml(sections))
    log = tmp / "supervisor.log"
    host.popen("supervisor", [sys.executable, "-m", "appliance", "supervisor", "--config", str(cfg)], log,
               env=_env())
    return Box(host, box_id, instance, cfg, log, janus_log, coturn)


def wait_box_ready(box: Box, internal_ca: Path, timeout: float = 90) -> None:
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(internal_ca))
    ctx.check_hostname = False  # reached by IP here; HAProxy checks the name (verifyhost)

    def ready() -> bool:
        if box.supervisor.poll() is not None:
            raise RuntimeError(f"{box.box_id} supervisor exited {box.supervisor.returncode}")
        with urllib.request.urlopen(box.api + "/readyz", timeout=1, context=ctx) as r:
            return r.status == 200

    _wait(ready, timeout, f"{box.box_id} /readyz", box.log_tail)


def lb_vars(fleet_boxes: list[tuple[str, str]], host: Host, peer: Host, vip: str, priority: int,
            tmp: Path, password: str) -> dict[str, Any]:
    """The loadbalancer role's variables for one test LB (paths in ``tmp``, interfaces of the netns)."""
    return {
        "loadbalancer_backends": [{"name": n, "address": a} for n, a in fleet_boxes],
        "loadbalancer_frontend_port": LB_PORT,
        "loadbalancer_backend_port": API_PORT,
        "loadbalancer_agent_port": AGENT_PORT,
        "loadbalancer_tls_pem_path": str(tmp / "public.pem"),
        "loadbalancer_internal_ca_path": str(tmp / "internal-ca.pem"),
        "loadbalancer_stats_socket": str(tmp / "admin.sock"),
        "loadbalancer_log_target": "stdout format raw local0",
        "loadbalancer_maxconn": 4000,  # this machine's hard file limit (20000) caps it
        "loadbalancer_vip": vip,
        "loadbalancer_vip_prefix": 24,
        "loadbalancer_vip_interface": host.ns_if,
        "loadbalancer_vrrp_src_ip": host.ip,
        "loadbalancer_vrrp_peers": [peer.ip],
        "loadbalancer_vrrp_priority": priority,
        "loadbalancer_vrrp_password": password,
        "loadbalancer_vrrp_router_name": host.name,
        # the role installs this script as /usr/local/sbin/va-lb-health; here it runs from the repo
        "loadbalancer_health_command": f"{ansible_render.ROLES_DIR}/loadbalancer/files/va-lb-health 8404",
    }


def start_lb(tmp: Path, host: Host, variables: dict[str, Any], site_pem: bytes, internal_ca: Path) -> Lb:
    tmp.mkdir()
    (tmp / "public.pem").write_bytes(site_pem)
    (tmp / "public.pem").chmod(0o600)
    (tmp / "internal-ca.pem").write_bytes(internal_ca.read_bytes())
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(ansible_render.render("loadbalancer", "haproxy.cfg.j2", variables, host.name))
    check = _run(["haproxy", "-c", "-f", str(cfg)], check=False)
    if check.returncode != 0:
        raise RuntimeError(f"rendered haproxy.cfg is invalid:\n{check.stdout}{check.stderr}")
    kcfg = tmp / "keepalived.conf"
    kcfg.write_text(ansible_render.render("loadbalancer", "keepalived.conf.j2", variables, host.name))
    kcfg.chmod(0o600)
    lb = Lb(host, cfg, kcfg, tmp / "admin.sock", tmp / "haproxy.log", tmp / "keepalived.log")
    start_haproxy(lb)
    host.popen("keepalived", ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp",
                              "-f", str(kcfg), "-p", str(tmp / "keepalived.pid"),
                              "-r", str(tmp / "vrrp.pid"), "-c", str(tmp / "checkers.pid")],
               lb.keepalived_log)
    return lb


def start_haproxy(lb: Lb) -> None:
    with contextlib.suppress(FileNotFoundError):
        lb.stats_socket.unlink()
    lb.host.popen("haproxy", ["haproxy", "-db", "-f", str(lb.config)], lb.log)
    _wait(lambda: lb.stats_socket.exists(), 10, f"{lb.host.name} haproxy", lambda: lb.log.read_text())


def _start_redis(host: Host, tmp: Path, password: str, replica_of: str | None = None) -> None:
    """Redis with the redis role's ACL file (users.acl.j2): the appliance's user "va" may touch only
    "va:*" keys, replication and Sentinel have their own users, the default user is off."""
    tmp.mkdir()
    acl = tmp / "users.acl"
    acl.write_text(ansible_render.render("redis", "users.acl.j2", {
        "redis_acl_password": password, "redis_replication_password": password,
        "redis_sentinel_password": password, "redis_exporter_password": password}))
    acl.chmod(0o600)
    conf = tmp / "redis.conf"
    lines = [f"bind {host.ip}", f"port {REDIS_PORT}", f"dir {tmp}", 'save ""', "appendonly yes",
             "appendfsync always", "repl-diskless-sync-delay 0", "protected-mode no",
             f"aclfile {acl}", "masteruser replicator", f"masterauth {password}", "loglevel warning"]
    if replica_of:
        lines.append(f"replicaof {replica_of} {REDIS_PORT}")
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    host.popen("redis", ["redis-server", str(conf)], tmp / "redis.log")
    _wait(lambda: _redis_ping(host.ip, REDIS_PORT, password), 10, f"redis on {host.name}")


def _start_sentinel(host: Host, tmp: Path, primary_ip: str, password: str) -> None:
    tmp.mkdir()
    conf = tmp / "sentinel.conf"
    conf.write_text("\n".join([
        f"bind {host.ip}", f"port {SENTINEL_PORT}", f"dir {tmp}", "protected-mode no",
        f"sentinel monitor {SENTINEL_MASTER} {primary_ip} {REDIS_PORT} 2",
        f"sentinel auth-user {SENTINEL_MASTER} sentinel",
        f"sentinel auth-pass {SENTINEL_MASTER} {password}",
        f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000",
        f"sentinel failover-timeout {SENTINEL_MASTER} 10000",
        f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
    ]) + "\n")
    host.popen("sentinel", ["redis-sentinel", str(conf)], tmp / "sentinel.log")
    _wait(lambda: _redis_ping(host.ip, SENTINEL_PORT), 10, f"sentinel on {host.name}")


@contextlib.contextmanager
def running_fleet(tmp: Path, *, boxes: int = 3, slots: int = 2, drain_timeout: int = 10,
                  creates_per_minute: int = 20) -> Iterator[Fleet]:
    """Start the whole fleet (about 20-40 s on a loaded 2-core machine); tear everything down after."""
    net = _Net()
    try:
        lb_hosts = [net.add("lb1", 2), net.add("lb2", 3)]
        data = [net.add("data1", 5), net.add("data2", 6)]
        box_hosts = [net.add(f"box{i + 1}", 11 + i) for i in range(boxes)]
        vip = f"{net.subnet}{VIP_HOST}"
        pki = tmp / "pki"
        pki.mkdir()
        site = make_ca(pki / "site-ca.pem", "fleet test site CA")
        issue(site, "voice.test", ["voice.test"], [vip], pki / "site.pem", pki / "site.key")
        site_pem = (pki / "site.pem").read_bytes() + (pki / "site.key").read_bytes()
        internal = make_ca(pki / "internal-ca.pem", "fleet test internal CA")
        priv, pub = generate_keys(tmp / "jwt")
        password = secrets.token_hex(16)
        with start_emulator(tmp, host=f"{net.subnet}1", reply="echo") as emu:
            _start_redis(data[0], tmp / "redis1", password)
            _start_redis(data[1], tmp / "redis2", password, replica_of=data[0].ip)
            for h in (data[0], data[1], lb_hosts[0]):
                _start_sentinel(h, tmp / f"sentinel-{h.name}", data[0].ip, password)
            (tmp / "redis-password").write_text(password)
            (tmp / "redis-password").chmod(0o600)
            redis_cfg = {"url": f"redis://va:{password}@{data[0].ip}:{REDIS_PORT}/0",
                         "sentinels": [f"{h.ip}:{SENTINEL_PORT}" for h in (data[0], data[1], lb_hosts[0])],
                         "sentinel_master": SENTINEL_MASTER, "username": "va",
                         "password_file": str(tmp / "redis-password")}
            lb_ips = [h.ip for h in lb_hosts]
            box_list = [start_box(tmp, h, h.name, emulator=emu, internal=internal, pub_key=pub, priv_key=priv,
                                  redis_cfg=redis_cfg, lb_ips=lb_ips, slots=slots,
                                  drain_timeout=drain_timeout, creates_per_minute=creates_per_minute)
                        for h in box_hosts]
            for b in box_list:
                wait_box_ready(b, internal.path)
            vrrp_password = secrets.token_hex(8)
            backends = [(b.box_id, b.ip) for b in box_list]
            lbs = [start_lb(tmp / lb.name, lb, lb_vars(backends, lb, peer, vip, prio, tmp / lb.name,
                                                        vrrp_password), site_pem, internal.path)
                   for lb, peer, prio in ((lb_hosts[0], lb_hosts[1], 150), (lb_hosts[1], lb_hosts[0], 100))]
            fleet = Fleet(tmp, net.subnet, net.bridge, vip, emu, box_list, lbs, data, site.path,
                          internal.path, priv.read_bytes(), password)
            _wait(lambda: fleet.active_lb() is not None, 30, "virtual IP", fleet.logs)
            _wait(lambda: all(r["status"] == "UP" for lb in lbs for r in lb.stat()), 30,
                  "all boxes UP in both HAProxies", fleet.logs)
            try:
                yield fleet
            finally:
                for b in box_list:
                    b.host.stop("supervisor", signal.SIGINT)
                    if b.coturn is not None:
                        b.coturn.stop()
    finally:
        net.close()
