"""`voice-appliance bench records`: what the call record costs per call.

Spools ``--calls`` synthetic calls shaped like a ~5 minute conversation (``--turns`` caller/assistant
turn pairs: two transcript lines, a turn event and a usage report each, plus the call row items), then
lets the writer ship them into a real throwaway PostgreSQL (initdb in a temp dir, as the tests do).
Reports the producer's append cost per item (what a worker pays on its loop), the writer's CPU time
per call in this process (reading the spool, building and sending the batches), the wall time per call
and PostgreSQL's own CPU per call (its backend processes' /proc times).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

ITEMS_PER_TURN = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--turns", type=int, default=20, help="caller/assistant turn pairs per call")
    parser.add_argument("--batch", type=int, default=500, help="records.batch_items")
    parser.add_argument("--smoke", action="store_true", help="short CI form (20 calls)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_cpu_seconds(root_pid: int) -> float:
    """CPU seconds of ``root_pid``'s process tree (the postmaster and its backends)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        stats[int(d)] = (int(fields[11]), int(fields[12]))
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        u, s = stats.get(pid, (0, 0))
        total += (u + s) / tick
        todo += children.get(pid, [])
    return total


def _spool_calls(root: Path, calls: int, turns: int) -> tuple[int, float]:
    from appliance.records.spool import Spool

    shard = Spool(root / "shard-0", segment_bytes=4 << 20)
    sup = Spool(root / "supervisor", segment_bytes=4 << 20)
    n = 0
    t0 = time.perf_counter()
    for c in range(calls):
        cid = f"bench.{c:06d}{secrets.token_hex(4)}"
        sup.append("call.created", cid, box="bench", sub=f"user{c % 50}", mode="direct", model="m",
                   voice="Puck", language="en-US")
        sup.append("call.connected", cid)
        for t in range(turns):
            shard.append("event", cid, type="turn", offset_ms=t * 15000, data={"speech_ms": 3000,
                                                                              "response_ms": 420.5})
            shard.append("transcript", cid, speaker="caller", offset_ms=t * 15000,
                         text="I would like to move my appointment to next Tuesday afternoon please")
            shard.append("transcript", cid, speaker="assistant", offset_ms=t * 15000 + 3500,
                         text="Of course. I can offer Tuesday at two or at four. Which one suits you?")
            shard.append("usage", cid, model="m", prompt_tokens=400, response_tokens=300, total_tokens=700,
                         details={"input": {"AUDIO": 380, "TEXT": 20}, "output": {"AUDIO": 300}})
        sup.append("call.ended", cid, box="bench", sub="u", mode="direct", created_at=time.time(),
                   reason="hangup", quality={"loss_ratio": 0.0, "jitter_ms": 2.0})
        n += 3 + turns * ITEMS_PER_TURN
    append_s = time.perf_counter() - t0
    shard.close()
    sup.close()
    return n, append_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.records.pgcluster import Cluster, Server
    from appliance.records.writer import Database, RecordWriter

    calls = 20 if args.smoke else args.calls
    tmp = Path(tempfile.mkdtemp(prefix="va-bench-pg-"))
    os.chmod(tmp, 0o755)
    password = secrets.token_urlsafe(16)
    cluster = Cluster(tmp / "cluster", _free_port(), database="postgres")
    server = Server(cluster)
    try:
        cluster.init(password)
        server.start()
        items, append_s = _spool_calls(tmp / "spool", calls, args.turns)

        async def ship() -> tuple[float, float, float]:
            writer = RecordWriter(Database(cluster.dsn(), password), tmp / "spool", batch_items=args.batch)
            async with writer.db.connection() as conn:  # migrate outside the measurement
                from appliance.records import store
                await store.migrate(conn)
            writer.migrated = True
            assert server.proc is not None
            pg0, cpu0, t0 = _pg_cpu_seconds(server.proc.pid), time.process_time(), time.perf_counter()
            ok = await writer.drain(600)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            pg = _pg_cpu_seconds(server.proc.pid) - pg0
            await writer.db.close()
            if not ok or writer.written < items:
                raise RuntimeError(f"writer shipped {writer.written} of {items} items")
            return wall, cpu, pg

        wall, cpu, pg = asyncio.run(ship())
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "calls": calls,
        "items_per_call": items // calls,
        "append_us_per_item": round(append_s / items * 1e6, 2),
        "writer_cpu_ms_per_call": round(cpu / calls * 1000, 3),
        "writer_wall_ms_per_call": round(wall / calls * 1000, 3),
        "postgres_cpu_ms_per_call": round(pg / calls * 1000, 3),
        "items_per_second": round(items / wall),
    }
