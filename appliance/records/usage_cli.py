"""`voice-appliance usage`: tokens and cost estimate per tenant and model, from the records database.

The same report as the admin API's ``GET /v1/admin/usage`` (appliance/records/usage_report.py), for an
operator on the box or a billing job: JSON on stdout, exit 2 with a one-line reason on a bad argument,
a missing ``records.dsn`` or an unreachable database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta

import psycopg

from appliance.config import DEFAULT_TENANT, TENANT_NAME_RE, ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")
    parser.add_argument("--since", help="RFC 3339 time (default: --until minus 30 days)")
    parser.add_argument("--until", help="RFC 3339 time (default: now)")
    parser.add_argument("--tenant", help="one tenant only ('default' for calls without one)")


def _time(name: str, raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--{name}: expected an RFC 3339 time, got {raw[:40]!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


async def _report(args: argparse.Namespace) -> dict[str, object]:
    from appliance.records.usage import load_prices
    from appliance.records.usage_report import usage_report
    from appliance.records.writer import Database

    cfg = load_config(args.config)
    if not cfg.records.dsn:
        raise ConfigError("records.dsn is not set: there are no usage records")
    until = _time("until", args.until) or datetime.now(UTC)
    since = _time("since", args.since) or until - timedelta(days=30)
    if since >= until:
        raise ValueError("--since: must be before --until")
    if args.tenant and not (args.tenant == DEFAULT_TENANT or TENANT_NAME_RE.match(args.tenant)):
        raise ValueError(f"--tenant: expected {TENANT_NAME_RE.pattern}")
    db = Database.from_config(cfg)
    try:
        async with db.connection() as conn:
            return await usage_report(conn, since=since, until=until, tenant=args.tenant or None,
                                      prices=load_prices(cfg.records.prices_file))
    finally:
        await db.close()


def main(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(_report(args))
    except (ConfigError, OSError, ValueError, psycopg.Error) as exc:
        print(f"usage: {str(exc).strip()[:300]}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0
