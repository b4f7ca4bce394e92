"""The playbook on a booted Debian 12 (systemd-nspawn): converge, idempotence, then the host as users see it.

One container per session (``provisioned`` in conftest): site.yml runs twice against it through the
nsenter connection, then each test inspects one promise of the appliance host. Network checks run from
the peer namespace on the other end of the container's veth, i.e. from "the Internet".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
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


def http_get_from_peer(host, url: str, timeout: float = 5.0) -> tuple[int, str]:
    code = (
        "import urllib.request,urllib.error\n"
        f"try:\n r=urllib.request.urlopen({url!r}, timeout={timeout!r})\n"
        " print(r.status); print(r.read().decode()[:500])\n"
        "except urllib.error.HTTPError as e: print(e.code); print(e.read().decode()[:500])\n"
    )
    out = host.ct.peer(["python3", "-c", code], timeout=timeout + 10).stdout
    status, _, body = out.partition("\n")
    return int(status), body


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
    """The API listens unprivileged on 8443; nftables redirects public 443 to it."""
    ct = provisioned.ct
    ok = wait_for(
        lambda: (
            ct.sh(
                'python3 -c "import urllib.request as u; print(u.urlopen('
                "'http://127.0.0.1:8443/readyz', timeout=3).status)\"",
                check=False,
            ).stdout.strip()
            == "200"
        ),
        timeout=90,
    )
    assert ok, ct.sh("journalctl -u voice-appliance -n 60 --no-pager", check=False).stdout
    status, body = http_get_from_peer(provisioned, f"http://{nspawn.HOST_ADDR}:443/readyz")
    assert status == 200, body
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
    assert effective["permitrootlogin"] == "without-password"
    assert effective["x11forwarding"] == "no" and effective["allowtcpforwarding"] == "no"
    assert effective["maxauthtries"] == "3"


def test_secrets_not_world_readable(provisioned) -> None:
    ct = provisioned.ct
    listing = ct.sh(
        "stat -c '%a %U %G %n' /etc/voice-appliance/credentials /etc/voice-appliance/credentials/* "
        "/etc/voice-appliance/janus /etc/voice-appliance/janus/*.jcfg /etc/voice-appliance/coturn "
        "/etc/voice-appliance/coturn/turnserver.conf /etc/voice-appliance/coturn/turn.key "
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
    lb = Path(__file__).with_name("lb-playbook.yml")
    lb_vars = (
        '{"loadbalancer_backends": ["127.0.0.1"], "loadbalancer_frontend_port": 8444, '
        '"loadbalancer_backend_port": 8443, "loadbalancer_backend_tls": false, '
        '"loadbalancer_agent_interval": "1s", "loadbalancer_apt_update_cache": false, '
        # This machine's hard file limit (20000) caps the container's; a real host allows the default.
        '"loadbalancer_maxconn": 4000}'
    )
    first = provisioned.playbook("-e", lb_vars, playbook=lb)
    assert first.rc == 0, first.output[-4000:]
    second = provisioned.playbook("-e", lb_vars, playbook=lb)
    assert second.rc == 0 and second.recap.get("changed") == 0, second.output[-3000:]
    ct.sh("cat > /root/haproxy_stat.py", input=HAPROXY_STAT)

    def stat() -> str:
        return ct.sh("python3 /root/haproxy_stat.py", check=False).stdout.strip()

    assert wait_for(lambda: stat().startswith("UP | via agent : up"), timeout=30), stat()
    url = "http://127.0.0.1:8444/readyz"  # through HAProxy
    got = ct.sh(f"python3 -c \"import urllib.request as u; print(u.urlopen('{url}', timeout=3).status)\"")
    assert got.stdout.strip() == "200"
    try:
        ct.sh("systemctl kill -s SIGUSR1 --kill-who=main voice-appliance")
        assert wait_for(lambda: stat().startswith("DRAIN"), timeout=20), stat()
    finally:
        ct.sh("systemctl kill -s SIGUSR2 --kill-who=main voice-appliance")
    assert wait_for(lambda: stat().startswith("UP"), timeout=30), stat()


def turn_credentials(secret: str, ttl: int) -> tuple[str, str]:
    """use-auth-secret credentials: user "<expiry>:<name>", password base64(HMAC-SHA1(secret, user))."""
    user = f"{int(time.time()) + ttl}:ops"
    return user, base64.b64encode(hmac.new(secret.encode(), user.encode(), hashlib.sha1).digest()).decode()


def test_turn_hmac_credentials_relay_and_tls(provisioned) -> None:
    """coturn relays with fresh HMAC credentials, refuses expired or forged ones, and serves TLS on 5349.

    The relay runs between two allocations on the box's own address, which lies in a denied range
    (192.0.2.0/24) but is the configured allowed peer: the exception for the co-located Janus works.
    """
    ct = provisioned.ct
    secret = provisioned.secrets["vault_turn_secret"]

    def uclient(user: str, password: str) -> str:
        target = f"-p 3478 {nspawn.HOST_ADDR}"
        cmd = f"timeout 30 turnutils_uclient -y -n 3 -c -u '{user}' -w '{password}' {target} 2>&1"
        return ct.sh(cmd, check=False, timeout=60).stdout

    good = uclient(*turn_credentials(secret, 600))
    assert "Total lost packets 0" in good and "tot_recv_msgs=6" in good, good[-1500:]
    for user, password in (turn_credentials(secret, -600), turn_credentials("forged", 600)):
        bad = uclient(user, password)
        assert "Cannot complete Allocation" in bad and "tot_recv_msgs" not in bad, bad[-1500:]
    tls = ct.sh(f"timeout 10 openssl s_client -connect {nspawn.HOST_ADDR}:5349 </dev/null 2>&1", check=False)
    assert "CN = ops-test.invalid" in tls.stdout, tls.stdout[-1500:]
    conf = ct.sh("cat /etc/voice-appliance/coturn/turnserver.conf").stdout
    for line in ("use-auth-secret", "no-multicast-peers", "no-cli", "denied-peer-ip=10.0.0.0-10.255.255.255",
                 f"allowed-peer-ip={nspawn.HOST_ADDR}", "user-quota=", "total-quota="):  # fmt: skip
        assert line in conf, line
