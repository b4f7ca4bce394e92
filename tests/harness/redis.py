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

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = extra_args or []
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
                "--repl-diskless-sync-delay", "0", "--loglevel", "warning", *self.extra_args,
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
                if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
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


class SentinelSet:
    """A Redis primary + replica and 3 redis-sentinel processes on loopback, ephemeral ports
    (``down-after-milliseconds 1000``: a killed primary is replaced in ~2-3 s).

    ``users`` adds ACL users (``["va on >pw ~va:* +@all"]``) on both data nodes; the default user stays
    open for replication and the Sentinels (what the tests here need; the fleet roles lock it down).
    """

    MASTER = "va"

    def __init__(self, workdir: Path, users: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        acl: list[str] = []
        for user in users or []:
            acl += ["--user", *user.split()]
        self.primary = RedisServer(self.workdir / "primary", extra_args=acl)
        self.replica = RedisServer(self.workdir / "replica",
                                   extra_args=[*acl, "--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for i, port in enumerate(self.sentinel_ports):
            d = self.workdir / f"sentinel{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"  # Sentinel rewrites its own config: one writable file each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode no\ndir {d}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 5000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n")
            log = open(d / "sentinel.log", "ab")
            self.sentinels.append(subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                                   stdout=log, stderr=subprocess.STDOUT))
            log.close()
        self.wait_ready()

    def _sentinel(self, port: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)

    def master_port(self) -> int | None:
        """The primary's port as the first Sentinel that answers reports it."""
        import redis

        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError, OSError), self._sentinel(port) as r:
                addr = r.sentinel_get_master_addr_by_name(self.MASTER)
                if addr:
                    return int(addr[1])
        return None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every Sentinel knows the replica and the two other Sentinels (else no failover)."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = 0
            for port in self.sentinel_ports:
                with contextlib.suppress(redis.RedisError, OSError), self._sentinel(port) as r:
                    info = r.sentinel_master(self.MASTER)
                    if int(info.get("num-slaves", 0)) >= 1 and int(info.get("num-other-sentinels", 0)) >= 2:
                        ok += 1
            if ok == len(self.sentinel_ports):
                return
            time.sleep(0.1)
        raise RuntimeError("Sentinels did not discover the replica and each other")

    def kill_primary(self) -> None:
        """SIGKILL the primary (no shutdown, no last sync): what a dead data box looks like."""
        assert self.primary.proc
        proc, self.primary.proc = self.primary.proc, None
        proc.kill()
        proc.wait(5)

    def stop(self) -> None:
        for proc in self.sentinels:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.sentinels.clear()
        self.replica.stop()
        self.primary.stop()


@contextlib.contextmanager
def sentinel_set(workdir: Path, users: list[str] | None = None) -> Iterator[SentinelSet]:
    s = SentinelSet(workdir, users)
    try:
        s.start()
        yield s
    finally:
        s.stop()
