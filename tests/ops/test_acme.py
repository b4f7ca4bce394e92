"""The acme role against Debian's pebble (an ACME test server) in the booted container.

pebble runs in the container with a test CA for its own API (appliance.emulator.certs) and validates
http-01 on port 80 of ``va-ops.test`` (an /etc/hosts name for the container's public address). The acme
role + the appliance role (``appliance_acme_enabled``) then serve pebble's certificate on 8443 and on
coturn's 5349; a second run changes nothing; ``certbot renew --force-renewal`` puts a new certificate in
service through the deploy hook with neither the supervisor nor coturn restarted (same MainPID). Runs
last in the session: it leaves the container on the ACME certificate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from appliance.emulator.certs import ensure_certs
from tests.harness import nspawn

pytestmark = [pytest.mark.ops, pytest.mark.timeout(2400)]

DOMAIN = "va-ops.test"
PEBBLE = {"pebble": {"listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
                     "certificate": "/etc/pebble/cert.pem", "privateKey": "/etc/pebble/key.pem",
                     "httpPort": 80, "tlsPort": 5001, "ocspResponderURL": "",
                     "externalAccountBindingRequired": False}}


def served(ct, port: int) -> tuple[str, str]:
    """(issuer, serial) of the certificate the box serves on ``port``."""
    out = ct.sh(f"timeout 10 openssl s_client -connect 127.0.0.1:{port} -servername {DOMAIN} </dev/null "
                "2>/dev/null | openssl x509 -noout -issuer -serial", check=False).stdout
    issuer = re.search(r"^issuer=(.*)$", out, re.M)
    serial = re.search(r"^serial=(\S+)$", out, re.M)
    return (issuer.group(1) if issuer else "", serial.group(1) if serial else "")


def main_pid(ct, unit: str) -> str:
    return ct.sh(f"systemctl show -p MainPID --value {unit}").stdout.strip()


def test_acme_certificate_from_pebble_renewed_in_place(provisioned, tmp_path) -> None:
    from tests.ops.test_host import wait_for

    ct = provisioned.ct
    api = ensure_certs(tmp_path / "pebble", ["127.0.0.1", "localhost"])
    ct.sh("mkdir -p /etc/pebble")
    for src, name in ((api.cert_file, "cert.pem"), (api.key_file, "key.pem"), (api.ca_file, "ca.pem")):
        ct.put(Path(src), f"/etc/pebble/{name}")
    ct.sh("cat > /etc/pebble/config.json", input=json.dumps(PEBBLE))
    ct.sh(f"grep -q ' {DOMAIN}$' /etc/hosts || echo '{nspawn.HOST_ADDR} {DOMAIN}' >> /etc/hosts")
    ct.sh("systemd-run --unit=va-ops-pebble -E PEBBLE_VA_NOSLEEP=1 -E PEBBLE_WFE_NONCEREJECT=0 "
          "pebble -config /etc/pebble/config.json")
    try:
        probe = ("python3 -c \"import ssl,urllib.request as u; print(u.urlopen('https://127.0.0.1:14000/dir',"
                 " timeout=2, context=ssl.create_default_context(cafile='/etc/pebble/ca.pem')).status)\"")
        assert wait_for(lambda: ct.sh(probe, check=False).stdout.strip() == "200", timeout=30), \
            ct.sh("journalctl -u va-ops-pebble -n 30 --no-pager", check=False).stdout
        pids = {u: main_pid(ct, u) for u in ("voice-appliance", "coturn")}
        acme_vars = json.dumps({
            "acme_domains": [DOMAIN], "acme_email": "ops@example.invalid",
            "acme_server": "https://127.0.0.1:14000/dir", "acme_ca_bundle": "/etc/pebble/ca.pem",
            "acme_apt_update_cache": False, "appliance_acme_enabled": True,
            "appliance_acme_cert_name": DOMAIN,
        })
        playbook = Path(__file__).with_name("acme-playbook.yml")
        first = provisioned.playbook("-e", acme_vars, playbook=playbook)
        assert first.rc == 0, first.output[-5000:]
        second = provisioned.playbook("-e", acme_vars, playbook=playbook)
        assert second.rc == 0 and second.recap.get("changed") == 0, second.output[-3000:]

        # the supervisor picks the new files up by itself (api.tls_reload_seconds), coturn was reloaded
        assert wait_for(lambda: "Pebble" in served(ct, 8443)[0], timeout=40), served(ct, 8443)
        assert "Pebble" in served(ct, 5349)[0], served(ct, 5349)
        before = served(ct, 8443)[1]
        ct.sh(f"REQUESTS_CA_BUNDLE=/etc/pebble/ca.pem certbot renew --force-renewal --cert-name {DOMAIN} "
              "--non-interactive")
        assert wait_for(lambda: served(ct, 8443)[1] not in ("", before), timeout=40), served(ct, 8443)
        assert served(ct, 5349)[1] == served(ct, 8443)[1]
        # renewed in place: neither service restarted
        assert {u: main_pid(ct, u) for u in pids} == pids
        assert "acme-http-01" not in ct.sh("nft list ruleset").stdout  # port 80 closed again
        assert ct.sh("systemctl is-enabled certbot.timer").stdout.strip() == "enabled"
    finally:
        ct.sh("systemctl stop va-ops-pebble", check=False)
