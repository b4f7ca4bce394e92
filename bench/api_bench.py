"""Session API control-plane costs: JWT verification, SDP validation, Redis rate limit and state writes,
a whole ``POST /v1/sessions`` through the app, and (``--janus``) NoSIP signalling on a real Janus.

``voice-appliance bench api --json`` from a source checkout (it reuses tests/harness). Every number is
a median over ``--n`` repetitions; CPU numbers use ``process_time`` (the box is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=300, help="repetitions per measurement")
    parser.add_argument("--smoke", action="store_true", help="short run for CI")
    parser.add_argument("--janus", action="store_true", help="also time NoSIP signalling on a real Janus")


def _cpu_us(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.process_time_ns()
        fn()
        samples.append((time.process_time_ns() - t0) / 1000)
    return round(statistics.median(samples), 1)


async def _wall_us(coro_fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await coro_fn()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return round(statistics.median(samples), 1)


async def _async_part(tmp: Path, n: int, with_janus: bool) -> dict[str, Any]:
    import httpx

    from appliance.api import create_app
    from appliance.config import LimitsConfig, RedisConfig, load_config, replace
    from appliance.ratelimit import CREATE, RateLimiter
    from appliance.state import SessionRecord, SessionStore, new_session_id, redis_client
    from appliance.token import generate_keys, mint
    from tests.api.sdp_fixtures import CHROME_OFFER
    from tests.api.service_double import InMemoryService
    from tests.harness.redis import redis_server

    out: dict[str, Any] = {}
    priv, pub = generate_keys(tmp / "keys")
    with redis_server(tmp / "redis") as srv:
        client = redis_client(RedisConfig(url=srv.url))
        limiter = RateLimiter(client, LimitsConfig(session_creates_per_minute=100000,
                                                   signalling_per_minute=100000))
        out["ratelimit_check_wall_us"] = await _wall_us(lambda: limiter.check(CREATE, "192.0.2.1"), n)
        store = SessionStore(client)
        sid = new_session_id("bench")
        await store.create(SessionRecord(session_id=sid, sub="bench"))
        out["state_update_wall_us"] = await _wall_us(lambda: store.update(sid, last_transcript="hello"), n)
        (tmp / "empty.toml").write_text("")
        cfg = replace(load_config(tmp / "empty.toml", env={}), auth={"jwt_public_key_file": str(pub)},
                      turn={"secret": "s", "uris": ["turn:127.0.0.1:3478"]})
        service = InMemoryService(capacity=10**9)
        app = create_app(cfg, service, limiter=limiter)
        headers = {"Authorization": "Bearer " + mint(priv.read_bytes(), sub="bench")}
        body = {"sdp": CHROME_OFFER, "type": "offer"}
        transport = httpx.ASGITransport(app=app, client=("192.0.2.9", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as api:
            async def create() -> None:
                r = await api.post("/v1/sessions", json=body, headers=headers)
                assert r.status_code == 201, r.text

            t0 = time.process_time_ns()
            out["create_session_wall_us"] = await _wall_us(create, n)
            out["create_session_cpu_us"] = round((time.process_time_ns() - t0) / 1000 / n, 1)
        await client.aclose()
    if with_janus:
        out.update(await _janus_part(n=min(n, 30)))
    return out


async def _janus_part(n: int) -> dict[str, Any]:
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack

    from appliance.janus import NOSIP, JanusClient, plain_rtp_answer
    from tests.harness.janus import janus_in_netns

    pc = RTCPeerConnection()
    pc.addTrack(AudioStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    await pc.close()
    with janus_in_netns() as j:
        async with JanusClient(j.url, api_secret=j.api_secret) as jc:
            session = await jc.create_session()
            samples = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                handle = await session.attach(NOSIP)
                side = await handle.nosip_generate(offer)
                await handle.nosip_process_answer(plain_rtp_answer(j.host_ip, 40000, side.payload_type))
                samples.append((time.perf_counter_ns() - t0) / 1e6)
                await handle.detach()
    return {"janus_nosip_attach_generate_process_ms_p50": round(statistics.median(samples), 2),
            "janus_nosip_attach_generate_process_ms_max": round(max(samples), 2)}


def _use_source_checkout() -> None:
    """This benchmark reuses the test harnesses (real redis-server, Janus netns): it needs the source tree."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests" / "harness").is_dir():
        raise RuntimeError("bench api needs a source checkout (it uses tests/harness)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def run(args: argparse.Namespace) -> dict[str, Any]:
    _use_source_checkout()
    from appliance.auth import JwtVerifier
    from appliance.sdp import validate_offer
    from appliance.token import generate_keys, mint
    from tests.api.sdp_fixtures import CHROME_OFFER

    n = 50 if args.smoke else args.n
    with tempfile.TemporaryDirectory(prefix="va-api-bench-") as d:
        tmp = Path(d)
        priv, pub = generate_keys(tmp / "jwt")
        verifier = JwtVerifier(pub.read_bytes(), audience="voice-appliance")
        token = mint(priv.read_bytes(), sub="bench")
        result: dict[str, Any] = {
            "jwt_verify_cpu_us": _cpu_us(lambda: verifier.verify(token), n),
            "sdp_validate_cpu_us": _cpu_us(lambda: validate_offer(CHROME_OFFER), n),
        }
        result.update(asyncio.run(_async_part(tmp, n, args.janus)))
    result["n"] = n
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    res = run(ns)
    print(json.dumps(res) if ns.json else "\n".join(f"{k}: {v}" for k, v in res.items()))
    sys.exit(0)
