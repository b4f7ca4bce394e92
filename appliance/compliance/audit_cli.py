"""`voice-appliance audit verify`: check the records database's audit trail end to end.

Exits 0 when every entry is in sequence, linked to the one before, matches its hash and every signed
checkpoint verifies; otherwise 1 and one line per problem naming the entry (``compliance.audit``).
``--public-key`` (PEM) lets an auditor verify without the signing credential; ``public-key`` prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.compliance import trail
from appliance.config import Config, ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["verify", "public-key"])
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")
    parser.add_argument("--public-key", help="the checkpoint key's public half (PEM); default: from the "
                                             "signing credential (compliance.audit_signing_key_file)")


def _public_key(args: argparse.Namespace, cfg: Config) -> Ed25519PublicKey:
    if args.public_key:
        return trail.load_public_key(Path(args.public_key).read_bytes())
    return trail.load_signing_key(cfg, create=False).public_key()


async def _verify(args: argparse.Namespace) -> int:
    from appliance.records import store
    from appliance.records.writer import Database

    cfg = load_config(args.config)
    if not cfg.records.dsn:
        raise ConfigError("records.dsn is not set: there is no audit trail to verify")
    public = _public_key(args, cfg)
    db = Database.from_config(cfg)
    try:
        async with db.connection() as conn:
            await store.migrate(conn)
            result = await trail.verify_db(conn, public)
    finally:
        await db.close()
    print(json.dumps({"ok": result.ok, "entries": result.entries, "checkpoints": result.checkpoints}))
    for problem in result.problems:
        print(f"audit verify: {problem}", file=sys.stderr)
    return 0 if result.ok else 1


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "public-key":
            cfg = load_config(args.config)
            sys.stdout.write(trail.public_key_pem(trail.load_signing_key(cfg, create=False)).decode())
            return 0
        return asyncio.run(_verify(args))
    except (ConfigError, OSError, ValueError) as exc:
        print(f"audit {args.action}: {exc}", file=sys.stderr)
        return 2
