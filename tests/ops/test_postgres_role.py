"""The ``postgres`` role on a booted Debian 12: converge, idempotence, TLS-only scram login for a box
group that acts as the owner role (so the appliance's migrations run), and a pg_dump backup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ops, pytest.mark.timeout(2400)]

PASSWORD = "box-group-test-password-3141"
VARS = json.dumps({
    "postgres_box_groups": [{"name": "va_boxes_test", "password": PASSWORD, "networks": ["127.0.0.1/32"]}],
    "postgres_apt_update_cache": False,
})
CHECK = f"""
import asyncio, psycopg
from appliance.records import store
DSN = "postgresql://va_boxes_test@127.0.0.1:5432/voice_appliance"
async def main():
    async with await psycopg.AsyncConnection.connect(DSN + "?sslmode=require", password={PASSWORD!r},
                                                     autocommit=True) as conn:
        applied = await store.migrate(conn)
        cur = await conn.execute("SELECT current_user")
        (user,) = await cur.fetchone()
        # libpq's own word that this connection is TLS (pg_stat_ssl hides the TLS columns of a backend
        # whose session user the current role cannot act as: the box group logs in as va_boxes_test and
        # acts as voice_appliance); that the server refuses plain connections is checked below
        print(applied, user, conn.pgconn.ssl_in_use)
    try:
        await psycopg.AsyncConnection.connect(DSN + "?sslmode=disable", password={PASSWORD!r})
    except psycopg.OperationalError:
        print("plain refused")
asyncio.run(main())
"""


def test_postgres_role_converges_idempotently_and_serves_the_records(provisioned) -> None:
    ct = provisioned.ct
    playbook = Path(__file__).with_name("postgres-playbook.yml")
    first = provisioned.playbook("-e", VARS, playbook=playbook)
    assert first.rc == 0, first.output[-4000:]
    second = provisioned.playbook("-e", VARS, playbook=playbook)
    assert second.rc == 0 and second.recap.get("changed") == 0, second.output[-3000:]
    ct.sh("cat > /root/pg_check.py", input=CHECK)
    out = ct.sh("/opt/venvs/voice-appliance/bin/python /root/pg_check.py").stdout.strip().splitlines()
    assert out[0].split()[-2:] == ["voice_appliance", "True"], out  # acts as the owner role, over TLS
    assert out[0].startswith("[1, 2"), out  # the appliance's migrations ran as that role
    assert out[-1] == "plain refused", out
    ct.sh("systemctl start voice-appliance-pg-backup.service")
    dumps = ct.sh("ls /var/backups/voice-appliance-postgres").stdout.split()
    assert len(dumps) == 1 and dumps[0].startswith("voice_appliance-") and dumps[0].endswith(".dump")
    assert ct.sh("systemctl is-enabled voice-appliance-pg-backup.timer").stdout.strip() == "enabled"
