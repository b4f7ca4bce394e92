"""Measure session setup through the real supervisor: `python -m tests.supervisor.measure_setup [N]`.

Starts Redis, Janus (netns) and a supervisor (1 shard); times N sequential POST /v1/sessions (admission,
NoSIP generate, slot activation, NoSIP process, Redis record) and DELETEs, then N in parallel batches of
8; prints one JSON object. Not a unit test (timing); numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from tests.harness.janus import janus_in_netns
from tests.harness.redis import redis_server
from tests.supervisor.conftest import start_supervisor, stop_supervisor


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000, 1)


async def measure(n: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="va-measure-"))
    with redis_server(tmp / "redis") as rs, janus_in_netns(debug_level=2) as j:
        sp = start_supervisor(tmp, rs.url, j, slots=64)
        try:
            pc = RTCPeerConnection()
            pc.addTrack(AudioStreamTrack())
            await pc.setLocalDescription(await pc.createOffer())
            offer = pc.localDescription.sdp
            auth = {"Authorization": f"Bearer {sp.token('bench')}"}
            async with httpx.AsyncClient(base_url=sp.api, timeout=30) as http:
                async def one() -> tuple[float, float]:
                    t0 = time.perf_counter()
                    r = await http.post("/v1/sessions", headers=auth, json={"type": "offer", "sdp": offer})
                    t1 = time.perf_counter()
                    assert r.status_code == 201, r.text
                    d = await http.delete(f"/v1/sessions/{r.json()['session_id']}", headers=auth)
                    assert d.status_code == 204
                    return t1 - t0, time.perf_counter() - t1

                await one()  # warm-up (Janus session per shard, connections)
                seq = [await one() for _ in range(n)]
                par: list[tuple[float, float]] = []
                for _ in range(max(1, n // 8)):
                    par += await asyncio.gather(*(one() for _ in range(8)))
            await pc.close()
        finally:
            stop_supervisor(sp)
    create = [c for c, _ in seq]
    delete = [d for _, d in seq]
    pcreate = [c for c, _ in par]
    return {
        "n": n,
        "create_ms_p50": pct(create, 50), "create_ms_p99": pct(create, 99),
        "create_ms_mean": round(statistics.mean(create) * 1000, 1),
        "delete_ms_p50": pct(delete, 50), "delete_ms_p99": pct(delete, 99),
        "create_ms_p50_8_parallel": pct(pcreate, 50), "create_ms_p99_8_parallel": pct(pcreate, 99),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 50))))
