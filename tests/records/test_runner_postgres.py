"""`voice-appliance run`'s private PostgreSQL: initdb on first run, a supervisord program, the records
DSN and password in the generated config — and the writer's migrations work against it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from appliance.config import load_config, secret
from appliance.records import store
from appliance.records.pgcluster import Server
from appliance.runner import prepare
from tests.records.conftest import free_port


@pytest.fixture
def state_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="va-run-"))  # traversable by the postgres user (pytest's is 0700)
    os.chmod(root, 0o755)
    yield root / "var"
    shutil.rmtree(root, ignore_errors=True)


def test_run_plan_starts_a_private_postgres(state_dir: Path) -> None:
    port = free_port()
    plan = prepare(load_config(env={}), state_dir, with_janus=False, with_coturn=False, with_postgres=True,
                   postgres_port=port)
    (pg,) = [p for p in plan.programs if p.name == "postgres"]
    assert f"{port}" in pg.command and "listen_addresses=127.0.0.1" in pg.command
    assert pg.stopsignal == "INT"
    cfg = load_config(plan.config_path, env={})
    assert cfg.records.dsn == f"postgresql://voice_appliance@127.0.0.1:{port}/voice_appliance"
    password = secret("", cfg.records.password_file)
    assert password and (state_dir / "postgres" / "data" / "PG_VERSION").exists()
    assert "[program:postgres]" in plan.supervisord_conf.read_text()
    # second run: no initdb again, same password
    prepare(load_config(env={}), state_dir, with_janus=False, with_coturn=False, with_postgres=True,
            postgres_port=port)
    assert secret("", cfg.records.password_file) == password
    proc = subprocess.Popen(pg.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    server = Server.__new__(Server)
    server.cluster, server.proc, server.log_path = None, proc, state_dir / "pg.log"  # type: ignore[assignment]
    try:
        from appliance.records.pgcluster import Cluster

        server.cluster = Cluster(state_dir / "postgres", port)
        server.wait_ready(30)
        with psycopg.connect(cfg.records.dsn, password=password) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("voice_appliance",)
    finally:
        server.stop()
    assert store.LATEST >= 2
