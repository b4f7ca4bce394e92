"""`voice-appliance bench live`: the Live session layer under load, and what the SDK costs per message.

Two parts:
- ``per_message_us``: CPU per message of the SDK path (``send_realtime_input``, pydantic parse) against
  the layer's fast path (hand-built JSON, hand parse) — the numbers behind the fast-path decision.
- the load run: one process (this one) holds ``--sessions`` Live sessions on one asyncio loop against the
  emulator (a separate process, so its CPU is not counted). One 20 ms tick, like the AI worker's, feeds
  every session a frame; each caller talks ``--talk-s`` (manual activity) then pauses ``--pause-s`` while
  the emulator echoes in real time. Reported: this process's CPU (cores, and ms per session per second of
  audio), tick lateness (how late the 20 ms tick ran: p50/p99/max), the layer's queue delay from a chunk
  being complete to it being on the socket, audio received, turns, reconnects and failures.
``--smoke`` is the short CI form (20 sessions, 3 s); the default is 200 sessions for 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from appliance.emulator.process import run_emulator

FRAME = 640  # 20 ms at 16 kHz


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", type=int, default=200, help="concurrent Live sessions (default 200)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured streaming time (default 20)")
    p.add_argument("--talk-s", type=float, default=2.0, help="caller talk spurt length")
    p.add_argument("--pause-s", type=float, default=2.0, help="pause while the model echoes")
    p.add_argument("--sdk", action="store_true", help="use the SDK send/parse path instead of the fast path")
    p.add_argument("--smoke", action="store_true", help="short CI form: 20 sessions for 3 s")
    p.add_argument("--no-micro", action="store_true", help="skip the per-message micro-benchmark")


# --- per-message costs -----------------------------------------------------------------------------
class _CaptureWs:
    async def send(self, msg: str) -> None:
        pass


def _per_call_us(fn: Any, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return round(best, 1)


def per_message_costs(n: int = 3000) -> dict[str, float]:
    """µs of CPU per message: SDK vs fast path, sending a 40 ms chunk and parsing a 40 ms reply chunk."""
    import base64

    from google import genai
    from google.genai import types
    from google.genai.live import AsyncSession

    from workers.ai.live.outbox import Item, Kind
    from workers.ai.live.wire import AUDIO_MIME, FastWire, SdkWire, encode

    loop = asyncio.new_event_loop()
    try:
        client = genai.Client(api_key="k", http_options=types.HttpOptions(api_version="v1beta"))
        sdk = AsyncSession(api_client=client._api_client, websocket=_CaptureWs())  # type: ignore[arg-type]
        chunk = bytes(1280)
        blob = types.Blob(data=chunk, mime_type=AUDIO_MIME)
        ws = _CaptureWs()
        item = Item(1, Kind.AUDIO, chunk, 0.0)
        fast, slow = FastWire(), SdkWire()
        reply = json.dumps({"serverContent": {"modelTurn": {"parts": [{"inlineData": {
            "mimeType": "audio/pcm;rate=24000", "data": base64.b64encode(bytes(1920)).decode()}}]}}}).encode()

        def sdk_send() -> None:
            loop.run_until_complete(sdk.send_realtime_input(audio=blob))

        def fast_send() -> None:
            loop.run_until_complete(ws.send(encode(item)))

        def noop() -> None:
            loop.run_until_complete(ws.send(""))

        base = _per_call_us(noop, n)
        return {
            "sdk_send_40ms_us": round(_per_call_us(sdk_send, n) - base, 1),
            "fast_send_40ms_us": round(_per_call_us(fast_send, n) - base, 1),
            "sdk_parse_audio_us": _per_call_us(lambda: slow.decode(reply), n),
            "fast_parse_audio_us": _per_call_us(lambda: fast.decode(reply), n),
        }
    finally:
        loop.close()


# --- the emulator process ------------------------------------------------------------------------
@contextlib.contextmanager
def _emulator(state_dir: str, api_key: str) -> Any:
    args = ["--port", "0", "--api-key", api_key, "--state-dir", state_dir, "--pacing", "realtime"]
    with run_emulator(args) as child:
        yield child.proc.pid, child.base_url, child.ca_file


# --- the load run --------------------------------------------------------------------------------
def _cpu(pid: int) -> float:
    from bench.procstat import cpu_seconds

    return cpu_seconds(pid) or 0.0


async def _load(args: argparse.Namespace, base_url: str, ca_file: str, api_key: str, emu_pid: int) -> dict:
    import ssl

    from appliance.config import ModelConfig
    from workers.ai.live.events import AudioOut, Interrupted, LiveEvent, StateChanged, TurnComplete
    from workers.ai.live.session import LiveSession
    from workers.ai.live.settings import LiveOptions

    n, seconds = args.sessions, args.seconds
    ctx = ssl.create_default_context(cafile=ca_file)
    cfg = ModelConfig(api_key=api_key, base_url=base_url, ca_file=ca_file, chunk_ms=40)
    counters = {"audio_bytes": 0, "turns": 0, "interrupted": 0, "degraded": 0, "closed": 0}

    def on_event(ev: LiveEvent) -> None:
        match ev:
            case AudioOut(pcm24k=pcm):
                counters["audio_bytes"] += len(pcm)
            case TurnComplete():
                counters["turns"] += 1
            case Interrupted():
                counters["interrupted"] += 1
            case StateChanged(state="degraded" | "closed" as state):
                counters[state] += 1

    sessions = [
        LiveSession(cfg, f"bench-{i}", LiveOptions("Puck", "en-US", "bench"), on_event,
                      ssl_context=ctx, fast_path=not args.sdk)
        for i in range(n)
    ]
    t0 = time.monotonic()
    sem = asyncio.Semaphore(16)

    async def start(s: Any) -> None:
        async with sem:
            await s.start()

    results = await asyncio.gather(*(start(s) for s in sessions), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    connect_s = time.monotonic() - t0

    t = np.arange(FRAME // 2) / 16000
    frames = [(0.3 * 32767 * np.sin(2 * np.pi * f * t)).astype("<i2").tobytes() for f in (300, 450, 600)]
    talk, cycle = int(args.talk_s * 50), int((args.talk_s + args.pause_s) * 50)
    lateness: list[float] = []
    ticks = int(seconds * 50)
    cpu0, emu0 = time.process_time(), _cpu(emu_pid)
    start_t = time.monotonic()
    for k in range(ticks):
        due = start_t + k * 0.02
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.monotonic()
        lateness.append(now - due)
        for i, s in enumerate(sessions):
            phase = (k + i * 7) % cycle  # staggered, so turns do not all end on the same tick
            if phase == 0:
                s.activity_start()
            if phase < talk:
                s.send_audio(frames[i % 3])
            if phase == talk - 1:
                s.activity_end()
    wall = time.monotonic() - start_t
    cpu = time.process_time() - cpu0
    emu_cpu = _cpu(emu_pid) - emu0
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    lat_ms = np.array(lateness) * 1000
    delays = [s.stats.send_delay_sum / s.stats.send_delay_count for s in sessions if s.stats.send_delay_count]
    audio_s = n * seconds * args.talk_s / (args.talk_s + args.pause_s)
    return {
        "sessions": n,
        "fast_path": not args.sdk,
        "seconds": round(wall, 2),
        "connect_all_s": round(connect_s, 2),
        "start_failures": len(failed),
        "cpu_cores": round(cpu / wall, 3),
        "cpu_ms_per_session_second": round(cpu * 1000 / (n * wall), 3),
        "cpu_ms_per_caller_audio_second": round(cpu * 1000 / audio_s, 3),
        "emulator_cpu_cores": round(emu_cpu / wall, 3),
        "tick_lateness_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 2),
                             "p99": round(float(np.percentile(lat_ms, 99)), 2),
                             "max": round(float(lat_ms.max()), 2)},
        "send_queue_delay_ms": {"mean": round(float(np.mean(delays)) * 1000, 3) if delays else None,
                                "max": round(max(s.stats.send_delay_max for s in sessions) * 1000, 2)},
        "chunks_sent": sum(s.stats.chunks_sent for s in sessions),
        "model_audio_received_s": round(counters["audio_bytes"] / 48000, 1),
        "turns_completed": counters["turns"],
        "reconnects": sum(s.stats.reconnects for s in sessions),
        "degraded": counters["degraded"],
        "closed": counters["closed"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        args.sessions, args.seconds = min(args.sessions, 20), min(args.seconds, 3.0)
        args.talk_s, args.pause_s = 1.0, 1.0
    out: dict[str, Any] = {"machine_cpus": os.cpu_count()}
    if not args.no_micro:
        out["per_message_us"] = per_message_costs(1000 if args.smoke else 3000)
    api_key = "bench-key"
    with tempfile.TemporaryDirectory(prefix="va-bench-live-") as tmp:
        with _emulator(tmp, api_key) as (pid, url, ca):
            out.update(asyncio.run(_load(args, url, ca, api_key, pid)))
    return out
