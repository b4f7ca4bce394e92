"""JSON structured logging: one JSON object per line on stderr, so journald and log shippers parse it.

JSON is the default everywhere (``VA_LOG_FORMAT=text`` or ``[log] format = "text"`` for humans). Extra
context goes through the standard ``extra=`` argument (``log.info("x", extra={"session": sid})``); every
non-standard record attribute is emitted as a top-level key. A line that names a session also carries
its ``trace_id`` (derived from the session id, appliance/tracing.py, so logs and traces of a call join
even with tracing off) and, inside a traced span, that ``span_id``. Lifecycle events (session created /
caller connected / ended, worker started / exited) are one line each.

Per-frame debug lines (RTP, VAD windows) would cost the 20 ms tick more than the frame's work; they go
through a :class:`FrameSampler`: one level check, then a counter, so only ``log.frame_sample_ratio`` of
them (10 % by default) are formatted at all, and none unless DEBUG is on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from appliance.tracing import current_ids, trace_id_hex

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as a single JSON line with ts, level, logger, msg and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        session = out.get("session")
        if isinstance(session, str) and session and "trace_id" not in out:
            out["trace_id"] = trace_id_hex(session)
        ids = current_ids()
        if ids is not None:
            out.setdefault("trace_id", ids[0])
            if ids[0] == out["trace_id"]:
                out["span_id"] = ids[1]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class FrameSampler:
    """Debug lines on the per-frame path, sampled: ``if sampler.due(): log.debug(...)``.

    ``due()`` is a level check plus an integer step (~0.1 µs) and is true for every ``1/ratio``-th call
    while the logger is at DEBUG; ratio 0 turns frame lines off, 1 keeps them all.
    """

    __slots__ = ("_every", "_logger", "_n")

    def __init__(self, logger: logging.Logger, ratio: float = 0.1) -> None:
        self._logger = logger
        self._every = 0 if ratio <= 0 else max(1, round(1 / min(ratio, 1.0)))
        self._n = 0

    def due(self) -> bool:
        if not self._every or not self._logger.isEnabledFor(logging.DEBUG):
            return False
        self._n += 1
        if self._n >= self._every:
            self._n = 0
            return True
        return False


def setup_logging(level: str | None = None, *, json_output: bool | None = None) -> None:
    """Configure the root logger once per process. ``VA_LOG_FORMAT=text`` gives plain lines for humans."""
    level = (level or os.environ.get("VA_LOG_LEVEL") or "info").upper()
    if json_output is None:
        json_output = os.environ.get("VA_LOG_FORMAT", "json") != "text"
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
