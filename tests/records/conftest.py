"""A real throwaway PostgreSQL cluster for the record tests (Debian postgresql-15).

initdb into a fresh directory under /tmp (traversable by the ``postgres`` user when we are root), an
ephemeral loopback port, the unix socket in the cluster dir; stopped by PID at the end. Each test gets
its own database, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from appliance.records.pgcluster import Cluster, Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pg:
    cluster: Cluster
    server: Server
    password: str

    def dsn(self, database: str) -> str:
        return self.cluster.dsn(database)

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.cluster.dsn("postgres"), password=self.password, autocommit=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Pg]:
    root = Path(tempfile.mkdtemp(prefix="va-pg-"))
    os.chmod(root, 0o755)
    password = secrets.token_urlsafe(18)
    cluster = Cluster(root / "cluster", free_port(), database="postgres")
    cluster.init(password)
    server = Server(cluster)
    server.start()
    try:
        yield Pg(cluster, server, password)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Db:
    pg: Pg
    name: str
    dsn: str
    password: str


@pytest.fixture
def pg_db(pg_server: Pg) -> Iterator[Db]:
    if not pg_server.server.running:  # a test stopped it
        pg_server.server.start()
    name = "t_" + secrets.token_hex(6)
    with pg_server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield Db(pg_server, name, pg_server.dsn(name), pg_server.password)
    finally:
        if not pg_server.server.running:
            pg_server.server.start()
        with pg_server.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def aconn(pg_db: Db) -> AsyncIterator[psycopg.AsyncConnection]:
    conn = await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()
