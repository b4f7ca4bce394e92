"""The supervisor's record writer: spool directories → PostgreSQL, in batches, idempotently.

One asyncio task. Each pass takes up to ``records.batch_items`` items from each producer directory
under the spool root (AI worker shards first, the supervisor's own directory last, so a call's
``call.ended`` tends to land after its last transcript line), stores them in one transaction
(``store.apply_items``), commits, and only then acknowledges them to the spool, which deletes fully
shipped sealed segments. A database error rolls back, drops the connection and retries with backoff
(0.5 s doubling to 10 s): nothing is acknowledged, nothing lost; the spool keeps growing up to its
bound meanwhile. Item ids make a re-shipped batch (after a crash between commit and ack) a no-op.

Metrics (base units, no per-call labels): ``va_records_spool_bytes``, ``va_records_spool_dropped_total``,
``va_records_items_written_total``, ``va_records_write_errors_total``, ``va_records_database_up``,
``va_records_batch_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge, Histogram

from appliance.config import Config, secret
from appliance.records import store
from appliance.records.spool import SpoolReader

log = logging.getLogger(__name__)

SPOOL_BYTES = Gauge("va_records_spool_bytes", "Bytes waiting in the local record spool")
SPOOL_DROPPED = Counter("va_records_spool_dropped_total",
                        "Record items dropped because the spool was full (alert on any increase)")
ITEMS_WRITTEN = Counter("va_records_items_written_total", "Record items committed to PostgreSQL")
WRITE_ERRORS = Counter("va_records_write_errors_total", "Failed record batches (retried)")
DB_UP = Gauge("va_records_database_up", "1 while the record writer's last database round trip worked")
BATCH_SECONDS = Histogram("va_records_batch_seconds", "Time to store and commit one batch",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


class Database:
    """One lazily (re)connected async connection with a lock (the writer's, or the admin API's)."""

    def __init__(self, dsn: str, password: str = "", *, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.password = password
        self.connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, cfg: Config) -> Database:
        return cls(cfg.records.dsn, secret("", cfg.records.password_file))

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            # autocommit: every write is an explicit ``conn.transaction()`` (a real BEGIN/COMMIT; in
            # psycopg's default mode it would be a savepoint inside an implicit, uncommitted transaction)
            kwargs: dict[str, Any] = {"connect_timeout": max(1, int(self.connect_timeout)),
                                      "application_name": "voice-appliance", "autocommit": True}
            if self.password:
                kwargs["password"] = self.password
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, **kwargs)
        return self._conn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection to use alone; on any error it is closed (the next use reconnects)."""
        async with self._lock:
            conn = await self._connect()
            try:
                yield conn
            except BaseException:
                await self.discard()
                raise

    async def discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        await self.discard()


class RecordWriter:
    """Ships every producer directory under ``root`` (see the module docstring)."""

    def __init__(self, db: Database, root: Path, *, batch_items: int = 500, webhooks: bool = False,
                 idle_seconds: float = 0.25) -> None:
        self.db = db
        self.root = root
        self.batch_items = batch_items
        self.webhooks = webhooks
        self.idle_seconds = idle_seconds
        self._readers: dict[Path, SpoolReader] = {}
        self.migrated = False
        self.written = 0
        self.errors = 0
        self.wake = asyncio.Event()

    def readers(self) -> list[SpoolReader]:
        try:
            dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        dirs.sort(key=lambda p: p.name == "supervisor")  # shards first (see the module docstring)
        out = []
        for d in dirs:
            r = self._readers.get(d)
            if r is None:
                r = self._readers[d] = SpoolReader(d)
            out.append(r)
        return out

    def spool_bytes(self) -> int:
        return sum(r.size_bytes() for r in self.readers())

    async def ship_once(self) -> int:
        """One pass; returns the number of items committed. Raises on database errors."""
        total = 0
        async with self.db.connection() as conn:
            if not self.migrated:
                await store.migrate(conn)
                self.migrated = True
            for reader in self.readers():
                batch = await asyncio.to_thread(reader.read_batch, self.batch_items)
                if not batch.ends:
                    continue
                t0 = time.perf_counter()
                if batch.items:
                    async with conn.transaction():
                        stats = await store.apply_items(conn, batch.items, webhooks=self.webhooks)
                    if stats.dropped_reported:
                        SPOOL_DROPPED.inc(stats.dropped_reported)
                    BATCH_SECONDS.observe(time.perf_counter() - t0)
                reader.ack(batch)
                total += len(batch.items)
                self.written += len(batch.items)  # committed (a re-ship after a lost ack counts again)
                ITEMS_WRITTEN.inc(len(batch.items))
        DB_UP.set(1)
        return total

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                n = await self.ship_once()
                backoff = 0.5
            except (psycopg.Error, OSError) as exc:
                self.errors += 1
                WRITE_ERRORS.inc()
                DB_UP.set(0)
                if self.errors == 1 or self.errors % 20 == 0:
                    log.warning("record writer: database unavailable; records wait in the spool",
                                extra={"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                       "retry_seconds": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            except store.SchemaError as exc:
                log.error("record writer stopped: %s", exc)
                return
            with contextlib.suppress(Exception):
                SPOOL_BYTES.set(await asyncio.to_thread(self.spool_bytes))
            if n < self.batch_items:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.idle_seconds)
                self.wake.clear()

    async def drain(self, limit_seconds: float) -> bool:
        """Ship until the spool is empty or ``limit_seconds`` pass (stop, tests). True if empty."""
        deadline = time.monotonic() + limit_seconds
        while time.monotonic() < deadline:
            try:
                n = await self.ship_once()
            except (psycopg.Error, OSError):
                await asyncio.sleep(0.2)
                continue
            if n == 0 and all(not r.segments() or _only_live_empty(r) for r in self.readers()):
                return True
            if n == 0:
                await asyncio.sleep(0.05)
        return False


def _only_live_empty(reader: SpoolReader) -> bool:
    """Nothing left to ship in this directory (segments may remain: live ones, fully read)."""
    batch = reader.read_batch(1)
    return not batch.items
