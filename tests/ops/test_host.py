"""The playbook on a booted Debian 12 (systemd-nspawn): converge, idempotence, then the host as users see it.

One container per session (``provisioned`` in conftest): site.yml runs twice against it through the
nsenter connection, then each test inspects one promise of the appliance host. Network checks run from
the peer namespace on the other end of the container's veth, i.e. from "the Internet".
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.harness import nspawn

# Session fixtures build the .deb and converge a host on first use: allow for that in the first test.
pytestmark = [pytest.mark.ops, pytest.mark.timeout(2400)]

# The emulator runs because the test vault has no Gemini key.
SERVICES = [
    "voice-appliance",
    "voice-appliance-emulator",
    "janus",
    "coturn",
    "redis-server",
    "prometheus-redis-exporter",
    "nftables",
    "ssh",
]


def tcp_probe(host, addr: str, port: int, timeout: float = 2.0) -> str:
    """From the peer netns: 'open', 'refused' or 'timeout' (dropped) for a TCP connect."""
    code = (
        "import socket\n"
        f"s=socket.socket(); s.settimeout({timeout!r})\n"
        f"try:\n s.connect(({addr!r},{port})); print('open')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except (TimeoutError, socket.timeout): print('timeout')\n"
    )
    return host.ct.peer(["python3", "-c", code], timeout=timeout + 10).stdout.strip()


def http_get_from_peer(host, url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """GET from the peer namespace, verifying the box's certificate; (status, HSTS header, body)."""
    code = (
        "import ssl,urllib.request,urllib.error\n"
        f"ctx=ssl.create_default_context(cafile={str(host.tls.ca_file)!r})\n"
        f"try:\n r=urllib.request.urlopen({url!r}, timeout={timeout!r}, context=ctx)\n"
        " print(r.status); print(r.headers.get('strict-transport-security'))\n"
        " print(r.read().decode()[:500])\n"
        "except urllib.error.HTTPError as e:\n"
        " print(e.code); print(e.headers.get('strict-transport-security')); print(e.read().decode()[:500])\n"
    )
    out = host.ct.peer(["python3", "-c", code], timeout=timeout + 10).stdout
    status, hsts, body = out.split("\n", 2)
    return int(status), hsts, body


