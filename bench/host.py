"""The appliance side of the pipeline benchmark, run the way the supervisor runs it.

A separate process (its CPU is counted as the supervisor's) that does exactly the supervisor's share
of the data path: it plans CPUs (``appliance.cpuplan``), creates one shared-memory segment per shard,
runs the real :class:`appliance.arbiter.Arbiter` (which spawns ``voice-appliance media-worker`` and
``ai-worker`` pinned to their cores and restarts them) and activates slots the way a placed session
does. It skips only Janus and the HTTP API: the load generator plays Janus's plain-RTP side.

Commands over a ``multiprocessing`` pipe (one reply each): ``ready`` (wait for every worker's
heartbeat), ``activate`` (list of (shard, slot, remote_port) → generations), ``close`` (list of
(shard, slot)), ``pids``, ``counters`` (media/AI slot counters and ring counters summed over the slots
in use), ``histograms`` (the shards' latency histogram blocks, summed: shm/histograms.py), ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import time
from typing import Any

from appliance.arbiter import Arbiter, specs_for_plan
from appliance.config import load_config
from appliance.cpuplan import make_plan
from shm.segment import ShardSegment, cleanup_stale, local_rtp_port, ring_bytes, segment_name

log = logging.getLogger(__name__)

RING_COUNTERS = ("overruns", "dropped", "underruns", "flushes")


def session_id(shard: int, slot: int) -> str:
    """The session id the benchmark gives (shard, slot); the workers log it."""
    return f"bench-{shard}-{slot}"


class Host:
    """Segments + arbiter + slot activation (in the host process)."""

    def __init__(self, cfg_path: str, env: dict[str, str], roles: tuple[str, ...] = ("media", "ai")) -> None:
        self.cfg_path = cfg_path
        self.cfg = cfg = load_config(cfg_path)
        self.plan = make_plan(cfg.shards.cpu_plan, cfg.shards.count)
        iid = cfg.paths.instance_id
        cleanup_stale(iid)
        up, down = ring_bytes(cfg.shards.uplink_ring_ms, cfg.shards.downlink_ring_ms)
        self.segs: dict[int, ShardSegment] = {}
        for s in self.plan.shards:
            self.segs[s.shard] = ShardSegment.create(
                segment_name(iid, s.shard), slots=cfg.shards.slots, uplink_bytes=up, downlink_bytes=down,
                instance_id=iid)
        self.arbiter = Arbiter(
            [w for w in specs_for_plan(self.plan, lambda k: self.segs[k].name, cfg_path) if w.role in roles],
            heartbeat=self._heartbeat, heartbeat_timeout=cfg.shards.heartbeat_timeout_seconds, env=env,
            # many workers importing onnxruntime and the SDK at once on a busy core start slowly; the
            # production heartbeat timeout applies once they run
            start_grace=20.0 + 2.0 * len(self.plan.shards))
        self.used: set[tuple[int, int]] = set()

    def _heartbeat(self, role: str, shard: int) -> tuple[int, float] | None:
        pid, age = self.segs[shard].heartbeat_age(role)  # type: ignore[arg-type]
        return None if pid is None or age is None else (pid, age)

    async def ready(self, wait_seconds: float) -> dict[str, Any]:
        """Wait until every worker has written a heartbeat; give up early on a crash loop."""
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if all(w.ready_event.is_set() for w in self.arbiter.workers):
                return {"ok": True}
            for w in self.arbiter.workers:
                if w.restarts >= 2 and not w.ready_event.is_set():
                    return {"ok": False, "worker": w.name, "exit": w.last_exit, "restarts": w.restarts}
            await asyncio.sleep(0.2)
        missing = [w.name for w in self.arbiter.workers if not w.ready_event.is_set()]
        return {"ok": False, "missing": missing}

    def activate(self, items: list[tuple[int, int, int]], payload_type: int, channels: int) -> list[int]:
        out = []
        for shard, slot, remote_port in items:
            port = local_rtp_port(self.cfg.media.rtp_port_min, shard, self.cfg.shards.slots, slot)
            gen = self.segs[shard].slot(slot).activate(
                session_id=session_id(shard, slot), local_rtp_port=port, remote_rtp_ip="127.0.0.1",
                remote_rtp_port=remote_port, payload_type=payload_type, channels=channels,
                dtmf_payload_type=101, mode="direct", options={})
            self.used.add((shard, slot))
            out.append(gen)
        return out

    def close(self, items: list[tuple[int, int]]) -> None:
        for shard, slot in items:
            s = self.segs[shard].slot(slot)
            with contextlib.suppress(Exception):
                s.begin_close()
            self.used.discard((shard, slot))

    def realtime(self, role: str) -> list[int]:
        """Experiment: put ``role``'s workers (every thread) on SCHED_RR 1; returns the pids changed."""
        done = []
        for w in self.arbiter.workers:
            if w.spec.role != role or w.pid is None:
                continue
            for tid in os.listdir(f"/proc/{w.pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(int(tid), os.SCHED_RR, os.sched_param(1))
            done.append(w.pid)
        return done

    def pids(self) -> dict[str, Any]:
        return {
            "host": os.getpid(),
            "workers": {w.name: w.pid for w in self.arbiter.workers},
            "restarts": sum(w.restarts for w in self.arbiter.workers),
        }

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for shard, slot in self.used:
            s = self.segs[shard].slot(slot)
            for k, v in s.counters.snapshot().items():
                total[k] = total.get(k, 0) + v
            for ring_name in ("uplink", "downlink"):
                ring = getattr(s, ring_name)
                for k in RING_COUNTERS:
                    key = f"{ring_name}_{k}"
                    total[key] = total.get(key, 0) + getattr(ring, k)
        return total

    def histograms(self) -> dict[str, tuple[list[int], float]]:
        total: dict[str, tuple[list[int], float]] = {}
        for seg in self.segs.values():
            for role in ("media", "ai"):
                for name, (buckets, s) in seg.histograms(role).snapshot_all().items():
                    b0, s0 = total.get(name, ([0] * len(buckets), 0.0))
                    total[name] = ([a + b for a, b in zip(b0, buckets, strict=True)], s0 + s)
        return total

    async def stop(self) -> None:
        await self.arbiter.stop()
        for seg in self.segs.values():
            with contextlib.suppress(Exception):
                seg.close()
            with contextlib.suppress(Exception):
                seg.unlink()
        # the AI workers keep crash-replay journals in /dev/shm next to the segments: remove them too
        with contextlib.suppress(Exception):
            cleanup_stale(self.cfg.paths.instance_id)


async def _serve(conn: Any, cfg_path: str, env: dict[str, str], roles: tuple[str, ...]) -> None:
    try:
        host = Host(cfg_path, env, roles)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    await host.arbiter.start()
    conn.send(("started", {"shards": host.plan.shard_count, "plan": host.plan.describe(),
                           "worker_cpus": sorted({w.spec.cpu for w in host.arbiter.workers})}))
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    try:
        while True:
            cmd, arg = await inbox.get()
            try:
                if cmd == "ready":
                    reply: Any = await host.ready(arg)
                elif cmd == "activate":
                    reply = host.activate(*arg)
                elif cmd == "close":
                    reply = host.close(arg)
                elif cmd == "realtime":
                    reply = host.realtime(arg)
                elif cmd == "pids":
                    reply = host.pids()
                elif cmd == "counters":
                    reply = host.counters()
                elif cmd == "histograms":
                    reply = host.histograms()
                elif cmd == "stop":
                    break
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", reply))
            except Exception as exc:  # report, keep serving
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        loop.remove_reader(conn.fileno())
        await host.stop()
        conn.send(("ok", None))


def _main(conn: Any, cfg_path: str, env: dict[str, str], log_path: str, roles: tuple[str, ...]) -> None:
    # The workers inherit these: their logs go to the work directory, not the benchmark's output.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(conn, cfg_path, env, roles))


class HostHandle:
    """Parent-side handle of the host process."""

    def __init__(self, cfg_path: str, env: dict[str, str], log_path: str,
                 cpus: set[int] | None = None, roles: tuple[str, ...] = ("media", "ai")) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.log_path = log_path
        self.proc = ctx.Process(target=_main, args=(child, cfg_path, env, log_path, roles),
                                name="va-bench-host")
        self.proc.start()
        child.close()
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, cpus)
        kind, info = self._recv(60)
        if kind != "started":
            self.proc.join(5)
            raise RuntimeError(f"appliance host failed to start: {info}")
        self.info: dict[str, Any] = info

    def _recv(self, timeout: float) -> tuple[str, Any]:
        if not self._conn.poll(timeout):
            raise RuntimeError("appliance host did not answer")
        return self._conn.recv()

    def call(self, cmd: str, arg: Any = None, timeout: float = 60.0) -> Any:
        self._conn.send((cmd, arg))
        kind, value = self._recv(timeout)
        if kind == "error":
            raise RuntimeError(f"appliance host: {cmd}: {value}")
        return value

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call("stop", timeout=30)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
