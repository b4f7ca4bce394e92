"""`voice-appliance keys`: rotate, re-wrap and list the records database's data keys; make a master key.

Runs against the live database while boxes keep writing and reading (no downtime): ``rotate`` retires
the current data keys (every writer picks a new one at its next batch, old ones keep opening old
data); ``rewrap`` moves every data key under the master key file's current (last) line — append a line
with ``new-master``, distribute the file, run ``rewrap``, then drop the old line. Each change commits in
one transaction. Output is JSON, without key material.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from appliance.compliance import trail
from appliance.compliance.atrest import db_keyring, describe, load_master, pg_store
from appliance.compliance.envelope import DecryptError, KeyConfigError, MasterKeys
from appliance.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["rotate", "rewrap", "list", "new-master"])
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")
    parser.add_argument("--tenant", action="append", help="rotate only this tenant's keys (repeatable)")
    parser.add_argument("--id", default="", help="new-master: the new master key's id (default: m<N+1>)")


async def _run(args: argparse.Namespace) -> dict[str, object]:
    from appliance.records import store
    from appliance.records.writer import Database

    cfg = load_config(args.config)
    if not cfg.records.dsn:
        raise ConfigError("records.dsn is not set: there is no records database")
    keyring = db_keyring(load_master(cfg, create=False))
    db = Database.from_config(cfg)
    try:
        async with db.connection() as conn:
            await store.migrate(conn)
            async with conn.transaction():
                await conn.execute("LOCK TABLE data_keys IN SHARE ROW EXCLUSIVE MODE")
                await pg_store(keyring).load(conn)
                out: dict[str, object] = {}
                if args.action == "rotate":
                    out["retired"] = keyring.rotate(args.tenant)
                elif args.action == "rewrap":
                    out["rewrapped"] = keyring.rewrap()
                    out["master_key"] = keyring.master.current_id
                await pg_store(keyring).flush(conn)
                if args.action in ("rotate", "rewrap"):  # key management is audited (compliance.trail)
                    details = {k: v for k, v in out.items() if k != "keys"}
                    await trail.append(conn, [trail.Record(time.time(), "cli:keys", f"keys.{args.action}",
                                                           "", details)])
                out["keys"] = describe(keyring)
                return out
    finally:
        await db.close()


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "new-master":
            cfg = load_config(args.config)
            from appliance.compliance.atrest import master_key_path

            path = master_key_path(cfg)
            existing = MasterKeys.from_file(path) if path.exists() else None
            kid = args.id or (f"m{len(existing._keys) + 1}" if existing else "m1")
            if existing and kid in existing._keys:
                raise KeyConfigError(f"master key id {kid} exists")
            with open(path, "a") as f:
                f.write(MasterKeys.new_line(kid) + "\n")
            print(json.dumps({"master_key_file": str(path), "current": kid}))
            return 0
        print(json.dumps(asyncio.run(_run(args)), default=str, indent=2))
        return 0
    except (ConfigError, KeyConfigError, DecryptError, OSError) as exc:
        print(f"keys {args.action}: {exc}", file=sys.stderr)
        return 2
