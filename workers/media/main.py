"""`voice-appliance media-worker --shard K --segment NAME [--cpu N] [--config PATH]`.

Started (and restarted) by the supervisor's arbiter. Exits 0 on SIGTERM/SIGINT, 2 on bad
configuration or a missing/incompatible segment (the arbiter logs it and retries with backoff).
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys

from appliance.config import ConfigError, load_config
from shm.segment import ShardSegment, ShmError
from workers.media import opus
from workers.media.worker import MediaWorker, pin_cpu, set_realtime

log = logging.getLogger("media.main")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", type=int, required=True, help="shard number K")
    parser.add_argument("--segment", required=True, help="shared-memory segment name (/va-<instance>-s<K>)")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to CPU N")
    parser.add_argument("--config", default=None, help="config file (default: $VA_CONFIG or /etc/...)")
    parser.add_argument("--host", default=None, help="address to bind RTP sockets (default: media.rtp_host)")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        pin_cpu(args.cpu)
    except (OSError, ValueError) as exc:
        print(f"cannot pin to CPU {args.cpu}: {exc}", file=sys.stderr)
        return 2
    rt = set_realtime(cfg.media.realtime_priority)
    if cfg.media.realtime_priority and not rt:
        log.warning("media.realtime_priority set but SCHED_RR not permitted (needs CAP_SYS_NICE); "
                    "running at normal priority", extra={"priority": cfg.media.realtime_priority})
    try:
        seg = ShardSegment.attach(args.segment)
    except ShmError as exc:
        print(f"media worker: {exc}", file=sys.stderr)
        return 2
    try:
        opus.lib()
    except OSError as exc:
        print(f"media worker: {exc}", file=sys.stderr)
        return 2
    stop = False

    def _stop(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worker = MediaWorker(seg, cfg.media, host=args.host, frame_log_ratio=cfg.log.frame_sample_ratio)
    # Everything allocated so far lives for the process lifetime: keep it out of the cyclic GC's scans
    # so a full collection never stalls a tick (the hot path allocates almost no containers).
    gc.collect()
    gc.freeze()
    log.info("media worker started", extra={"shard": args.shard, "segment": args.segment, "cpu": args.cpu,
                                            "opus": opus.version(), "slots": seg.n_slots,
                                            "realtime": rt})
    try:
        worker.run(lambda: stop)
    finally:
        worker.close()
        seg.close()
    log.info("media worker stopped", extra={"shard": args.shard})
    return 0