def wait_for(pred, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    return last


def test_converge_then_second_run_changes_nothing(provisioned) -> None:
    first, second = provisioned.runs[0], provisioned.runs[1]
    assert first.rc == 0 and first.recap.get("failed") == 0 and first.recap.get("changed", 0) > 0, first.recap
    assert second.rc == 0, second.output[-4000:]
    assert second.recap.get("failed") == 0 and second.recap.get("unreachable") == 0
    changed = [line for line in second.output.splitlines() if line.startswith("changed:")]
    assert second.recap.get("changed") == 0, "\n".join(changed) + "\n" + second.output[-3000:]


def test_services_active(provisioned) -> None:
    ct = provisioned.ct
    states = {}
    for svc in SERVICES:
        states[svc] = (
            wait_for(
                lambda s=svc: (
                    ct.sh(f"systemctl is-active {s}", check=False).stdout.strip() == "active" and "active"
                ),
                timeout=60,
            )
            or ct.sh(f"systemctl is-active {svc}; journalctl -u {svc} -n 30 --no-pager", check=False).stdout
        )
    assert all(v == "active" for v in states.values()), states
    enabled = ct.sh("systemctl is-enabled " + " ".join(SERVICES), check=False).stdout.split()
    # The emulator has no [Install]: the main unit pulls it in.
    assert enabled == ["enabled", "static"] + ["enabled"] * (len(SERVICES) - 2), enabled


def test_units_verify_without_output(provisioned) -> None:
    """systemd-analyze verify exits 0 on unknown keys, so any output at all is a failure (FACTS)."""
    for unit in (
        "voice-appliance.service",
        "voice-appliance-emulator.service",
        "janus.service",
        "coturn.service",
    ):
        p = provisioned.ct.sh(f"systemd-analyze verify --man=no {unit} 2>&1", check=False)
        assert p.stdout.strip() == "" and p.returncode == 0, f"{unit}: {p.stdout}"


def test_installed_unit_exposure(provisioned) -> None:
    out = provisioned.ct.sh(
        "systemd-analyze security voice-appliance.service --no-pager 2>&1", check=False
    ).stdout
    level = float(out.rsplit("Overall exposure level for voice-appliance.service:", 1)[1].split()[0])
    assert level <= 2.0, out[-2000:]


def test_readyz_through_public_443(provisioned) -> None:
    """The API listens unprivileged on 8443 with the operator's certificate; nftables redirects public 443."""
    ct = provisioned.ct
    ok = wait_for(
        lambda: (
            ct.sh(
                'python3 -c "import ssl, urllib.request as u; print(u.urlopen('
                "'https://127.0.0.1:8443/readyz', timeout=3, "
                'context=ssl._create_unverified_context()).status)"',
                check=False,
            ).stdout.strip()
            == "200"
        ),
        timeout=90,
    )
    assert ok, ct.sh("journalctl -u voice-appliance -n 60 --no-pager", check=False).stdout
    status, hsts, body = http_get_from_peer(provisioned, f"https://{nspawn.HOST_ADDR}:443/readyz")
    assert status == 200 and hsts == "max-age=31536000", (status, hsts, body)
    # The unprivileged port itself is not public: only redirected connections reach it.
    assert tcp_probe(provisioned, nspawn.HOST_ADDR, 8443) == "timeout"


def test_closed_port_is_dropped(provisioned) -> None:
    """A service listening on a port outside the public zone is unreachable from outside (no RST)."""
    ct = provisioned.ct
    ct.sh(
        "systemd-run --unit=va-ops-probe --property=Type=exec "
        "python3 -m http.server 9999 --bind 0.0.0.0 --directory /var/empty 2>/dev/null || true"
    )
    try:
        inside = wait_for(
            lambda: (
                ct.sh(
                    "python3 -c \"import socket; socket.create_connection(('127.0.0.1', 9999), 2)"
                    "; print('open')\"",
                    check=False,
                ).stdout.strip()
                == "open"
            ),
            timeout=20,
        )
        assert inside, "probe server did not start"
        assert tcp_probe(provisioned, nspawn.HOST_ADDR, 9999) == "timeout"
        # Loopback-only services are not reachable either, and public TURN is.
        assert tcp_probe(provisioned, nspawn.HOST_ADDR, 6379) == "timeout"
        assert tcp_probe(provisioned, nspawn.HOST_ADDR, 3478) == "open"
        ruleset = ct.sh("nft list ruleset").stdout
        assert "policy drop" in ruleset and "redirect to :8443" in ruleset
    finally:
        ct.sh("systemctl stop va-ops-probe", check=False)


def test_sshd_config_is_valid_and_key_only(provisioned) -> None:
    ct = provisioned.ct
    assert ct.sh("sshd -t", check=False).returncode == 0
    effective = dict(
        line.split(" ", 1)
        for line in ct.sh("sshd -T -C user=root,host=x,addr=192.0.2.9").stdout.splitlines()
        if " " in line
    )
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitrootlogin"] == "no"
    assert effective["x11forwarding"] == "no" and effective["allowtcpforwarding"] == "no"
    assert effective["maxauthtries"] == "3"


def test_secrets_not_world_readable(provisioned) -> None:
    ct = provisioned.ct
    listing = ct.sh(
        "stat -c '%a %U %G %n' /etc/voice-appliance/credentials /etc/voice-appliance/credentials/* "
        "/etc/voice-appliance/janus /etc/voice-appliance/janus/*.jcfg /etc/voice-appliance/coturn "
        "/etc/voice-appliance/coturn/turnserver.conf /etc/voice-appliance/coturn/turn.key "
        "/etc/voice-appliance/tls /etc/voice-appliance/tls/privkey.pem "
        "/etc/redis/redis.conf"
    ).stdout.splitlines()
    assert len(listing) >= 12
    for line in listing:
        mode, _owner, _group, path = line.split(" ", 3)
        assert int(mode, 8) & 0o007 == 0, line
        if "/credentials" in path:
            assert line.startswith(("700 root root", "600 root root")), line
    # The secrets really are there (and match what the vault gave), yet the service user can't read them
    # directly: only through the credentials systemd hands to the unit.
    s = provisioned.secrets
    assert ct.sh("cat /etc/voice-appliance/credentials/turn_secret").stdout.strip() == s["vault_turn_secret"]
    assert s["vault_turn_secret"] in ct.sh("cat /etc/voice-appliance/coturn/turnserver.conf").stdout
    denied = ct.sh(
        "setpriv --reuid=voice-appliance --regid=voice-appliance --init-groups "
        "cat /etc/voice-appliance/credentials/turn_secret",
        check=False,
    )
    assert denied.returncode != 0
    # Nothing secret in the world-readable unit environment or config.
    show = ct.sh(
        "systemctl show voice-appliance -p Environment; cat /etc/voice-appliance/appliance.toml"
    ).stdout
    for value in s.values():
        assert value.strip() not in show


def test_network_sysctls_applied_kernel_ones_skipped_in_container(provisioned) -> None:
    ct = provisioned.ct
    values = ct.sh(
        "sysctl -n net.ipv4.tcp_syncookies net.ipv4.conf.all.accept_redirects "
        "net.ipv4.conf.all.rp_filter net.ipv4.conf.all.send_redirects"
    ).stdout.split()
    assert values == ["1", "0", "1", "0"]
    assert ct.sh("test -e /etc/sysctl.d/61-voice-appliance-kernel.conf", check=False).returncode == 1
    assert ct.sh("systemd-detect-virt --container").stdout.strip() == "systemd-nspawn"


def test_kill_is_followed_by_restart(provisioned) -> None:
    ct = provisioned.ct

    def show() -> dict[str, str]:
        out = ct.sh("systemctl show voice-appliance -p MainPID -p NRestarts -p ActiveState").stdout
        return dict(line.split("=", 1) for line in out.split())

    assert wait_for(lambda: show()["ActiveState"] == "active", timeout=60)
    before = show()
    ct.sh("systemctl kill -s KILL voice-appliance")
    after = wait_for(
        lambda: (
            (s := show())["ActiveState"] == "active" and s["MainPID"] not in ("0", before["MainPID"]) and s
        ),
        timeout=60,
    )
    assert after, show()
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1


def test_credentials_reach_the_service(provisioned) -> None:
    """LoadCredential hands the secrets over: the service's $CREDENTIALS_DIRECTORY holds them."""
    ct = provisioned.ct
    pid = ct.sh("systemctl show voice-appliance -p MainPID --value").stdout.strip()
    env = ct.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
    cred_dir = next(
        line.split("=", 1)[1] for line in env.splitlines() if line.startswith("CREDENTIALS_DIRECTORY=")
    )
    names = ct.sh(f"ls {cred_dir}").stdout.split()
    assert {"gemini_api_key", "jwt_public_key.pem", "turn_secret", "janus_api_secret"} <= set(names)
    assert (
        ct.sh(f"cat {cred_dir}/janus_api_secret").stdout.strip()
        == provisioned.secrets["vault_janus_api_secret"]
    )


JANUS_PROBE = """
import json, sys, urllib.error, urllib.request

def post(body):
    req = urllib.request.Request("http://127.0.0.1:8088/janus", data=json.dumps(body).encode(), method="POST")
    try:
        return json.loads(urllib.request.urlopen(req, timeout=3).read())
    except urllib.error.HTTPError as exc:
        return {"http": exc.code, **json.loads(exc.read() or b"{}")}

print(json.dumps([post({"janus": "create", "transaction": "a"}),
                  post({"janus": "create", "transaction": "b", "apisecret": sys.argv[1]})]))
"""


def test_janus_api_answers_only_with_its_secret(provisioned) -> None:
    """Janus (our config, its own user) refuses API calls without the vault's secret."""
    ct = provisioned.ct
    ct.sh("cat > /root/janus_probe.py", input=JANUS_PROBE)
    secret = provisioned.secrets["vault_janus_api_secret"]
    got = wait_for(
        lambda: ct.sh(f"python3 /root/janus_probe.py '{secret}'", check=False).stdout.strip(), timeout=30
    )
    without, with_secret = json.loads(got)
    assert without.get("http") == 403 or without["error"]["code"] == 403, without
    assert with_secret["janus"] == "success", with_secret
    pid = ct.sh("systemctl show janus -p MainPID --value").stdout.strip()
    assert ct.sh(f"stat -c %U /proc/{pid}").stdout.strip() == "janus"


def test_notify_status_and_watchdog_pings(provisioned) -> None:
    """Type=notify: the supervisor reports STATUS= and keeps feeding the watchdog (WatchdogSec=15)."""
    ct = provisioned.ct

    def show() -> dict[str, str]:
        out = ct.sh(
            "systemctl show voice-appliance -p StatusText -p WatchdogUSec -p WatchdogTimestampMonotonic"
        )
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    first = show()
    assert first["WatchdogUSec"] in ("15s", "15000000"), first
    assert "sessions" in first["StatusText"], first
    later = wait_for(
        lambda: (s := show())["WatchdogTimestampMonotonic"] != first["WatchdogTimestampMonotonic"] and s,
        timeout=20,
    )
    assert later, "no WATCHDOG=1 ping within 20 s"


AFFINITY_PROBE = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    if b"media-worker" in args or b"ai-worker" in args:
        role = "media" if b"media-worker" in args else "ai"
        print(role, pid, ",".join(map(str, sorted(os.sched_getaffinity(int(pid))))))
"""


def test_workers_pinned_inside_the_cpu_plan(provisioned) -> None:
    """The supervisor's worker children run pinned, on cores other than Janus's (CPUAffinity drop-in)."""
    ct = provisioned.ct
    ct.sh("cat > /root/affinity_probe.py", input=AFFINITY_PROBE)
    lines = wait_for(lambda: ct.sh("python3 /root/affinity_probe.py").stdout.splitlines(), timeout=60)
    assert {line.split()[0] for line in lines or []} == {"media", "ai"}, lines
    ncpu = int(ct.sh("nproc --all").stdout)
    janus = ct.sh("systemctl show janus -p CPUAffinity --value").stdout.strip()
    for line in lines:
        cpus = line.split()[2].split(",")
        if ncpu >= 2:
            assert len(cpus) == 1, f"worker not pinned to one core: {line}"
            assert cpus[0] not in janus.split(), f"worker on Janus's core(s) {janus!r}: {line}"


HAPROXY_STAT = """
import csv, io, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect("/run/haproxy/admin.sock")
s.sendall(b"show stat\\n"); data = b""
while chunk := s.recv(65536):
    data += chunk
rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
for r in rows:
    if r["pxname"] == "appliances" and r["svname"] != "BACKEND":
        print(r["status"], "|", r["last_agt"], "|", r["check_status"])
"""


def test_loadbalancer_role_health_and_agent_drain(provisioned) -> None:
    """The loadbalancer role: HAProxy checks /readyz and follows the appliance's agent (drain and back)."""
    ct = provisioned.ct
    import json
    import tempfile

    from tests.harness.fleet import issue, make_ca

    lb = Path(__file__).with_name("lb-playbook.yml")
    with tempfile.TemporaryDirectory() as d:
        ca = make_ca(Path(d) / "ca.pem", "ops test site CA")
        issue(ca, "lb.test", ["lb.test"], ["127.0.0.1"], Path(d) / "lb.pem", Path(d) / "lb.key")
        pem = (Path(d) / "lb.pem").read_text() + (Path(d) / "lb.key").read_text()
    lb_vars = json.dumps({
        # the box in the container serves HTTPS itself (appliance_tls_mode=box) with a certificate for
        # localhost from the test CA: HAProxy verifies it like the internal CA's in a fleet
        "loadbalancer_backends": [{"name": "localhost", "address": "127.0.0.1"}],
        "loadbalancer_internal_ca": provisioned.tls.ca_file.read_text(),
        "loadbalancer_frontend_port": 8444,
        "loadbalancer_backend_port": 8443, "loadbalancer_backend_tls": True, "loadbalancer_tls_pem": pem,
        "loadbalancer_agent_interval": "1s", "loadbalancer_apt_update_cache": False,
        # This machine's hard file limit (20000) caps the container's; a real host allows the default.
        "loadbalancer_maxconn": 4000})
    first = provisioned.playbook("-e", lb_vars, playbook=lb)
    assert first.rc == 0, first.output[-4000:]
    second = provisioned.playbook("-e", lb_vars, playbook=lb)
    assert second.rc == 0 and second.recap.get("changed") == 0, second.output[-3000:]
    ct.sh("cat > /root/haproxy_stat.py", input=HAPROXY_STAT)

    def stat() -> str:
        return ct.sh("python3 /root/haproxy_stat.py", check=False).stdout.strip()

    assert wait_for(lambda: stat().startswith("UP | via agent : up"), timeout=30), stat()
    url = "https://127.0.0.1:8444/readyz"  # through HAProxy (TLS terminated there)
    got = ct.sh(f"python3 -c \"import ssl, urllib.request as u; print(u.urlopen('{url}', timeout=3, "
                f"context=ssl._create_unverified_context()).status)\"")
    assert got.stdout.strip() == "200"
    try:
        ct.sh("systemctl kill -s SIGUSR1 --kill-who=main voice-appliance")
        assert wait_for(lambda: stat().startswith("DRAIN"), timeout=20), stat()
    finally:
        ct.sh("systemctl kill -s SIGUSR2 --kill-who=main voice-appliance")
    assert wait_for(lambda: stat().startswith("UP"), timeout=30), stat()


TURN_PROBE = """
import json, socket, sys
from appliance.turn import credential
from tests.harness.turnclient import TurnClient, TurnError
secret, box, janus_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
def client(ttl=600, key=secret):
    c = credential(key, "u_ops", 600, now=__import__("time").time() + ttl - 600)
    return TurnClient((box, 3478), c.username, c.password)
for name, kw in (("expired", {"ttl": -600}), ("forged", {"key": "forged"})):
    try:
        client(**kw).allocate(); out[name] = "allocated"
    except TurnError as e:
        out[name] = e.code
c = client()
out["relayed"] = c.allocate()[0]
for peer in ("127.0.0.1", "192.0.2.1", "10.0.0.1", "8.8.8.8"):
    try:
        c.create_permission(peer); out[peer] = "permitted"
    except TurnError as e:
        out[peer] = e.code
c.create_permission(box)
c.send(box, janus_port, b"media")
c.sock.settimeout(3)
try:
    peer, data = c.receive(); out["echo"] = [peer[0], peer[1], data.decode()]
except OSError as e:
    out["echo"] = str(e)
# last: nftables refuses this datagram (EPERM to coturn's sendto), and coturn then tears the relay down
c.send(box, 22, b"ssh-probe")
print(json.dumps(out))
"""

UDP_LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
log = open(sys.argv[3], "ab", buffering=0)
while True:
    data, addr = s.recvfrom(2048)
    log.write(data + b"\\n")
    if sys.argv[4] == "echo":
        s.sendto(b"janus:" + data, addr)
"""


def test_turn_relay_reaches_only_janus_and_serves_the_box_certificate(provisioned) -> None:
    """coturn as installed: expired or forged credentials get 401; a relay from the Internet (the peer
    namespace) may not reach 127.0.0.1, private ranges or other hosts (403), and on the box's own address
    only Janus's ICE ports (nftables egress table for the turnserver user: :22 never sees a datagram);
    an echo on a Janus ICE port answers through the relay. 5349 serves the operator's certificate with
    TLS >= 1.2 and AEAD suites only.
    """
    ct = provisioned.ct
    secret = provisioned.secrets["vault_turn_secret"]
    janus_port = 29871  # inside janus_ice_port_range; Janus itself binds ports only for calls
    # The listeners run as nobody, who cannot read /root (0700): the script lives where nobody can read it.
    ct.sh("install -d -m 0755 /opt/va-ops && cat > /opt/va-ops/udp_listener.py", input=UDP_LISTENER)
    for unit, port, mode in (("va-ops-janus", janus_port, "echo"), ("va-ops-ssh-udp", 22, "log")):
        ct.sh(f"systemd-run --unit={unit} --property=User=nobody "
              "--property=AmbientCapabilities=CAP_NET_BIND_SERVICE "
              f"python3 /opt/va-ops/udp_listener.py {nspawn.HOST_ADDR} {port} /tmp/{unit}.log {mode}")
    try:
        for unit, port in (("va-ops-janus", janus_port), ("va-ops-ssh-udp", 22)):
            bound = wait_for(lambda port=port: f":{port} " in ct.sh(
                f"ss -Hlun 'sport = :{port}'", check=False).stdout, timeout=10)
            assert bound, ct.sh(f"journalctl -u {unit} -n 20 --no-pager", check=False).stdout
        repo = Path(__file__).resolve().parents[2]
        res = ct.peer(["env", f"PYTHONPATH={repo}", sys.executable, "-c", TURN_PROBE, secret,
                       nspawn.HOST_ADDR, str(janus_port)], timeout=60)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["expired"] == 401 and out["forged"] == 401, out
        assert out["relayed"] == nspawn.HOST_ADDR, out
        assert all(out[p] == 403 for p in ("127.0.0.1", "192.0.2.1", "10.0.0.1", "8.8.8.8")), out
        assert out["echo"] == [nspawn.HOST_ADDR, janus_port, "janus:media"], out
        assert ct.sh("cat /tmp/va-ops-ssh-udp.log 2>/dev/null || true").stdout == ""
        assert wait_for(lambda: "ssh-probe" not in ct.sh("cat /tmp/va-ops-ssh-udp.log", check=False).stdout
                        and re.search(r"counter packets [1-9]", ct.sh(
                            "nft list chain inet va_turn_egress turn").stdout), timeout=5)
        drops = ct.sh("nft list chain inet va_turn_egress turn").stdout
        assert re.search(r"counter packets [1-9]\d* bytes \d+ drop", drops), drops
    finally:
        ct.sh("systemctl stop va-ops-janus va-ops-ssh-udp", check=False)
    served = ct.sh(f"timeout 10 openssl s_client -connect {nspawn.HOST_ADDR}:5349 </dev/null 2>/dev/null"
                   " | openssl x509 -outform PEM", check=False).stdout
    assert served.strip() == provisioned.tls.cert_file.read_text().strip(), served[-800:]
    ct.sh("cat > /root/tls_probe.py", input=TLS_PROBE)

    def probe(version: str, ciphers: str) -> str:
        return ct.sh(f"python3 /root/tls_probe.py {nspawn.HOST_ADDR} 5349 {version} '{ciphers}'",
                     check=False).stdout.strip()

    # the probe itself works (an AEAD suite over TLS 1.2 is served) ...
    assert probe("TLSv1_2", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256").startswith(
        "accepted TLSv1.2"), "TLS 1.2 + AEAD refused"
    # ... and the server refuses TLS 1.1 and TLS 1.2 with CBC suites (an alert, a close, or no
    # ServerHello at all: coturn does not always answer a ClientHello it will not take)
    for version, ciphers in (("TLSv1_1", "DEFAULT"), ("TLSv1_2", "AES128-SHA"),
                             ("TLSv1_2", "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA")):
        got = probe(version, ciphers)
        assert got.startswith("refused"), (version, ciphers, got)
    conf = ct.sh("cat /etc/voice-appliance/coturn/turnserver.conf").stdout.splitlines()
    for line in ("use-auth-secret", "no-multicast-peers", "no-cli", "no-tcp-relay", "max-bps=64000",
                 "denied-peer-ip=0.0.0.0-255.255.255.255", f"allowed-peer-ip={nspawn.HOST_ADDR}"):
        assert line in conf, line


TLS_PROBE = r"""
import socket, ssl, sys
host, port, version, ciphers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
ctx.set_ciphers(ciphers + ":@SECLEVEL=0")  # the client offers what the server must refuse
ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
try:
    with socket.create_connection((host, port), timeout=5) as s, ctx.wrap_socket(s) as t:
        print("accepted", t.version(), t.cipher()[0])
except ssl.SSLError as e:
    # a reason raised on the client's side alone means the probe offered nothing: not a refusal
    local = any(r in str(e) for r in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE", "NO_CIPHER_MATCH"))
    print("probe-broken" if local else "refused", e)
except OSError as e:  # reset, EOF or no ServerHello within the timeout
    print("refused", type(e).__name__, e)
"""


PROM_QUERY = r"""
import json, sys, urllib.parse, urllib.request
q = urllib.parse.urlencode({"query": sys.argv[1]})
with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/query?" + q, timeout=5) as r:
    print(json.dumps(json.loads(r.read())["data"]["result"]))
"""


def test_monitoring_role_scrapes_the_appliance(provisioned) -> None:
    """The monitoring role: Prometheus + Alertmanager from Debian (loopback only), the shipped rules
    loaded, the appliance's /metrics scraped (its worker histograms included); converge + idempotence."""
    ct = provisioned.ct
    mon = Path(__file__).with_name("monitoring-playbook.yml")
    mon_vars = '{"monitoring_scrape_interval": "2s", "monitoring_evaluation_interval": "2s", ' \
               '"monitoring_apt_update_cache": false, "monitoring_redis_targets": ["127.0.0.1:9121"]}'
    first = provisioned.playbook("-e", mon_vars, playbook=mon)
    assert first.rc == 0, first.output[-4000:]
    second = provisioned.playbook("-e", mon_vars, playbook=mon)
    assert second.rc == 0 and second.recap.get("changed") == 0, second.output[-3000:]
    for unit in ("prometheus", "prometheus-alertmanager"):
        assert ct.sh(f"systemctl is-active {unit}", check=False).stdout.strip() == "active", unit
    ct.sh("cat > /root/prom_query.py", input=PROM_QUERY)

    def query(q: str) -> list:
        out = ct.sh(f"python3 /root/prom_query.py '{q}'", check=False).stdout.strip()
        return json.loads(out) if out.startswith("[") else []

    up = wait_for(lambda: query('up{job="voice-appliance"} == 1'), timeout=60)
    assert up, query("up")
    assert wait_for(lambda: query("va_turn_e2e_seconds_count"), timeout=30)
    # the redis role's exporter (Debian's prometheus-redis-exporter) reaches the box's Redis
    assert wait_for(lambda: query('redis_up{job="redis"} == 1'), timeout=30), query('up{job="redis"}')
    # the appliance's own probes of coturn and Janus (appliance/probes.py)
    for component in ("turn", "janus"):
        assert wait_for(lambda c=component: query(f'va_component_up{{component="{c}"}} == 1'), timeout=30), \
            (component, query("va_component_up"))
    rules = ct.sh("python3 -c \"import urllib.request as u; print(u.urlopen("
                  "'http://127.0.0.1:9090/api/v1/rules', timeout=5).read().decode())\"").stdout
    assert "VaCallMosLow" in rules and "VaWorkerRestarted" in rules
    assert tcp_probe(provisioned, nspawn.HOST_ADDR, 9090) != "open"  # not reachable from outside
    assert tcp_probe(provisioned, nspawn.HOST_ADDR, 9093) != "open"
    assert tcp_probe(provisioned, nspawn.HOST_ADDR, 9121) != "open"  # the Redis exporter: loopback only
