"""Health of the box's own Janus and coturn, as Prometheus gauges on the supervisor's /metrics.

Neither has an exporter to use: Debian 12's coturn 4.6.1 is built without libprom (``turnserver
--prometheus`` is an unrecognized option there) and Debian has no Janus exporter. Their event feeds do
not show liveness either (Janus's event handler is silent on an idle box). So the supervisor, which
depends on both, asks them every :data:`INTERVAL_S`: Janus its ``info`` endpoint (the same HTTP API the
sessions use), coturn a STUN Binding request on its UDP listener (RFC 5389 §6: what a caller's browser
sends first; coturn answers it without credentials). Redis has Debian's prometheus-redis-exporter
(the redis role), so it is not probed here.

``va_component_up{component}`` is 1 while the last probe answered, ``va_component_probe_seconds`` the
round trip of the last answered one; ``component`` is ``janus`` or ``turn`` (a fixed set).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

log = logging.getLogger(__name__)

INTERVAL_S = 10.0
TIMEOUT_S = 2.0
STUN_MAGIC = 0x2112A442
STUN_BINDING_REQUEST = 0x0001
STUN_BINDING_SUCCESS = 0x0101

UP = Gauge("va_component_up", "1 while the box's last probe of the component answered (janus: its info "
           "endpoint; turn: a STUN Binding request to coturn)", ["component"])
PROBE_SECONDS = Gauge("va_component_probe_seconds", "Round trip of the last answered probe of the component",
                      ["component"])


class _StunProtocol(asyncio.DatagramProtocol):
    def __init__(self, txn: bytes, answered: asyncio.Future[None]) -> None:
        self._txn, self._answered = txn, answered

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 20 or self._answered.done():
            return
        kind, _length, magic = struct.unpack_from("!HHI", data)
        if kind == STUN_BINDING_SUCCESS and magic == STUN_MAGIC and data[8:20] == self._txn:
            self._answered.set_result(None)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: nobody listens
        if not self._answered.done():
            self._answered.set_exception(exc)


async def stun_binding(host: str, port: int) -> float:
    """Send one STUN Binding request to ``host:port`` (UDP); the round trip in seconds of a matching
    success response. Raises ``OSError`` when refused (ICMP); the caller bounds the wait."""
    loop = asyncio.get_running_loop()
    txn = os.urandom(12)
    answered: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: _StunProtocol(txn, answered),
                                                       remote_addr=(host, port))
    try:
        t0 = time.monotonic()
        transport.sendto(struct.pack("!HHI", STUN_BINDING_REQUEST, 0, STUN_MAGIC) + txn)
        await answered
        return time.monotonic() - t0
    finally:
        transport.close()


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); ValueError names what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


class ComponentProbes:
    """Probes Janus (``janus_info``: an awaitable call that raises when Janus does not answer) and, when
    ``turn_address`` is set, coturn; logs each change of state once."""

    def __init__(self, janus_info: Callable[[], Awaitable[object]] | None, turn_address: str = "") -> None:
        self._janus_info = janus_info
        self._turn = parse_address(turn_address) if turn_address else None
        self._state: dict[str, bool] = {}

    async def probe_once(self) -> dict[str, bool]:
        """Probe every component once; their up/down state (also set in the gauges)."""
        if self._janus_info is not None:
            await self._probe("janus", self._timed_janus())
        if self._turn is not None:
            await self._probe("turn", self._timed_turn())
        return dict(self._state)

    async def _timed_janus(self) -> float:
        assert self._janus_info is not None
        t0 = time.monotonic()
        async with asyncio.timeout(TIMEOUT_S):  # (wait_for in 3.11 can swallow a cancellation)
            await self._janus_info()
        return time.monotonic() - t0

    async def _timed_turn(self) -> float:
        assert self._turn is not None
        async with asyncio.timeout(TIMEOUT_S):
            return await stun_binding(*self._turn)

    async def _probe(self, component: str, probe: Awaitable[float]) -> None:
        error = ""
        try:
            rtt = await probe
        except Exception as exc:  # any failure means "not answering"; the reason goes to the log
            error = f"{type(exc).__name__}: {exc}"
        up = not error
        UP.labels(component=component).set(1 if up else 0)
        if up:
            PROBE_SECONDS.labels(component=component).set(rtt)
        if self._state.get(component) != up:
            if up:
                log.info("component answers", extra={"component": component})
            else:
                log.warning("component does not answer", extra={"component": component, "error": error})
        self._state[component] = up

    async def run(self, interval: float = INTERVAL_S) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(interval)
