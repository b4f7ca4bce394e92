"""`voice-appliance bench loris`: half-open connections against the API server as the supervisor runs it.

Opens ``-n`` connections that each send half a request head and then nothing (slow-loris), with the
configured read deadlines (``api.header_timeout_seconds``, default 10 s), and reports how many the
server closed and when; a normal session create is timed while they are held. The control plane is the
in-memory test double (tests/api), so this needs a source checkout. docs/security.md "Read deadlines".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", type=int, default=300, help="half-open connections (default 300)")
    parser.add_argument("--header-timeout", type=float, default=None, help="api.header_timeout_seconds")
    parser.add_argument("--smoke", action="store_true", help="50 connections, 2 s deadline")


async def closed_within(reader: asyncio.StreamReader, limit: float) -> float | None:
    """Seconds until the server closed the connection (EOF or reset), or None if still open at ``limit``."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - start


async def _run(n: int, header_timeout: float | None) -> dict[str, Any]:
    import httpx

    from appliance.api import create_app
    from appliance.config import load_config, replace
    from appliance.supervisor import _Server
    from appliance.token import generate_keys, mint
    from tests.api.sdp_fixtures import CHROME_OFFER
    from tests.api.service_double import InMemoryService
    from tests.harness.redis import free_port

    with tempfile.TemporaryDirectory(prefix="va-loris-") as d:
        tmp = Path(d)
        priv, pub = generate_keys(tmp)
        (tmp / "empty.toml").write_text("")
        api: dict[str, Any] = {"host": "127.0.0.1", "port": free_port()}
        if header_timeout is not None:
            api["header_timeout_seconds"] = header_timeout
        base = load_config(tmp / "empty.toml", env={})
        cfg = replace(base, auth={"jwt_public_key_file": str(pub)}, api=api)
        server = _Server.make(create_app(cfg, InMemoryService()), cfg)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110  (uvicorn offers a flag, not an event)
            await asyncio.sleep(0.01)
        writers = []
        try:
            readers = []
            for _ in range(n):
                reader, writer = await asyncio.open_connection("127.0.0.1", cfg.api.port)
                writer.write(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                await writer.drain()
                readers.append(reader)
                writers.append(writer)
            opened = time.monotonic()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.api.port}", timeout=10) as http:
                t0 = time.monotonic()
                r = await http.post("/v1/sessions", json={"type": "offer", "sdp": CHROME_OFFER},
                                    headers={"Authorization": "Bearer " + mint(priv.read_bytes(), sub="b")})
                create_ms = (time.monotonic() - t0) * 1000
            waits = await asyncio.gather(*[closed_within(rd, cfg.api.header_timeout_seconds + 10)
                                           for rd in readers])
            closed = [w for w in waits if w is not None]
            return {"connections": n, "header_timeout_seconds": cfg.api.header_timeout_seconds,
                    "closed": len(closed), "still_open": n - len(closed),
                    "all_closed_after_seconds": round(time.monotonic() - opened, 2),
                    "max_wait_seconds": round(max(closed), 2) if closed else None,
                    "create_status_while_held": r.status_code, "create_ms_while_held": round(create_ms, 1)}
        finally:
            for w in writers:
                w.close()
            server.should_exit = True
            await task


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests" / "harness").is_dir():
        raise RuntimeError("bench loris needs a source checkout (it uses tests/api)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if args.smoke:
        return asyncio.run(_run(50, 2.0))
    return asyncio.run(_run(args.n, args.header_timeout))
