"""coturn's lockdown against a real turnserver: a TURN allocation reaches Janus and nothing else.

The "box" is a network namespace (tests.harness.janus.netns_pair; its veth address stands in for the
box's public IP, plus a documentation-range IPv6 address 2001:db8:213:<subnet>::2/64 of our own) running
coturn as Debian's ``turnserver`` user with the peer policy rendered from the Ansible role, and the
hardening role's nftables ruleset including the coturn role's egress table. The caller is in the root
namespace. Relays to 127.0.0.1:22, the box's own public IP:22, a private (LAN) address and IPv6
addresses are refused; a TCP relay is refused; relaying to the Janus address and ICE port works both ways.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.emulator.certs import ensure_certs
from appliance.tls import AEAD_CIPHERS
from appliance.turn import credential, peer_policy_lines, turn_user
from tests.harness.coturn import coturn_server
from tests.harness.janus import netns_pair, run_in_netns
from tests.harness.roles import render
from tests.harness.turnclient import TCP, TurnClient, TurnError

SECRET = "policy-test-secret"
JANUS_PORT = 20011  # inside coturn_janus_ice_port_range (20000-29999)
POLICY_KEYS = ("no-tcp-relay", "no-multicast-peers", "max-bps", "denied-peer-ip", "allowed-peer-ip")


def _policy(conf: str) -> list[str]:
    return [ln for ln in conf.splitlines() if ln.split("=")[0] in POLICY_KEYS]


def test_role_and_dev_runner_share_one_policy():
    conf = render("coturn", "turnserver.conf.j2", coturn_static_auth_secret="x", coturn_realm="r",
                  coturn_janus_addresses=["203.0.113.7", "2001:db8::7"])
    assert sorted(_policy(conf)) == sorted(peer_policy_lines(["203.0.113.7", "2001:db8::7"]))
    assert "max-bps=64000" in conf and "no-tcp-relay" in conf
    with pytest.raises(ValueError):
        peer_policy_lines(["10.0.0.0/8"])  # one address each, never a range
    # turns:5349 has the session API's TLS policy
    assert f'cipher-list="{AEAD_CIPHERS}"' in conf and "no-tlsv1_1" in conf


def test_turn_user_is_a_stable_keyed_hash_of_sub():
    a, b = turn_user(SECRET, "alice@example.com"), turn_user(SECRET, "bob")
    assert a == turn_user(SECRET, "alice@example.com") and a != b
    assert a != turn_user("other-secret", "alice@example.com")
    assert "alice" not in a and ":" not in a and re.fullmatch(r"u_[A-Za-z0-9_-]{22}", a)


class _Listener:
    """A UDP socket in a namespace that records what arrives (and echoes it back when asked to)."""

    def __init__(self, netns: str | None, ip: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET

        def make() -> socket.socket:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((ip, port))
            s.setblocking(False)
            return s

        self.sock = run_in_netns(netns, make) if netns else make()

    def drain(self, echo: bool = False) -> list[bytes]:
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                data, addr = self.sock.recvfrom(65535)
                got.append(data)
                if echo:
                    self.sock.sendto(b"janus:" + data, addr)
        return got


def _ip(*args: str, netns: str | None = None) -> None:
    subprocess.run(["ip", *(["-n", netns] if netns else []), *args], check=True, capture_output=True)


@contextlib.contextmanager
def _box(tmp: Path) -> Iterator[dict]:
    with netns_pair(prefix="va-tp") as pair:
        c, d = (int(x) for x in pair.ns_ip.split(".")[2:])
        v6 = f"2001:db8:213:{c:02x}{d:02x}::"
        _ip("-6", "addr", "add", f"{v6}1/64", "dev", pair.host_if, "nodad")
        _ip("-6", "addr", "add", f"{v6}2/64", "dev", pair.ns_if, "nodad", netns=pair.name)
        egress = tmp / "nftables.d"
        egress.mkdir()
        (egress / "60-turn-egress.nft").write_text(
            render("coturn", "turn-egress.nft.j2", coturn_janus_addresses=[pair.ns_ip]))
        ruleset = tmp / "nftables.conf"
        ruleset.write_text(render("hardening", "nftables.conf.j2", hardening_public_ip=pair.ns_ip,
                                  hardening_nftables_include_dir=str(egress)))
        subprocess.run(["ip", "netns", "exec", pair.name, "nft", "-f", str(ruleset)], check=True,
                       capture_output=True)
        conf = render("coturn", "turnserver.conf.j2", coturn_static_auth_secret=SECRET,
                      coturn_realm="policy.test", coturn_janus_addresses=[pair.ns_ip])
        args = [f"--{ln}" for ln in _policy(conf)]
        with coturn_server(tmp / "turn", SECRET, listen_ip=pair.ns_ip, netns=pair.name, port=3478,
                           relay_ports=(49152, 65535), allow_loopback_peers=False, verbose=True,
                           extra_args=[*args, "--user-quota=2"], relay_ips=[f"{v6}2"],
                           run_as="turnserver") as turn:
            yield {"pair": pair, "v6": v6, "turn": turn}


def _client(box: dict, user: str = "alice") -> TurnClient:
    cred = credential(SECRET, turn_user(SECRET, user), 600)
    return TurnClient((box["pair"].ns_ip, 3478), cred.username, cred.password)


def _egress_drops(netns: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "chain", "inet", "va_turn_egress",
                          "turn"], check=True, capture_output=True, text=True).stdout
    m = re.search(r"counter packets (\d+) bytes \d+ drop", out)
    assert m, out
    return int(m.group(1))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_relay_reaches_janus_and_nothing_else(tmp_path):
    with _box(tmp_path) as box:
        pair, v6, ns = box["pair"], box["v6"], box["pair"].name
        janus = _Listener(ns, pair.ns_ip, JANUS_PORT)
        forbidden = {
            "box loopback :22": _Listener(ns, "127.0.0.1", 22),
            "box public IP :22": _Listener(ns, pair.ns_ip, 22),
            "LAN peer": _Listener(None, pair.host_ip, JANUS_PORT),
            "IPv6 peer": _Listener(None, f"{v6}1", JANUS_PORT),
            "box IPv6": _Listener(ns, f"{v6}2", JANUS_PORT),
        }
        c = _client(box)
        try:
            relayed = c.allocate()
            assert relayed[0] == pair.ns_ip
            # coturn's own policy: every address but Janus's is a 403 Forbidden IP
            for peer in ("127.0.0.1", pair.host_ip, "192.168.1.1", "8.8.8.8"):
                with pytest.raises(TurnError) as err:
                    c.create_permission(peer)
                assert err.value.code == 403, (peer, err.value)
            # Janus's address is allowed, so only the nftables egress rule stands between a relay and SSH
            c.create_permission(pair.ns_ip)
            c.send(pair.ns_ip, JANUS_PORT, b"media")
            deadline = time.monotonic() + 3
            got: list[bytes] = []
            while not got and time.monotonic() < deadline:
                got = janus.drain(echo=True)
                time.sleep(0.02)
            assert got == [b"media"]
            peer, data = c.receive()  # Janus's answer comes back through the relay
            assert peer == (pair.ns_ip, JANUS_PORT) and data == b"janus:media"
            drops = _egress_drops(ns)
            c.send(pair.ns_ip, 22, b"ssh-probe")
            c.send("127.0.0.1", 22, b"loopback-probe")  # no permission: coturn drops it itself
            c.send(pair.host_ip, JANUS_PORT, b"lan-probe")
            deadline = time.monotonic() + 3
            while _egress_drops(ns) == drops and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _egress_drops(ns) == drops + 1  # the :22 datagram, dropped by the firewall
        finally:
            c.close()

        # IPv6: a v6 relay gets no peer at all (neither a remote v6 host nor the box's own v6 address)
        c6 = _client(box, "bob")
        try:
            # compare as addresses: coturn prints the canonical form (":546:", not ":0546:")
            assert ipaddress.ip_address(c6.allocate(family=6)[0]) == ipaddress.ip_address(f"{v6}2")
            for peer in (f"{v6}1", f"{v6}2", "::1", "2001:4860:4860::8888"):
                with pytest.raises(TurnError) as err:
                    c6.create_permission(peer)
                assert err.value.code == 403, (peer, err.value)
        finally:
            c6.close()

        # no TCP relay (RFC 6062) at all
        ct = _client(box, "carol")
        try:
            with pytest.raises(TurnError) as err:
                ct.allocate(transport=TCP)
            assert err.value.code == 442, err.value
        finally:
            ct.close()

        time.sleep(0.2)
        for name, listener in forbidden.items():
            assert listener.drain() == [], f"{name} received relayed data"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_user_quota_binds_per_caller(tmp_path):
    """The TURN user is per caller, so user-quota (2 here) limits one caller, whatever credentials it gets."""
    with _box(tmp_path) as box:
        clients = [_client(box, "dave") for _ in range(3)]
        other = _client(box, "erin")
        try:
            clients[0].allocate()
            time.sleep(1.1)  # a fresh credential (another expiry second): same caller, same quota
            clients[1].password = credential(SECRET, turn_user(SECRET, "dave"), 600).password
            clients[1].username = credential(SECRET, turn_user(SECRET, "dave"), 600).username
            clients[1].allocate()
            with pytest.raises(TurnError) as err:
                clients[2].allocate()
            assert err.value.code == 486, err.value  # Allocation Quota Reached
            other.allocate()  # another caller is not affected
        finally:
            for c in (*clients, other):
                c.close()


def test_certificate_reload_keeps_relays(tmp_path):
    """coturn reloads its TLS certificate on SIGUSR2 (our unit's ExecReload): 5349 serves the new one, and an
    allocation made before keeps relaying (a renewal drops no relayed call)."""
    first = ensure_certs(tmp_path / "ca1", ["127.0.0.1"])
    second = ensure_certs(tmp_path / "ca2", ["127.0.0.1"])
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first.cert_file, live / "cert.pem")
    shutil.copy(first.key_file, live / "key.pem")

    def served(port: int) -> str:
        out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}"], input="",
                             capture_output=True, text=True, timeout=10).stdout
        return out[out.index("-----BEGIN CERTIFICATE-----"):out.index("-----END CERTIFICATE-----")]

    tls = (str(live / "cert.pem"), str(live / "key.pem"))
    with coturn_server(tmp_path / "turn", SECRET, tls=tls) as turn:
        peer = _Listener(None, "127.0.0.1", 0)
        peer_port = peer.sock.getsockname()[1]
        cred = credential(SECRET, turn_user(SECRET, "frank"), 600)
        c = TurnClient(("127.0.0.1", turn.port), cred.username, cred.password)
        try:
            c.allocate()
            c.create_permission("127.0.0.1")
            assert served(turn.tls_port) in first.cert_file.read_text()
            shutil.copy(second.key_file, live / "key.pem")
            shutil.copy(second.cert_file, live / "cert.pem")
            assert turn.proc is not None
            turn.proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 5
            while served(turn.tls_port) not in second.cert_file.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert served(turn.tls_port) in second.cert_file.read_text()
            assert turn.proc.poll() is None
            c.send("127.0.0.1", peer_port, b"after-reload")  # the old allocation still relays
            deadline = time.monotonic() + 3
            got: list[bytes] = []
            while not got and time.monotonic() < deadline:
                got = peer.drain()
                time.sleep(0.02)
            assert got == [b"after-reload"]
        finally:
            c.close()
