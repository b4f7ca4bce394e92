"""Fixtures for the fleet tests: one running fleet per test module (tests/harness/fleet.py) and callers
that reach it through the load balancers' virtual IP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.harness.fleet import Fleet, fleet_available, running_fleet
from tests.supervisor.rtc import caller

pytestmark = [pytest.mark.fleet]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not fleet_available():
        pytest.skip("needs root, janus, haproxy, keepalived, redis-sentinel, coturn")
    with running_fleet(tmp_path_factory.mktemp("fleet")) as f:
        yield f


def lb_client(fleet: Fleet, local_address: str | None = None, http2: bool = False) -> httpx.AsyncClient:
    """An HTTPS client of the fleet's virtual IP (trusting the site CA), optionally from a given source IP."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(fleet.site_ca))
    transport = httpx.AsyncHTTPTransport(verify=ctx, local_address=local_address, retries=0)
    return httpx.AsyncClient(base_url=fleet.url, transport=transport, timeout=30)


async def wait_until(pred: Any, limit: float = 20.0, step: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError(f"{what} not met within {limit} s")


async def wait_idle(fleet: Fleet, limit: float = 60) -> None:
    """Wait until every box is empty and both HAProxies see full weights (a test's calls are gone; a
    force-migrated leg may stay up to api.migrate_grace_seconds, 30 s)."""
    def idle() -> bool:
        if any(not b.agent().endswith("up 100%") for b in fleet.boxes):  # "ready up 100%" after an undrain
            return False
        return all(r["status"] == "UP" and r["weight"] == "100" for lb in fleet.lbs if lb.haproxy_alive
                   for r in lb.stat())

    try:
        await wait_until(idle, limit=limit, step=0.2, what="fleet idle (all boxes empty, full weight)")
    except AssertionError as exc:
        state = {b.box_id: b.agent() for b in fleet.boxes}, [
            (lb.host.name, r["svname"], r["status"], r["weight"]) for lb in fleet.lbs if lb.haproxy_alive
            for r in lb.stat()]
        raise AssertionError(f"{exc}: agents and HAProxy servers {state}") from None


class Call:
    """One aiortc caller talking to the fleet through the virtual IP."""

    def __init__(self, fleet: Fleet, http: httpx.AsyncClient, sub: str) -> None:
        self.fleet, self.http = fleet, http
        self.auth = {"Authorization": f"Bearer {fleet.token(sub)}"}
        self.pc: Any = None
        self.track: Any = None
        self.rec: Any = None
        self.sid = ""
        self.resume_token = ""
        self.created: dict[str, Any] = {}

    async def open(self, resume_token: str | None = None, expect: int = 201) -> httpx.Response:
        from aiortc import RTCSessionDescription

        if self.pc is not None:
            await self.close_media()
        self.pc, self.track, self.rec = await caller()
        body: dict[str, Any] = {"type": "offer", "sdp": self.pc.localDescription.sdp}
        if resume_token:
            body["resume_token"] = resume_token
        r = await self.http.post("/v1/sessions", headers=self.auth, json=body)
        assert r.status_code == expect, (r.status_code, r.text)
        if r.status_code == 201:
            self.created = r.json()
            self.sid, self.resume_token = self.created["session_id"], self.created.get("resume_token", "")
            await self.pc.setRemoteDescription(RTCSessionDescription(self.created["sdp"], "answer"))
        return r

    async def info(self) -> httpx.Response:
        return await self.http.get(f"/v1/sessions/{self.sid}", headers=self.auth)

    async def wait_live(self, limit: float = 40) -> None:
        async def live() -> bool:
            r = await self.info()
            if r.status_code != 200:
                return False
            info = r.json()
            return info["state"] == "active" and info["details"].get("model_state") == "live"

        await wait_until(live, limit=limit, step=0.25, what=f"{self.sid} active with the model live")

    def max_rx_gap(self, since: float, until: float) -> float:
        """Longest gap (s) between received audio frames in [since, until] (media continuity)."""
        ts = [t for t, _ in self.rec.chunks if since <= t <= until]
        if len(ts) < 2:
            return float("inf")
        return max(b - a for a, b in zip([since, *ts], [*ts, until], strict=True))

    async def close_media(self) -> None:
        if self.rec is not None:
            await self.rec.stop()
        if self.pc is not None:
            await self.pc.close()
        self.pc = None

    async def hangup(self) -> None:
        if self.sid:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(f"/v1/sessions/{self.sid}", headers=self.auth)
        await self.close_media()


@contextlib.asynccontextmanager
async def calls(fleet: Fleet, http: httpx.AsyncClient, n: int,
                prefix: str = "u") -> AsyncIterator[list[Call]]:
    out = [Call(fleet, http, f"{prefix}{i}") for i in range(n)]
    try:
        yield out
    finally:
        for c in out:
            await c.hangup()
