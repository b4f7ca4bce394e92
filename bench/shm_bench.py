"""shm ring cost: CPU µs per 20 ms frame per side, the price of acquire/release, cross-process latency.

* ``cpu_us_per_frame_write`` / ``cpu_us_per_frame_read``: process CPU time per 20 ms frame through
  real slots of a real segment (uplink 640 B and downlink 960 B frames, ``--sessions`` slots served
  round-robin like a worker tick), the worse of the two directions; per-direction values are
  reported too.
* ``ordering_cost_us_per_frame``: the same write+read with plain memoryview stores instead of the
  patomic acquire/release calls (what the atomics cost us); ``atomic_op_us`` is one patomic load or
  store through ctypes, ``atomics2_view_op_us`` one load through atomics2's public API (why we bypass
  it).
* ``cross_process_latency_p50/p99/max_us``: a producer process writes a timestamped frame every
  millisecond, a busy-polling consumer process reads it; CLOCK_MONOTONIC is shared by both. The
  tail measures the scheduler more than the ring: on a loaded 2-core box the spinning consumer is
  preempted for whole time slices, so ``loadavg_1m`` is reported alongside.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import struct
import time
from typing import Any

import numpy as np

from shm import layout as L
from shm.atomic import Atomics, buffer_address
from shm.segment import ShardSegment, cleanup_stale, segment_name

UP, DOWN = 640, 960


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=64, help="slots exercised round-robin (default 64)")
    parser.add_argument("--frames", type=int, default=200_000, help="frames per direction for the CPU cost")
    parser.add_argument("--latency-frames", type=int, default=3000, help="frames for the latency probe")
    parser.add_argument("--smoke", action="store_true", help="short CI form")


def _activate(seg: ShardSegment, n: int) -> None:
    for i in range(n):
        seg.slot(i).activate(session_id=f"bench-{i}", local_rtp_port=40000 + 2 * i,
                             remote_rtp_ip="127.0.0.1", remote_rtp_port=20000 + 2 * i, payload_type=111,
                             channels=2, dtmf_payload_type=101, mode="direct", options={})


def _cpu_cost(seg: ShardSegment, sessions: int, frames: int) -> dict[str, float]:
    """CPU µs per frame for write and read, per direction, in tick-sized batches."""
    out: dict[str, float] = {}
    for label, size, rings in (("uplink", UP, [seg.slot(i).uplink for i in range(sessions)]),
                               ("downlink", DOWN, [seg.slot(i).downlink for i in range(sessions)])):
        frame = np.arange(size // 2, dtype=np.int16).tobytes()
        buf = bytearray(size)
        per_ring = max(1, min(40, rings[0].capacity // size - 1))  # frames per ring per batch
        t_w = t_r = 0.0
        done = 0
        while done < frames:
            t0 = time.process_time()
            for _ in range(per_ring):
                for r in rings:
                    r.write(frame)
            t1 = time.process_time()
            for _ in range(per_ring):
                for r in rings:
                    r.read_into(buf)
            t2 = time.process_time()
            t_w += t1 - t0
            t_r += t2 - t1
            done += per_ring * len(rings)
        out[f"{label}_write_us"] = t_w / done * 1e6
        out[f"{label}_read_us"] = t_r / done * 1e6
        if any(r.overruns or r.underruns for r in rings):
            raise RuntimeError("benchmark ring overflowed/underran: sizes are wrong")
    return out


def _plain_cost(frames: int) -> float:
    """Same SPSC algorithm with plain memoryview cursor stores (no ordering) — the baseline."""
    cap = 1 << 16
    mm = bytearray(256 + cap)
    mv = memoryview(mm)
    hq = mv[:256].cast("Q")
    frame = bytes(UP)
    buf = bytearray(UP)
    n = frames
    t0 = time.process_time()
    for _ in range(n):
        w, r = hq[0], hq[16]
        if UP <= cap - (w - r):
            p = w & (cap - 1)
            if p + UP <= cap:
                mv[256 + p:256 + p + UP] = frame
            hq[0] = w + UP
        w, r = hq[0], hq[16]
        if w - r >= UP:
            p = r & (cap - 1)
            if p + UP <= cap:
                buf[:] = mv[256 + p:256 + p + UP]
            hq[16] = r + UP
    return (time.process_time() - t0) / n * 1e6


def _op_costs() -> dict[str, float]:
    import atomics2

    mm = bytearray(64)
    addr, keeper = buffer_address(mm)
    a = Atomics()
    n = 100_000
    t0 = time.process_time()
    for _ in range(n):
        a.load_acquire(addr)
    t1 = time.process_time()
    for i in range(n):
        a.store_release(addr, i)
    t2 = time.process_time()
    view_n = 20_000
    with atomics2.atomicview(buffer=memoryview(bytearray(8)), atype=atomics2.UINT) as v:
        t3 = time.process_time()
        for _ in range(view_n):
            v.load()
        t4 = time.process_time()
    del keeper
    return {"atomic_load_us": (t1 - t0) / n * 1e6, "atomic_store_us": (t2 - t1) / n * 1e6,
            "atomics2_view_op_us": (t4 - t3) / view_n * 1e6}


def _latency_consumer(name: str, n: int, conn: Any) -> None:
    seg = ShardSegment.attach(name)
    ring = seg.slot(0).uplink
    buf = bytearray(UP)
    lat: list[int] = []
    deadline = time.monotonic() + 30 + n / 500
    while len(lat) < n and time.monotonic() < deadline:
        if ring.available() >= UP and ring.read_into(buf):
            lat.append(time.monotonic_ns() - struct.unpack_from("<Q", buf)[0])
    conn.send(lat)
    seg.close()


def _latency(name: str, n: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_latency_consumer, args=(name, n, child), daemon=True)
    proc.start()
    seg = ShardSegment.attach(name)
    ring = seg.slot(0).uplink
    frame = bytearray(UP)
    time.sleep(0.2)  # let the consumer start polling
    for _ in range(n):
        struct.pack_into("<Q", frame, 0, time.monotonic_ns())
        ring.write(frame)
        time.sleep(0.001)
    lat = parent.recv() if parent.poll(60) else []
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    seg.close()
    if len(lat) < n * 0.9:
        raise RuntimeError(f"latency probe received only {len(lat)} of {n} frames")
    us = sorted(x / 1000 for x in lat[len(lat) // 20:])  # drop warm-up
    return {"cross_process_latency_p50_us": round(statistics.median(us), 1),
            "cross_process_latency_p99_us": round(us[int(len(us) * 0.99) - 1], 1),
            "cross_process_latency_max_us": round(us[-1], 1), "latency_frames": len(lat),
            "latency_under_100us_fraction": round(sum(x < 100 for x in us) / len(us), 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    sessions = max(1, args.sessions if not args.smoke else min(args.sessions, 16))
    frames = args.frames if not args.smoke else min(args.frames, 20_000)
    lat_frames = args.latency_frames if not args.smoke else min(args.latency_frames, 300)
    iid = f"bench{os.getpid()}"
    cleanup_stale(iid)
    seg = ShardSegment.create(segment_name(iid, 0), slots=sessions, uplink_bytes=64000, downlink_bytes=384000,
                              instance_id=iid)
    try:
        _activate(seg, sessions)
        cost = _cpu_cost(seg, sessions, frames)
        plain = _plain_cost(frames)
        ops = _op_costs()
        seg.slot(0).uplink.reset()
        lat = _latency(seg.name, lat_frames)
    finally:
        seg.close()
        cleanup_stale(iid)
    write = max(cost["uplink_write_us"], cost["downlink_write_us"])
    read = max(cost["uplink_read_us"], cost["downlink_read_us"])
    return {
        "cpu_us_per_frame_write": round(write, 2),
        "cpu_us_per_frame_read": round(read, 2),
        **{k: round(v, 2) for k, v in cost.items()},
        "plain_store_write_read_us": round(plain, 2),
        "ordering_cost_us_per_frame": round(cost["uplink_write_us"] + cost["uplink_read_us"] - plain, 2),
        "atomic_op_us": round((ops["atomic_load_us"] + ops["atomic_store_us"]) / 2, 3),
        "atomics2_view_op_us": round(ops["atomics2_view_op_us"], 2),
        **lat,
        "sessions": sessions,
        "frames": frames,
        "layout_version": L.LAYOUT_VERSION,
        "cpu": os.uname().machine,
        "loadavg_1m": round(os.getloadavg()[0], 2),  # the latency tail is scheduling on a busy box
    }
