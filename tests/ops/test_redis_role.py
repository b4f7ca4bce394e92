"""The ``redis`` role in its fleet form on a booted Debian 12: ACL users (the appliance's user sees only
``va:*``, the default user is off, the exporter's user only reads), TLS only, a Sentinel monitoring the
primary; converge + idempotence,
then the appliance's own ``redis_client`` finds the primary through the Sentinel over TLS.

The test puts the container's Redis back to its box form afterwards (loopback, no ACL), so the tests
after it see the box as provisioned.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness.fleet import issue, make_ca

pytestmark = [pytest.mark.ops, pytest.mark.timeout(2400)]

PASSWORDS = {"redis_acl_password": "va-acl-password-0123456789",
             "redis_replication_password": "va-repl-password-0123456789",
             "redis_sentinel_password": "va-sentinel-password-0123456789",
             "redis_exporter_password": "va-metrics-password-0123456789"}

CHECK = """
import asyncio, json, redis
from appliance.config import RedisConfig
from appliance.state import redis_client
cfg = RedisConfig(sentinels=["127.0.0.1:26379"], sentinel_master="va", username="va",
                  password_file="/root/redis-va.pass", sentinel_password_file="/root/redis-sentinel.pass",
                  tls=True, ca_file="/etc/redis/tls/ca.pem")
async def main():
    out = {}
    r = redis_client(cfg, timeout=3)
    await r.set("va:ops-test", "1", ex=60)
    own = await r.get("va:ops-test")
    out["own"] = own.decode() if isinstance(own, bytes) else own
    try:
        await r.set("other:key", "1"); out["foreign"] = "written"
    except redis.exceptions.NoPermissionError:
        out["foreign"] = "refused"
    for name, kw in (("plain", {}), ("default_user", {"ssl": True, "ssl_ca_certs": cfg.ca_file})):
        c = redis.asyncio.Redis(host="127.0.0.1", port=6379, socket_timeout=3, **kw)
        try:
            await c.ping(); out[name] = "answered"
        except redis.exceptions.RedisError as e:
            out[name] = type(e).__name__
        await c.aclose()
    await r.aclose()
    print(json.dumps(out))
asyncio.run(main())
"""

RESTORE = (
    "rm -f /etc/systemd/system/redis-server.service.d/voice-appliance.conf "
    "/etc/systemd/system/redis-sentinel.service.d/voice-appliance.conf && systemctl daemon-reload && "
    "systemctl disable --now redis-sentinel && systemctl restart redis-server"
)


def test_redis_role_fleet_form_converges_and_serves_through_sentinel(provisioned) -> None:
    ct = provisioned.ct
    with tempfile.TemporaryDirectory() as d:
        ca = make_ca(Path(d) / "ca.pem", "ops test internal CA")
        issue(ca, "redis.test", ["localhost"], ["127.0.0.1"], Path(d) / "redis.pem", Path(d) / "redis.key")
        tls = {f"redis_tls_{k}_pem": (Path(d) / f).read_text()
               for k, f in (("cert", "redis.pem"), ("key", "redis.key"), ("ca", "ca.pem"))}
    variables = json.dumps({
        "redis_bind": ["127.0.0.1"], "redis_acl": True, "redis_tls": True, **tls, **PASSWORDS,
        "redis_sentinel": True, "redis_sentinel_master_host": "127.0.0.1", "redis_sentinel_quorum": 1,
        "redis_sentinel_announce_ip": "127.0.0.1", "redis_apt_update_cache": False,
    })
    playbook = Path(__file__).with_name("redis-playbook.yml")
    try:
        first = provisioned.playbook("-e", variables, playbook=playbook)
        assert first.rc == 0, first.output[-4000:]
        second = provisioned.playbook("-e", variables, playbook=playbook)
        assert second.rc == 0 and second.recap.get("changed") == 0, second.output[-3000:]
        for unit in ("redis-server", "redis-sentinel"):
            assert ct.sh(f"systemctl is-active {unit}", check=False).stdout.strip() == "active", \
                ct.sh(f"journalctl -u {unit} -n 40 --no-pager", check=False).stdout
        ct.sh("umask 077 && cat > /root/redis-va.pass", input=PASSWORDS["redis_acl_password"])
        ct.sh("umask 077 && cat > /root/redis-sentinel.pass", input=PASSWORDS["redis_sentinel_password"])
        ct.sh("cat > /root/redis_check.py", input=CHECK)
        res = ct.sh("/opt/venvs/voice-appliance/bin/python /root/redis_check.py", check=False)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["own"] == "1", out
        assert out["foreign"] == "refused", out  # the appliance's ACL user sees only va:*
        assert out["plain"] != "answered", out  # TLS only
        assert "Authentication" in out["default_user"], out  # the default user is off
        # the exporter logs in as the read-only "metrics" ACL user over TLS
        metrics = ""
        for _ in range(20):
            metrics = ct.sh("python3 -c \"import urllib.request as u; print(u.urlopen("
                            "'http://127.0.0.1:9121/metrics', timeout=5).read().decode())\"",
                            check=False).stdout
            if "\nredis_up 1" in metrics:
                break
            time.sleep(1)
        assert "\nredis_up 1" in metrics, metrics[-1500:]
        sentinel = ct.sh("journalctl -u redis-sentinel --no-pager", check=False).stdout
        assert "+monitor master va 127.0.0.1 6379" in sentinel, sentinel[-2000:]
    finally:
        ct.sh(RESTORE, check=False)
