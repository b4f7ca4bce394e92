"""The load balancers as shipped (loadbalancer role's templates) in front of 3 real boxes.

One fleet for the whole module (tests/harness/fleet.py). Order matters only for the last test, which
kills the active HAProxy and starts it again. Figures printed here are copied into docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import subprocess
import time
import warnings

import pytest

from tests.fleet.conftest import calls, lb_client, wait_idle, wait_until
from tests.harness.audio import speech
from tests.harness.fleet import LB_PORT, Fleet
from tests.supervisor.rtc import RATE
from tests.supervisor.test_voice_loop import say_and_hear

pytestmark = [pytest.mark.fleet, pytest.mark.slow, pytest.mark.timeout(400)]


def _handshake(fleet: Fleet, **kw: object) -> str:
    """TLS handshake with the virtual IP; returns the negotiated version or raises ssl.SSLError."""
    ctx = ssl.create_default_context(cafile=str(fleet.site_ca))
    ctx.check_hostname = False
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    if "max_version" in kw:
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point of the test
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = kw["max_version"]  # type: ignore[assignment]
    if "ciphers" in kw:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(str(kw["ciphers"]) + ":@SECLEVEL=0")
    with socket.create_connection((fleet.vip, LB_PORT), 5) as raw, ctx.wrap_socket(raw) as tls:
        return f"{tls.version()} {tls.cipher()[0]}"


def test_tls_policy_and_http2(fleet: Fleet) -> None:
    """TLS ≥ 1.2 with AEAD ciphers only; HTTP/2 and HTTP/1.1 both served (ALPN)."""
    assert _handshake(fleet).startswith("TLSv1.3")
    assert _handshake(fleet, ciphers="ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256").startswith(
        "TLSv1.2")
    with pytest.raises(ssl.SSLError):
        _handshake(fleet, max_version=ssl.TLSVersion.TLSv1_1)
    for cbc in ("ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256", "AES128-SHA:AES256-SHA256"):
        with pytest.raises(ssl.SSLError):
            _handshake(fleet, ciphers=cbc)
    for flag, want in (("--http2", "2"), ("--http1.1", "1.1")):
        out = subprocess.run(["curl", "-sS", flag, "--cacert", str(fleet.site_ca), "-o", "/dev/null",
                              "-w", "%{http_version} %{http_code}", f"{fleet.url}/readyz"],
                             capture_output=True, text=True, timeout=20)
        assert out.stdout == f"{want} 200", out.stdout + out.stderr


async def test_new_calls_balanced_by_free_capacity(fleet: Fleet) -> None:
    """6 calls on 3 boxes with 2 slots each: every box takes 2 (weights follow free capacity); the 7th
    gets 503."""
    await wait_idle(fleet)
    async with lb_client(fleet) as http, calls(fleet, http, 7, "bal") as cs:
        for c in cs[:6]:
            await c.open()
            await asyncio.sleep(1.2)  # the agent check (500 ms) lowers this box's weight
        per_box = collections.Counter(c.sid.split(".")[0] for c in cs[:6])
        agents = [b.agent() for b in fleet.boxes]
        print(f"calls per box: {dict(per_box)}; agents: {agents}")
        assert sorted(per_box) == sorted(b.box_id for b in fleet.boxes) and set(per_box.values()) == {2}
        assert agents == ["up 0%"] * 3, agents
        r = await cs[6].open(expect=503)  # HAProxy: no box has room; JSON + Retry-After like a box
        assert r.headers.get("retry-after") == "5" and r.json()["error"] == "unavailable", r.text
        for c in cs[:6]:
            await c.wait_live()


async def test_session_requests_reach_the_owner_and_foreign_ids_get_404(fleet: Fleet) -> None:
    """GET, trickle and DELETE through the LB always reach the box named in the id; a foreign or unknown
    box id gets a clear 404 (never a silent drop)."""
    await wait_idle(fleet)
    async with lb_client(fleet) as http, calls(fleet, http, 1, "route") as (c,):
        await c.open()
        owner, rand = c.sid.split(".", 1)
        before = {r["svname"]: int(r["stot"]) for r in fleet.active_lb().stat()}
        for _ in range(10):
            r = await c.info()
            assert r.status_code == 200 and r.json()["session_id"] == c.sid, r.text
        cand = {"candidate": "candidate:1 1 udp 2122260223 10.214.0.1 50000 typ host", "sdpMid": "0",
                "sdpMLineIndex": 0}
        r = await http.post(f"/v1/sessions/{c.sid}/ice", headers=c.auth, json=cand)
        assert r.status_code == 204, r.text
        after = {r["svname"]: int(r["stot"]) for r in fleet.active_lb().stat()}
        grew = {name: after[name] - before[name] for name in after}
        assert grew[owner] >= 11 and all(v == 0 for k, v in grew.items() if k != owner), grew
        other = next(b.box_id for b in fleet.boxes if b.box_id != owner)
        for path in (f"/v1/sessions/{other}.{rand}", f"/v1/sessions/nosuchbox.{rand}",
                     f"/v1/sessions/{other}.{rand}/ice"):
            method = http.post if path.endswith("/ice") else http.get
            r = await (method(path, headers=c.auth, json=cand) if method is http.post
                       else method(path, headers=c.auth))
            assert r.status_code == 404 and r.json()["error"] == "not_found", (path, r.text)
        r = await http.delete(f"/v1/sessions/{c.sid}", headers=c.auth)
        assert r.status_code == 204, r.text
        assert (await c.info()).status_code == 404
        c.sid = ""


async def test_rate_limits_see_the_callers_real_ip(fleet: Fleet) -> None:
    """Two callers behind the LB (two source addresses) get separate rate-limit buckets."""
    await wait_idle(fleet)
    a, b = f"{fleet.subnet}201", f"{fleet.subnet}202"
    for ip in (a, b):
        fleet.add_client_address(ip)
    try:
        async with lb_client(fleet, local_address=a) as ha, lb_client(fleet, local_address=b) as hb:
            statuses = [(await ha.post("/v1/sessions", json={})).status_code for _ in range(21)]
            # 20 refused credentials per minute per IP (limits.auth_failures_per_minute in the harness)
            assert statuses[:20] == [401] * 20 and statuses[20] == 429, statuses
            r = await hb.post("/v1/sessions", json={})
            assert r.status_code == 401, f"caller B shares caller A's bucket: {r.status_code} {r.text}"
    finally:
        for ip in (a, b):
            fleet.del_client_address(ip)


async def test_active_haproxy_killed_vip_moves_live_calls_unaffected(fleet: Fleet) -> None:
    """kill -9 the active HAProxy: keepalived moves the virtual IP to the peer, new calls succeed there,
    and live calls do not notice (media never goes through the LB)."""
    await wait_idle(fleet)
    active = fleet.active_lb()
    assert active is not None
    standby = next(lb for lb in fleet.lbs if lb is not active)
    phrase = speech("seven green apples on the table", RATE)
    async with lb_client(fleet) as http, calls(fleet, http, 3, "lbf") as cs:
        for c in cs[:2]:
            await c.open()
            await asyncio.sleep(0.6)
        for c in cs[:2]:
            await c.wait_live()
        t_kill = time.time()
        await asyncio.to_thread(active.host.stop, "haproxy", 9)
        t0 = time.monotonic()
        await wait_until(lambda: asyncio.to_thread(standby.has_vip, fleet.vip), limit=15, step=0.05,
                         what="VIP on the standby")
        vip_moved = time.monotonic() - t0

        async def api_answers() -> bool:
            try:
                async with lb_client(fleet) as fresh:
                    return (await fresh.get("/readyz", timeout=2)).status_code == 200
            except Exception:
                return False

        await wait_until(api_answers, limit=15, step=0.05, what="API through the VIP again")
        api_back = time.monotonic() - t0
        print(f"LB failover: VIP moved in {vip_moved:.2f} s, API answered again after {api_back:.2f} s")
        async with lb_client(fleet) as fresh:
            cs[2].http = fresh
            await cs[2].open()
            await cs[2].wait_live()
            cs[2].http = http
        t_end = time.time()
        for c in cs[:2]:
            gap = c.max_rx_gap(t_kill, t_end)
            assert gap < 0.5, f"live call {c.sid} lost audio for {gap:.2f} s during the LB failover"
            async with lb_client(fleet) as fresh:  # its signalling works through the new LB
                assert (await fresh.get(f"/v1/sessions/{c.sid}", headers=c.auth)).status_code == 200
        corr, _ = await say_and_hear(cs[0].track, cs[0].rec, phrase)
        assert corr > 0.5, f"no echo after the failover (corr {corr:.2f})"
        print(f"live calls' longest audio gap during failover: "
              f"{max(c.max_rx_gap(t_kill, t_end) for c in cs[:2]) * 1000:.0f} ms")
    active.restart_haproxy()
    await wait_until(lambda: fleet.active_lb() is not None and all(lb.haproxy_alive for lb in fleet.lbs),
                     limit=20, what="both LBs back")
