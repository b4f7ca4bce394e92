"""Read deadlines on the real uvicorn server (appliance/httpguard.py): slow-loris connections are closed.

300 half-open connections (a partial request head, then silence) plus slow bodies and silent sockets
against the API served exactly as the supervisor serves it; every one is closed within the header/body
deadline while a normal session create still gets its 201. A control run with uvicorn's stock h11
protocol shows the gap the guard closes (it keeps such connections open).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from appliance.api import create_app
from appliance.config import replace
from appliance.supervisor import _Server
from bench.loris import closed_within
from tests.api.service_double import InMemoryService
from tests.api.test_api import auth, offer_body
from tests.harness.redis import free_port

HALF_OPEN = 300
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0


async def _serve(cfg, guard: bool = True):
    app = create_app(cfg, InMemoryService())
    server = _Server.make(app, cfg)
    if not guard:
        server.config.http = "h11"  # uvicorn's stock protocol (the control)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110  (uvicorn offers a flag, not an event)
        await asyncio.sleep(0.01)
    return server, task


@pytest.fixture
def served_cfg(cfg):
    return replace(cfg, api={"host": "127.0.0.1", "port": free_port(), "keepalive_timeout_seconds": 1.0,
                             "header_timeout_seconds": HEADER_TIMEOUT, "body_timeout_seconds": BODY_TIMEOUT})


async def test_slow_loris_closed_within_deadline_normal_call_still_works(served_cfg, private_pem):
    server, task = await _serve(served_cfg)
    port = served_cfg.api.port
    writers = []
    try:
        conns = []
        for i in range(HALF_OPEN):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            match i % 3:
                case 0:  # half a request head, then silence
                    writer.write(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                case 1:  # a whole head, then a trickle of body that never ends
                    writer.write(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"sdp\":")
                case _:  # nothing at all
                    pass
            await writer.drain()
            conns.append(reader)
            writers.append(writer)
        opened = time.monotonic()
        # a normal caller is served while the 300 are held
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            t0 = time.monotonic()
            r = await http.post("/v1/sessions", json=offer_body(), headers=auth(private_pem))
            assert r.status_code == 201, r.text
            assert time.monotonic() - t0 < 1.5
        waits = await asyncio.gather(*[closed_within(rd, HEADER_TIMEOUT + BODY_TIMEOUT + 3) for rd in conns])
        still_open = sum(w is None for w in waits)
        assert still_open == 0, f"{still_open} of {HALF_OPEN} connections still open"
        latest = time.monotonic() - opened
        # head deadline from connect, body deadline from the end of the head (both ~2 s here)
        assert latest <= max(HEADER_TIMEOUT, BODY_TIMEOUT) + 2.5, latest
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200
    finally:
        for w in writers:
            w.close()
        server.should_exit = True
        await task


async def test_keepalive_then_slow_next_request_is_closed(served_cfg):
    server, task = await _serve(served_cfg)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", served_cfg.api.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert b"200 OK" in await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # the next request starts, then stalls
        await writer.drain()
        closed = await closed_within(reader, HEADER_TIMEOUT + 3)
        assert closed is not None and closed <= HEADER_TIMEOUT + 1.5, closed
        writer.close()
    finally:
        server.should_exit = True
        await task


async def test_control_stock_uvicorn_keeps_half_open_connections(served_cfg):
    """Why the guard exists: with uvicorn's own h11 protocol a half-open request is never timed out."""
    server, task = await _serve(served_cfg, guard=False)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", served_cfg.api.port)
        writer.write(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        assert await closed_within(reader, HEADER_TIMEOUT + 2) is None
        writer.close()
    finally:
        server.should_exit = True
        await task
