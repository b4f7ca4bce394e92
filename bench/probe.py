"""Benchmark probe: pipeline event timestamps sent to the pipeline benchmark as tiny UDP datagrams.

Latencies (a) "last speech → activityEnd sent", (b) "first model audio at the AI worker → first RTP" and
(c) "barge-in → flush" start or end *inside* the workers, so the benchmark needs their clock readings.
The workers call :func:`mark` at those points; it is a no-op (one global check) unless the environment
has ``VA_BENCH_PROBE=127.0.0.1:PORT``, which only ``voice-appliance bench pipeline`` sets. A datagram
(~3 µs, never blocks, errors ignored) keeps the workers free of any benchmark state and needs no shared
memory field; CLOCK_MONOTONIC is the same clock in every process of the box, so the benchmark can
subtract the load generator's own readings from these.

Wire format: ``!Bq`` (event code, ``time.monotonic_ns()``) followed by the session id (UTF-8).

The AI worker already keeps ``call.last_event[name] = time.monotonic()`` at exactly the points the
benchmark needs; :func:`event_times` returns a plain ``dict`` for it (benchmark off: zero cost) or an
:class:`EventTimes` dict that also reports the event (benchmark on), so the worker needs one call.
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
# (the media worker's playback pause needs no probe: the caller measures the silence itself)

FORMAT = struct.Struct("!Bq")
# ``call.last_event`` keys of the AI worker → event codes
EVENT_NAMES: dict[str, int] = {
    "activity_start": ACTIVITY_START,
    "activity_end": ACTIVITY_END,
    "first_audio": MODEL_AUDIO,
    "barge_in": FLUSH,
    "interrupted": FLUSH,
}

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


def mark(event: int, session_id: str, t_ns: int | None = None) -> None:
    """Report ``event`` of ``session_id`` now (or at ``t_ns``); does nothing unless the benchmark runs."""
    if _sock is None:
        return
    t = time.monotonic_ns() if t_ns is None else t_ns
    try:
        _sock.sendto(FORMAT.pack(event, t) + session_id.encode()[:64], _target)
    except OSError:
        pass


def parse(data: bytes) -> tuple[int, int, str] | None:
    """(event, t_ns, session_id) of one datagram, or None if it is not one."""
    if len(data) <= FORMAT.size:
        return None
    event, t_ns = FORMAT.unpack_from(data)
    return event, t_ns, data[FORMAT.size :].decode(errors="replace")


class EventTimes(dict[str, float]):
    """A ``name → time.monotonic()`` dict that also reports the names in :data:`EVENT_NAMES`."""

    __slots__ = ("session_id",)

    def __init__(self, session_id: str) -> None:
        super().__init__()
        self.session_id = session_id

    def __setitem__(self, name: str, value: float) -> None:
        super().__setitem__(name, value)
        code = EVENT_NAMES.get(name)
        if code is not None:
            mark(code, self.session_id, int(value * 1e9))


def event_times(session_id: str) -> dict[str, float]:
    """What the AI worker stores a call's event times in: a plain dict unless the benchmark runs."""
    return EventTimes(session_id) if _sock is not None else {}


configure(os.environ.get(ENV))
