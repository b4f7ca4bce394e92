"""Caller-leg quality under impairment: a real aiortc caller → Janus (NoSIP, in its netns, with the
sample event handler posting media statistics to the supervisor) → media worker → back. Exported MOS,
loss and jitter (the supervisor's /metrics histograms, one sample per call per 2 s window) must move the
right way and match what was injected: 0 / 3 / 10 % loss both ways, 0 / 30 / 80 ms jitter on the
caller's uplink.

Why not ``tc netem``: this kernel has no sch_netem ("Specified qdisc kind is unknown", no modules to
load), so the impairment sits in the caller's own network path instead, netem's model reproduced:
outgoing SRTP packets are dropped with probability p or delayed uniformly in [10 ms, 10 ms + 2J]
(reordering allowed, like netem's ``delay D J``); incoming SRTP packets are dropped with probability p.
RTCP is left alone, so RTT and the receiver reports stay exact. Janus measures the uplink itself
(``lost``, ``jitter-local``) and the caller's receiver reports tell it the downlink (``lost-by-remote``).

Tolerances (why): loss over ~500 packets per phase and direction: ±(1.5 % + 30 % of the injected value)
(binomial spread plus window edges). Jitter: two uniform draws on a 2J-wide interval differ by 2J/3 on
average, which the RFC 3550 estimator converges to, so the exported uplink value must lie in
0.4..1.2 x J. MOS: clean >= 4.2; each impaired phase lower; 10 % / 80 ms below 3.6.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import urllib.request

import httpx
import pytest

from tests.harness.emulator import start_emulator
from tests.harness.janus import janus_available, janus_in_netns
from tests.harness.redis import free_port
from tests.supervisor.conftest import open_call, start_supervisor, stop_supervisor, wait_until
from tests.supervisor.rtc import caller

pytestmark = [pytest.mark.janus, pytest.mark.slow]

PERIOD = 2  # janus.stats_period_seconds: Janus's stats events and the sampler's window
PHASES = [(0.0, 0), (0.03, 30), (0.10, 80)]  # (loss ratio, netem jitter ms)


def metric_sums(port: int) -> dict[str, float]:
    """``name{labels}`` → value of every va_call_mos / va_rtp_* / va_rtt_* _sum and _count series."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(va_(?:call_mos|rtp_loss_ratio|rtp_jitter_seconds|rtt_seconds)_(?:sum|count))"
                     r"(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            pairs = [p for p in re.findall(r'\w+="[^"]*"', m.group(2) or "") if not p.startswith("shard=")]
            key = m.group(1) + ("{" + ",".join(pairs) + "}" if pairs else "")
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def mean(after: dict[str, float], before: dict[str, float], name: str, labels: str = "") -> float | None:
    n = after.get(f"{name}_count{labels}", 0) - before.get(f"{name}_count{labels}", 0)
    s = after.get(f"{name}_sum{labels}", 0) - before.get(f"{name}_sum{labels}", 0)
    return s / n if n > 0 else None


class Impairment:
    """netem's loss/delay model on the caller's SRTP packets (see the module docstring)."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.jitter_ms = 0
        self.rng = random.Random(7)
        self.sent = self.dropped_up = self.dropped_down = 0

    def set(self, loss: float, jitter_ms: int) -> None:
        self.loss, self.jitter_ms = loss, jitter_ms


@pytest.fixture
def impair(monkeypatch: pytest.MonkeyPatch) -> Impairment:
    from aiortc.rtcdtlstransport import RTCDtlsTransport
    from aiortc.rtp import is_rtcp

    imp = Impairment()
    orig_send, orig_recv = RTCDtlsTransport._send_rtp, RTCDtlsTransport._handle_rtp_data
    pending: set[asyncio.Task] = set()

    async def send_rtp(self, data: bytes) -> None:
        if is_rtcp(data) or not (imp.loss or imp.jitter_ms):
            return await orig_send(self, data)
        imp.sent += 1
        if imp.rng.random() < imp.loss:
            imp.dropped_up += 1
            return None
        if not imp.jitter_ms:
            return await orig_send(self, data)
        delay = (10 + imp.rng.uniform(0, 2 * imp.jitter_ms)) / 1000

        async def later() -> None:
            await asyncio.sleep(delay)
            with contextlib.suppress(ConnectionError):
                await orig_send(self, data)

        t = asyncio.ensure_future(later())
        pending.add(t)
        t.add_done_callback(pending.discard)
        return None

    async def handle_rtp(self, data: bytes, arrival_time_ms: int) -> None:
        if imp.loss and imp.rng.random() < imp.loss:
            imp.dropped_down += 1
            return None
        return await orig_recv(self, data, arrival_time_ms)

    monkeypatch.setattr(RTCDtlsTransport, "_send_rtp", send_rtp)
    monkeypatch.setattr(RTCDtlsTransport, "_handle_rtp_data", handle_rtp)
    return imp


@pytest.fixture
def quality_rig(tmp_path, redis_srv):
    if not janus_available():
        pytest.skip("janus or network namespaces not available")
    events_port = free_port()
    with janus_in_netns(events_port=events_port, stats_period=PERIOD) as janus, \
            start_emulator(tmp_path / "emu", reply="echo") as emu:
        sp = start_supervisor(tmp_path / "sup", redis_srv.url, janus, extra={
            "janus": {"events_host": janus.host_ip, "events_port": events_port,
                      "stats_period_seconds": PERIOD},
            "model": {"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file,
                      "max_retries": 5},
        })
        try:
            yield sp, janus
        finally:
            stop_supervisor(sp)


async def test_mos_loss_jitter_follow_impairment(quality_rig, impair, sub):
    sup, _janus = quality_rig
    auth = {"Authorization": f"Bearer {sup.token(sub)}"}
    pc, _track, _rec = await caller()
    results = []
    try:
        async with httpx.AsyncClient(base_url=sup.api, timeout=30) as http:
            sid = await open_call(http, auth, pc, sup)

            async def has_quality() -> bool:
                info = (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()
                return "quality" in info["details"]

            await wait_until(has_quality, limit=30, what="details.quality in GET /v1/sessions/{id}")
            for loss, jitter in PHASES:
                impair.set(loss, jitter)
                await asyncio.sleep(2 * PERIOD + 1)  # windows that straddle the change are not measured
                before = metric_sums(sup.metrics_port)
                await asyncio.sleep(10 * PERIOD)
                after = metric_sums(sup.metrics_port)
                row = {
                    "loss": loss, "jitter_ms": jitter,
                    "mos": mean(after, before, "va_call_mos"),
                    "loss_up": mean(after, before, "va_rtp_loss_ratio", '{direction="uplink"}'),
                    "loss_down": mean(after, before, "va_rtp_loss_ratio", '{direction="downlink"}'),
                    "jitter_up": mean(after, before, "va_rtp_jitter_seconds", '{direction="uplink"}'),
                    "jitter_down": mean(after, before, "va_rtp_jitter_seconds", '{direction="downlink"}'),
                    "rtt": mean(after, before, "va_rtt_seconds"),
                }
                results.append(row)
                print(row)
            info = (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()
            q = info["details"]["quality"]
            assert set(q) >= {"mos", "loss_up_ratio", "loss_down_ratio", "jitter_up_seconds", "rtt_seconds"}
    finally:
        await pc.close()
    for row in results:
        assert row["mos"] is not None, (row, sup.log_tail())
        for key in ("loss_up", "loss_down"):
            tol = 0.015 + 0.3 * row["loss"]
            assert abs(row[key] - row["loss"]) <= tol, (key, row)
        if row["jitter_ms"]:
            j = row["jitter_up"] * 1000
            assert 0.4 * row["jitter_ms"] <= j <= 1.2 * row["jitter_ms"], row
        else:
            assert row["jitter_up"] < 0.010, row
    clean, mid, bad = results
    assert clean["mos"] >= 4.2, clean
    assert clean["mos"] > mid["mos"] > bad["mos"], results
    assert bad["mos"] < 3.6, bad
