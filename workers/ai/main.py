"""`voice-appliance ai-worker`: run one shard's AI worker (started and pinned by the supervisor).

Attaches the shard's shared-memory segment, pins itself to ``--cpu`` (sched_setaffinity, so a direct
run behaves like a supervised one), loads the VAD model once, prepares the cached prompts and runs
:class:`workers.ai.worker.AiWorker` until SIGTERM/SIGINT. Exit codes: 0 stopped cleanly, 2 bad
arguments/config, 3 segment missing or invalid.

Event loop: uvloop when installed (a pyproject dependency on Linux), else asyncio's own. The worker is one
loop carrying every call's TLS websocket: per Live message the stdlib loop's Python selector, transport
and SSL-protocol layers cost more than the message's own work, and uvloop (libuv, same asyncio API)
cut the AI worker's CPU by ~13 % at 40 sessions (docs/benchmarks.md, Pipeline, "CPU work").
``VA_AI_EVENT_LOOP=asyncio`` forces the stdlib loop (A/B measurements, or a fallback if uvloop misbehaves).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from appliance import tracing
from appliance.config import Config, ConfigError, load_config

log = logging.getLogger("workers.ai")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", type=int, required=True, help="shard number K")
    parser.add_argument("--segment", required=True, help="shared-memory segment name (/va-<instance>-s<K>)")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to CPU N")
    parser.add_argument("--config", default=None, help="config file (default: $VA_CONFIG or /etc/...)")


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(name, factory) of the event loop the worker runs on: uvloop unless unavailable or not wanted."""
    if os.environ.get("VA_AI_EVENT_LOOP", "").strip().lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", None


async def _amain(args: argparse.Namespace, cfg: Config) -> int:
    from appliance.breaker import model_breakers
    from shm.segment import ShardSegment, ShmError
    from workers.ai.greeting import PromptCache
    from workers.ai.live import guard
    from workers.ai.live.settings import client_settings
    from workers.ai.worker import AiWorker

    try:
        seg = ShardSegment.attach(args.segment)
    except ShmError as exc:
        log.error("cannot attach segment", extra={"error": str(exc), "shard": args.shard})
        return 3
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        cache_dir = Path(cfg.paths.state_dir) / "prompts"
        worker = AiWorker(cfg, seg, settings=client_settings(cfg), prompts=PromptCache(cache_dir),
                          journal_dir=args.journal_dir, shard=args.shard)
        guard.install(model_breakers(cfg))  # every Live connect asks its model's breaker (issue 15)
        await worker.prepare()
        seg.heartbeat("ai")
        log.info("AI worker running", extra={"shard": args.shard, "segment": args.segment,
                                             "slots": seg.n_slots, "cpu": args.cpu,
                                             "event_loop": type(loop).__module__.split(".")[0]})
        await worker.run(stop)
        log.info("AI worker stopped", extra={"shard": args.shard, "stats": vars(worker.stats)})
    finally:
        seg.close()
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (OSError, ValueError) as exc:
            print(f"cannot pin to CPU {args.cpu}: {exc}", file=sys.stderr)
            return 2
    # Yield the core to the deadline-driven media worker of this shard: before any thread exists (the
    # SDK import, onnxruntime), so every thread inherits it. Lowering one's own priority needs no privilege.
    if cfg.shards.ai_nice:
        try:
            os.nice(cfg.shards.ai_nice)
        except OSError as exc:
            log.warning("cannot lower priority", extra={"error": str(exc)})
    tracing.configure(cfg.otel.endpoint, cfg.otel.service_name, role="ai", timeout=cfg.otel.timeout_seconds)
    # the turn journal must outlive this process but not the machine: tmpfs
    args.journal_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(cfg.paths.run_dir)
    _, factory = loop_factory()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_amain(args, cfg))
    finally:
        tracing.shutdown()  # export the spans still queued
