"""Usage and cost per tenant and model over a time range, summed by PostgreSQL (real, see conftest)
and reached through the admin API (``records:read``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from appliance.records import store
from appliance.records.admin import create_admin_app
from appliance.records.usage import BUILTIN_PRICES
from appliance.records.usage_report import usage_report
from appliance.records.writer import Database
from tests.records.conftest import Db
from tests.records.test_admin import AUD, Box, keys, tok  # noqa: F401  (keys is a fixture)

FLASH = "gemini-2.5-flash-native-audio-preview-09-2025"
PRICES = {**BUILTIN_PRICES, "gemini-3.8-live-preview": {"input": {"AUDIO": 1.0}, "output": {"AUDIO": 4.0}}}


def _items(t: float) -> list[dict[str, Any]]:
    def created(cid: str, tenant: str | None, model: str, at: float) -> dict[str, Any]:
        return {"id": f"c-{cid}", "kind": "call.created", "call": cid, "at": at, "box": "box", "sub": "s",
                "mode": "direct", "tenant": tenant, "model": model}

    def usage(iid: str, cid: str, at: float, model: str | None, p: int, r: int,
              details: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": iid, "kind": "usage", "call": cid, "at": at, "model": model, "prompt_tokens": p,
                "response_tokens": r, "total_tokens": p + r, "details": details or {}}

    return [
        created("box.a", "bank", FLASH, t), created("box.b", "bank", FLASH, t),
        created("box.c", "bank", "gemini-3.8-live-preview", t), created("box.d", None, FLASH, t),
        created("box.old", "bank", FLASH, t - 86400 * 60),
        # bank on Flash: two calls, three reports; one report's split covers only part of its tokens
        usage("u1", "box.a", t + 1, FLASH, 1000, 2000, {"input": {"AUDIO": 1000}, "output": {"AUDIO": 2000}}),
        usage("u2", "box.a", t + 2, FLASH, 500, 0, {"input": {"AUDIO": 400, "TEXT": 100}}),
        usage("u3", "box.b", t + 3, FLASH, 300, 100, {"input": {"AUDIO": 200}, "output": {"AUDIO": 100}}),
        # bank routed to 3.8 (the report names the routed model); one with an unknown model (no price)
        usage("u4", "box.c", t + 4, "gemini-3.8-live-preview", 100, 50),
        usage("u5", "box.c", t + 5, "some-unpriced-model", 10, 10),
        usage("u6", "box.d", t + 6, FLASH, 10, 20, {"input": {"AUDIO": 10}, "output": {"AUDIO": 20}}),
        usage("u7", "box.old", t - 86400 * 60, FLASH, 999_999, 999_999),  # outside the default range
    ]


@pytest.fixture
async def seeded(aconn: psycopg.AsyncConnection) -> tuple[psycopg.AsyncConnection, float]:
    await store.migrate(aconn)
    t = time.time() - 3600
    async with aconn.transaction():
        await store.apply_items(aconn, _items(t), webhooks=False)
    return aconn, t


def _row(report: dict[str, Any], tenant: str, model: str | None) -> dict[str, Any]:
    (row,) = [r for r in report["rows"] if (r["tenant"], r["model"]) == (tenant, model)]
    return row


async def test_report_sums_per_tenant_and_model(seeded: tuple[psycopg.AsyncConnection, float]) -> None:
    conn, t = seeded
    since, until = datetime.fromtimestamp(t - 10, UTC), datetime.fromtimestamp(t + 100, UTC)
    rep = await usage_report(conn, since=since, until=until, tenant=None, prices=PRICES)
    assert [(r["tenant"], r["model"]) for r in rep["rows"]] == [
        ("bank", FLASH), ("bank", "gemini-3.8-live-preview"), ("bank", "some-unpriced-model"),
        ("default", FLASH)]
    flash = _row(rep, "bank", FLASH)
    assert (flash["calls"], flash["reports"], flash["prompt_tokens"], flash["response_tokens"]) == (
        2, 3, 1800, 2100)
    assert flash["by_modality"] == {"input": {"AUDIO": 1600, "TEXT": 100, "UNSPECIFIED": 100},
                                    "output": {"AUDIO": 2100}}
    # Flash: audio in $3/M, text in $0.5/M, unattributed in at the highest input rate ($3/M), audio out $12/M
    assert flash["cost_usd"] == pytest.approx((1600 * 3 + 100 * 0.5 + 100 * 3 + 2100 * 12) / 1e6)
    v38 = _row(rep, "bank", "gemini-3.8-live-preview")
    assert v38["cost_usd"] == pytest.approx((100 * 1.0 + 50 * 4.0) / 1e6)  # all UNSPECIFIED: highest rate
    assert _row(rep, "bank", "some-unpriced-model")["cost_usd"] is None and rep["complete"] is False
    assert _row(rep, "default", FLASH)["calls"] == 1  # no tenant on the call: the default tenant's
    total = sum(r["cost_usd"] or 0 for r in rep["rows"])
    assert rep["cost_usd"] == pytest.approx(total)
    only = await usage_report(conn, since=since, until=until, tenant="default", prices=PRICES)
    assert [(r["tenant"], r["model"]) for r in only["rows"]] == [("default", FLASH)] and only["complete"]


async def test_admin_usage_endpoint(pg_db: Db, seeded: tuple[psycopg.AsyncConnection, float],
                                    keys: tuple[bytes, bytes]) -> None:  # noqa: F811
    from appliance.auth import JwtVerifier

    db = Database(pg_db.dsn, pg_db.password)
    app = create_admin_app(JwtVerifier(keys[1], audience=AUD, required_scope=""), Box(), db, prices=PRICES)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as client:
            assert (await client.get("/v1/admin/usage", headers=tok(keys, "calls:read"))).status_code == 403
            r = await client.get("/v1/admin/usage?tenant=bank", headers=tok(keys, "records:read"))
            assert r.status_code == 200, r.text
            body = r.json()
            assert {row["tenant"] for row in body["rows"]} == {"bank"}
            assert sum(row["calls"] for row in body["rows"] if row["model"] == FLASH) == 2  # box.old: too old
            for bad, name in (("since=yesterday", "since"), ("tenant=Bad!", "tenant"),
                              ("since=2026-12-02T00:00:00Z&until=2026-12-01T00:00:00Z", "since")):
                r = await client.get(f"/v1/admin/usage?{bad}", headers=tok(keys, "records:read"))
                assert r.status_code == 400 and r.json()["detail"].startswith(name), r.text
    finally:
        await db.close()


def test_cli_prints_the_report_and_names_bad_arguments(pg_db: Db, tmp_path,
                                                       seeded: tuple[psycopg.AsyncConnection, float]) -> None:
    import json
    import subprocess
    import sys

    (tmp_path / "pgpass").write_text(pg_db.password)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[records]\ndsn = "{pg_db.dsn}"\n'
                   f'password_file = "{tmp_path / "pgpass"}"\n')

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli", "usage", "--config", str(cfg), *extra],
                              capture_output=True, text=True, timeout=60)

    p = run("--tenant", "bank")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    assert {(r["tenant"], r["model"]) for r in rows} == {
        ("bank", FLASH), ("bank", "gemini-3.8-live-preview"), ("bank", "some-unpriced-model")}
    assert next(r for r in rows if r["model"] == FLASH)["calls"] == 2
    bad = run("--since", "last week")
    assert bad.returncode == 2 and bad.stderr.startswith("usage: --since: expected an RFC 3339 time")
