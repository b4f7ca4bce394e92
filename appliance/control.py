"""The supervisor's local control socket and `voice-appliance drain` (what upgrade.yml runs on a box).

Why a unix socket and not signals: a rolling upgrade needs answers (how many calls are left, did the
migration finish), and a signal carries none. The socket is ``<paths.run_dir>/control.sock``, mode 0600
(only root and the service user can drain the box); nothing listens on the network.

Protocol: one JSON object per line each way. Requests ``{"cmd": "status" | "drain" | "undrain" |
"migrate" | "restart"}`` (``restart``: re-exec the supervisor in place, calls kept — `voice-appliance
restart`, ``appliance.restart``); every reply is the status ``{"ok": true, "draining": bool, "active": int,
"migrating": int}`` (or ``{"ok": false, "error": "..."}``).

``voice-appliance drain --wait --timeout N --migrate`` = drain (the agent check says ``drain``, new calls
go elsewhere), wait up to N seconds (default ``api.drain_timeout_seconds``) for calls to end, then, with
``--migrate``, tell every remaining call to move (``migrating`` + fresh resume token; docs/architecture.md
"Drain and force-migrate") and wait until they have resumed elsewhere (at most
``api.migrate_grace_seconds`` + 5 s). Exit 0 when the box is empty, 1 when calls remain, 2 when the
supervisor cannot be reached. ``voice-appliance drain --undrain`` takes new calls again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from appliance.config import Config, load_for_cli

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[dict[str, Any]]]


def socket_path(cfg: Config) -> Path:
    return Path(cfg.paths.run_dir) / "control.sock"


class ControlServer:
    """Serve control requests on a unix socket; ``handler(cmd)`` returns the status reply."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a previous run
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, str(self.path))
        finally:
            os.umask(old)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    cmd = req.get("cmd") if isinstance(req, dict) else None
                    if cmd not in ("status", "drain", "undrain", "migrate", "restart"):
                        reply: dict[str, Any] = {"ok": False, "error": f"unknown command {cmd!r}"}
                    else:
                        reply = {"ok": True, **await self._handler(cmd)}
                except ValueError:
                    reply = {"ok": False, "error": "request is not JSON"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except Exception:  # a broken client must not hurt the supervisor
            log.exception("control request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def request(path: Path, cmd: str) -> dict[str, Any]:
    """Send one command to the supervisor at ``path``; its reply (5 s at most)."""
    async with asyncio.timeout(5.0):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(json.dumps({"cmd": cmd}).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
    reply: dict[str, Any] = json.loads(line)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "control request refused"))
    return reply


async def _wait_empty(path: Path, seconds: float, poll: float = 0.5) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    status = await request(path, "status")
    while status["active"] and time.monotonic() < deadline:
        await asyncio.sleep(poll)
        status = await request(path, "status")
    return status


async def drain(cfg: Config, *, wait: bool, wait_seconds: float | None, migrate: bool,
                undrain: bool = False) -> tuple[int, dict[str, Any]]:
    """What `voice-appliance drain` does (module docstring): (exit code, last status)."""
    path = socket_path(cfg)
    if undrain:
        status = await request(path, "undrain")
        return 0, status
    status = await request(path, "drain")
    if wait or migrate:
        limit = cfg.api.drain_timeout_seconds if wait_seconds is None else wait_seconds
        status = await _wait_empty(path, limit)
    if migrate and status["active"]:
        await request(path, "migrate")
        status = await _wait_empty(path, cfg.api.migrate_grace_seconds + 5)
    return (0 if not status["active"] or not (wait or migrate) else 1), status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")
    parser.add_argument("--wait", action="store_true", help="wait until no call is left (or --timeout)")
    parser.add_argument("--timeout", type=float, help="seconds to wait (default: api.drain_timeout_seconds)")
    parser.add_argument("--migrate", action="store_true",
                        help="after the wait, tell the remaining callers to resume on another box")
    parser.add_argument("--undrain", action="store_true", help="end the drain: take new calls again")


def run_cli(config: str | None,
            command: Callable[[Config], Coroutine[Any, Any, tuple[int, dict[str, Any]]]]) -> int:
    """The body of `drain` and `restart`: load the config, run ``command`` against the supervisor's
    control socket, print its status as JSON; 2 when the config does not load or the supervisor does
    not answer."""
    cfg = load_for_cli(config)
    if cfg is None:
        return 2
    try:
        code, status = asyncio.run(command(cfg))
    except (OSError, TimeoutError, RuntimeError, ValueError) as exc:
        print(f"cannot reach the supervisor at {socket_path(cfg)}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in status.items() if k != "ok"}))
    return code


def main(args: argparse.Namespace) -> int:
    return run_cli(args.config, lambda cfg: drain(cfg, wait=args.wait, wait_seconds=args.timeout,
                                                  migrate=args.migrate, undrain=args.undrain))
