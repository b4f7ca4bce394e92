"""Read deadlines for the public HTTP server (uvicorn's h11 protocol with two timers added).

Why: uvicorn closes an *idle keep-alive* connection after ``timeout_keep_alive``, but has no deadline
for reading a request: a client that opens a connection and sends half a request head (slow-loris), or
a head and then a trickle of body, holds the connection and its memory forever (measured before this
module: 300 half-open connections held for 30 s and never closed). :class:`DeadlineH11Protocol` arms

- a **header deadline** (``api.header_timeout_seconds``) when a connection opens and again when a
  response completes (the next request's head must arrive in time — after ``timeout_keep_alive`` of
  silence uvicorn closes the connection anyway), cancelled once h11 has the whole head;
- a **body deadline** (``api.body_timeout_seconds``) from the end of the head to the end of the body.

When one expires the connection is closed (no response: the client is not speaking HTTP at the rate a
client does) and ``va_api_read_timeouts_total{phase}`` counts it. Request heads are capped at
:data:`MAX_HEADER_BYTES` by h11 itself (431/400 beyond), bodies by the API (``api.max_body_bytes``).
TLS handshakes are bounded by asyncio's ``ssl_handshake_timeout`` (60 s) before this protocol runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from prometheus_client import Counter
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.config import ApiConfig

MAX_HEADER_BYTES = 16384

READ_TIMEOUTS = Counter("va_api_read_timeouts_total", "Connections closed for reading a request too slowly",
                        ["phase"])


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body read deadlines (see the module docstring)."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._phase = ""

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._read_timer = self.loop.call_later(seconds, self._read_expired)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._phase = ""

    def _read_expired(self) -> None:
        self._read_timer = None
        if self.transport is not None and not self.transport.is_closing():
            READ_TIMEOUTS.labels(self._phase or "header").inc()
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("header", self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm("header", self.header_timeout)
            self._track()  # a pipelined request may already be in

    def _track(self) -> None:
        """Move the deadline along with h11's view of the request being read."""
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase == "header":
            self._arm("body", self.body_timeout)
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR) and self._phase:
            self._disarm()  # the whole request is in: the app's own deadlines take over


def protocol_class(cfg: ApiConfig) -> type[DeadlineH11Protocol]:
    """A :class:`DeadlineH11Protocol` subclass carrying ``cfg``'s deadlines (uvicorn takes a class)."""
    return type("ApiH11Protocol", (DeadlineH11Protocol,), {
        "header_timeout": cfg.header_timeout_seconds, "body_timeout": cfg.body_timeout_seconds})


def uvicorn_kwargs(cfg: ApiConfig) -> dict[str, Any]:
    """The uvicorn.Config arguments that bound what one client can hold."""
    return {
        "http": protocol_class(cfg),
        "timeout_keep_alive": cfg.keepalive_timeout_seconds,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "limit_concurrency": cfg.max_connections,
    }
