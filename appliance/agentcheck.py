"""HAProxy agent-check responder: tells the load balancer how much this box can still take.

HAProxy (``server … agent-check agent-port N agent-inter 1s``) opens a TCP connection, reads one line
and closes. We answer ``up N%`` with N = free capacity (so new calls go to emptier boxes; HAProxy scales
the server weight by it; a full box says ``up 0%`` and gets no new calls), and ``drain`` while draining
(existing calls stay, no new ones). Only ``ready`` clears a drain in HAProxy, but ``ready`` also clears an
operator's manual drain, so we add it only once we have ever said ``drain`` ourselves.

A plain asyncio server: the protocol is one line, nothing a library would add.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def agent_reply(free_fraction: float, draining: bool, was_drained: bool = False) -> str:
    """The agent line: ``drain``, or ``up N%`` (N clamped to 0-100; ``ready up N%`` after our own drain)."""
    if draining:
        return "drain\n"
    pct = max(0, min(100, round(free_fraction * 100)))
    return f"{'ready ' if was_drained else ''}up {pct}%\n"


class AgentCheckServer:
    """Serve :func:`agent_reply` of a live state on ``host:port``."""

    def __init__(self, state: Callable[[], tuple[float, bool]], host: str, port: int) -> None:
        self._state = state
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._was_drained = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("agent check listening", extra={"host": self.host, "port": self.port})

    def force_ready(self) -> None:
        """Say ``ready`` from now on: an explicit undrain (`voice-appliance drain --undrain`) must also clear
        the drain HAProxy remembers from before a restart, when this process never said ``drain``."""
        self._was_drained = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            free, draining = self._state()
            writer.write(agent_reply(free, draining, self._was_drained).encode())
            self._was_drained = self._was_drained or draining
            await writer.drain()
        except Exception:  # never let a probe hurt the supervisor
            log.exception("agent check reply failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
