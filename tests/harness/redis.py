"""A real redis-server for tests: own port, own tmp dir, stopped by PID.

    with redis_server(tmp_path) as srv:
        client = redis.asyncio.from_url(srv.url)
        srv.stop(); srv.start()       # same port and dir: "Redis briefly unreachable"
        srv.pause(); srv.resume()     # SIGSTOP/SIGCONT: connections hang instead of being refused
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.procs import pid_gone

REDIS_SERVER = "/usr/bin/redis-server"


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` and never returned before in this process.

    The kernel may give the same ephemeral port to two back-to-back ``bind(0)`` calls once the first
    socket is closed; a test that takes several ports before starting its servers then had two servers on
    one port (seen in CI: the API and the emulator both given 44369).
    """
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no fresh free port")


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    return not pid_gone(pid)



class RedisServer:
    """One redis-server process; ``url`` points at it."""

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 5.0) -> None:
        """Start (or restart) on the same port; returns when it answers PING."""
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(self.port), "--bind", self.host, "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                "--repl-diskless-sync-delay", "0", "--loglevel", "warning",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError("redis-server did not answer PING")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop by PID (SIGTERM, then SIGKILL) and wait until the process is gone."""
        if not self.proc:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        assert not _alive(proc.pid), "redis-server still running"

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (timeouts, not refusals)."""
        assert self.proc
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc
        os.kill(self.proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def redis_server(workdir: Path, port: int | None = None) -> Iterator[RedisServer]:
    """Start a redis-server in ``workdir`` on a free port; always stopped on exit."""
    srv = RedisServer(workdir, port)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class TcpLink:
    """An asyncio TCP forwarder in front of a server, to cut ONE client's link (a partition) while the
    server keeps serving everyone else. ``cut()`` drops every connection and refuses new ones until
    ``restore()``. Runs in the test's event loop."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._server: Any = None
        self._writers: set[Any] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        import asyncio

        async def pipe(reader: Any, writer: Any) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(reader: Any, writer: Any) -> None:
            try:
                up_r, up_w = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            self._writers.update((writer, up_w))
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
            self._writers.difference_update((writer, up_w))

        self._server = await asyncio.start_server(handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        await self.cut()
