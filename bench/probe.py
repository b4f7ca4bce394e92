"""Benchmark probe: pipeline event timestamps sent to the pipeline benchmark as tiny UDP datagrams.

Latencies (a) "last speech → activityEnd sent", (b) "first model audio at the AI worker → first RTP" and
(c) "barge-in → flush" start or end *inside* the workers, so the benchmark needs their clock readings.
The workers call :func:`mark` at those points; it is a no-op (one global check) unless the environment
has ``VA_BENCH_PROBE=127.0.0.1:PORT``, which only ``voice-appliance bench pipeline`` sets. A datagram
(~3 µs, never blocks, errors ignored) keeps the workers free of any benchmark state and needs no shared
memory field; CLOCK_MONOTONIC is the same clock in every process of the box, so the benchmark can
subtract the load generator's own readings from these.

Wire format: ``!BHHq`` = event code, shard, slot, ``time.monotonic_ns()``.
"""

from __future__ import annotations

import os
import socket
import struct
import time

ENV = "VA_BENCH_PROBE"

ACTIVITY_START = 1  # AI worker sent activityStart (caller speech onset)
ACTIVITY_END = 2  # AI worker sent activityEnd (end of the caller's turn)
MODEL_AUDIO = 3  # AI worker received the first model audio of a model turn
FLUSH = 4  # AI worker requested a downlink flush (barge-in or the model's interrupted)

FORMAT = struct.Struct("!BHHq")

_sock: socket.socket | None = None
_target: tuple[str, int] | None = None


def configure(spec: str | None) -> None:
    """Enable the probe towards ``host:port`` (``None``/empty disables it)."""
    global _sock, _target
    if _sock is not None:
        _sock.close()
    _sock, _target = None, None
    if not spec:
        return
    host, _, port = spec.rpartition(":")
    _target = (host or "127.0.0.1", int(port))
    _sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _sock.setblocking(False)


def enabled() -> bool:
    return _sock is not None


def mark(event: int, shard: int, slot: int, t_ns: int | None = None) -> None:
    """Report ``event`` for (shard, slot) now (or at ``t_ns``); does nothing unless the benchmark runs."""
    if _sock is None:
        return
    try:
        _sock.sendto(FORMAT.pack(event, shard, slot, time.monotonic_ns() if t_ns is None else t_ns), _target)
    except OSError:
        pass


configure(os.environ.get(ENV))
