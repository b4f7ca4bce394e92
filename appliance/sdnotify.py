"""systemd notification protocol (READY=1, WATCHDOG=1, STATUS=…, STOPPING=1) over ``$NOTIFY_SOCKET``.

The protocol is one datagram of ``KEY=VALUE`` lines on an AF_UNIX socket whose path (or abstract name,
``@…``) systemd puts in ``$NOTIFY_SOCKET``; ``$WATCHDOG_USEC`` says how often to ping. That is a dozen
lines of stdlib code, so no dependency (python-systemd needs libsystemd headers; sdnotify is unmaintained).
Without ``$NOTIFY_SOCKET`` (supervisord, a terminal, tests) every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends sd_notify messages; silently does nothing when not run by systemd (Type=notify)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if path.startswith("@"):
            self._addr = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._addr = path
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        valid = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_seconds: float | None = int(usec) / 1e6 if valid else None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` fields (``notify(READY=1, STATUS="x")``); True if a datagram was sent."""
        if self._addr is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self._addr)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, STATUS=status) if status else self.notify(READY=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
