"""VAD cost: µs of CPU per 32 ms chunk per stream, single stream vs. batched, with and without the gate.

Feeds espeak-ng speech (every stream speaking, so the energy gate never helps: the worst case) and a
realistic mix (40 % of chunks digital/near silence) through :class:`workers.ai.vad.BatchedVad` exactly
as the AI worker does — one ``process()`` call per 32 ms over all streams — and reports process CPU
time (``time.process_time``; onnxruntime is pinned to one thread) per chunk per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import time
import wave

import numpy as np
import soxr

from workers.ai.vad import WINDOW, BatchedVad


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64],
                        help="stream counts to measure (default: 1 8 32 64)")
    parser.add_argument("--chunks", type=int, default=200, help="32 ms chunks per stream per run")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU while measuring")
    parser.add_argument("--smoke", action="store_true", help="short CI form (B=1 and 64, 20 chunks)")
    parser.add_argument("--worker-sessions", type=int, default=64,
                        help="also measure the whole AI-worker tick (shm + VAD + turns) at this many calls")
    parser.add_argument("--worker-seconds", type=float, default=10.0, help="audio seconds for the tick run")


def _speech() -> np.ndarray:
    try:
        wav = subprocess.run(
            ["espeak-ng", "-v", "en-us", "--stdout", "The quick brown fox jumps over the lazy dog, twice."],
            capture_output=True, check=True, timeout=30).stdout
        with wave.open(io.BytesIO(wav)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            return soxr.resample(pcm, w.getframerate(), 16000).astype(np.int16)
    except (OSError, subprocess.SubprocessError):  # no espeak-ng: speech-like noise still runs the model
        rng = np.random.default_rng(0)
        return (rng.normal(0, 3000, 16000 * 3)).astype(np.int16)


def _measure(n_streams: int, chunks: int, source: np.ndarray, silent_fraction: float) -> dict[str, float]:
    vad = BatchedVad()
    n_win = len(source) // WINDOW
    rng = np.random.default_rng(n_streams)
    offsets = rng.integers(0, n_win, n_streams)
    silent = rng.random((chunks, n_streams)) < silent_fraction
    zero = np.zeros(WINDOW, np.int16)
    wins = [source[i * WINDOW:(i + 1) * WINDOW] for i in range(n_win)]
    batch_lists = []
    for c in range(chunks):
        batch_lists.append([(s, zero if silent[c, s] else wins[(offsets[s] + c) % n_win])
                            for s in range(n_streams)])
    vad.process(batch_lists[0])  # warm-up (first call allocates)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for batch in batch_lists[1:]:
        vad.process(batch)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    per = (chunks - 1) * n_streams
    return {"streams": n_streams, "cpu_us_per_chunk_stream": round(cpu / per * 1e6, 1),
            "wall_us_per_chunk_stream": round(wall / per * 1e6, 1),
            "gated_fraction": round(vad.stats.gated / max(vad.stats.chunks, 1), 3)}


class _NullLive:
    """Accepts everything, answers nothing: isolates the worker's own cost from the Live layer's."""

    state = "live"
    resume_handle = None
    server_session_id = None

    def __init__(self, *_a: object, **_k: object) -> None:
        pass

    async def start(self) -> None:
        pass

    def send_audio(self, _pcm: bytes) -> None:
        pass

    def activity_start(self) -> None:
        pass

    def activity_end(self) -> None:
        pass

    def send_text(self, _text: str) -> None:
        pass

    def send_tool_response(self, _responses: object) -> bool:
        return True

    async def close(self) -> None:
        pass


async def _worker_ticks(sessions: int, seconds: float, source: np.ndarray) -> dict[str, float]:
    import uuid

    from appliance.config import load_config, replace
    from shm.segment import ShardSegment, cleanup_stale, segment_name
    from workers.ai.worker import AiWorker

    iid = f"bench{os.getpid()}x{uuid.uuid4().hex[:6]}"
    seg = ShardSegment.create(segment_name(iid, 0), slots=sessions, uplink_bytes=64000,
                              downlink_bytes=384000, instance_id=iid)
    try:
        cfg = replace(load_config(None, env={}), model={"greeting": "", "hold_prompt": ""},
                      compliance={"ai_disclosure": False, "ai_disclosure_off_reason": "benchmark"})
        w = AiWorker(cfg, seg, live_factory=_NullLive)
        for i in range(sessions):
            seg.slot(i).activate(session_id=f"b{i}", local_rtp_port=40000 + 2 * i, remote_rtp_ip="127.0.0.1",
                                 remote_rtp_port=20000, payload_type=111, channels=1, dtmf_payload_type=-1,
                                 mode="direct", options={})
        # realistic duty: each caller speaks ~40 % of the time (speech 2 s, silence 3 s), phases staggered
        period = 16000 * 5
        frames = []
        for t in range(int(seconds * 50)):
            row = []
            for i in range(sessions):
                pos = (t * 320 + i * 7919) % period
                if pos < 32000:
                    off = pos % (len(source) - 320)
                    row.append(source[off:off + 320].tobytes())
                else:
                    row.append(bytes(640))
            frames.append(row)
        w.tick()
        await asyncio.sleep(0)
        cpu0 = time.process_time()
        for row in frames:
            for i, f in enumerate(row):
                seg.slot(i).uplink.write(f)
            w.tick()
        cpu = time.process_time() - cpu0
        # the uplink writes are the media worker's cost: measure and subtract them
        cpu1 = time.process_time()
        for row in frames:
            for i, f in enumerate(row):
                seg.slot(i).uplink.write(f)
            for i in range(sessions):
                seg.slot(i).uplink.skip(640)
        writes = time.process_time() - cpu1
        await w.shutdown()
    finally:
        seg.close()
        cleanup_stale(iid)
    own = max(cpu - writes, 0.0)
    return {"sessions": sessions, "audio_seconds": seconds, "duty": "realistic (40 % speech)",
            "cpu_ms_per_session_second": round(own * 1000 / (sessions * seconds), 3),
            "activity_starts": w.stats.activity_starts}


def run(args: argparse.Namespace) -> dict:
    """Measure and return {"worst": [...], "realistic": [...], ...} rows per stream count."""
    if args.smoke:
        args.batches, args.chunks = [1, 64], 20
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    source = _speech()
    # worst case: a noise floor above the energy gate, so every chunk reaches the network
    noisy = np.clip(source + np.random.default_rng(1).normal(0, 200, len(source)), -32768, 32767)
    noisy = noisy.astype(np.int16)
    out: dict[str, object] = {"bench": "vad", "chunk_ms": 32, "model": "silero_vad.onnx"}
    for name, src, frac in (("worst", noisy, 0.0), ("realistic", source, 0.4)):
        out[name] = [_measure(b, args.chunks, src, frac) for b in args.batches]
    if args.worker_sessions > 0:
        secs = 2.0 if args.smoke else args.worker_seconds
        out["worker_tick"] = asyncio.run(_worker_ticks(args.worker_sessions, secs, source))
    rows = {r["streams"]: r["cpu_us_per_chunk_stream"] for r in out["worst"]}  # type: ignore[index]
    if 1 in rows and 64 in rows:
        out["b1_us"] = rows[1]
        out["b64_us"] = rows[64]
    return out


def main(args: argparse.Namespace) -> int:
    res = run(args)
    if getattr(args, "json", False):
        print(json.dumps(res))
    else:
        for name in ("worst", "realistic"):
            for r in res[name]:  # type: ignore[union-attr]
                us = r["cpu_us_per_chunk_stream"]
                gated = r["gated_fraction"]
                print(f"{name:10s} B={r['streams']:3d}  cpu {us:7.1f} µs/chunk/stream  gated {gated:.2f}")
        if "worker_tick" in res:
            print("worker tick", json.dumps(res["worker_tick"]))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    raise SystemExit(main(p.parse_args()))
