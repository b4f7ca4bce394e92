"""JSON structured logging: one JSON object per line on stderr, so journald and log shippers parse it.

Extra context goes through the standard ``extra=`` argument (``log.info("x", extra={"session": sid})``);
every non-standard record attribute is emitted as a top-level key.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

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
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


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
