"""The supervisor's own TLS (appliance/tls.py) against a running supervisor process.

- ``openssl s_client`` offers every TLS 1.2 suite it knows, one at a time: only AEAD ones are accepted;
  TLS 1.0/1.1 are refused, TLS 1.3 works.
- API and page responses over TLS carry HSTS.
- Certificate renewal: the files are replaced under a live call; new handshakes get the new certificate
  within the reload interval, the call keeps running (echo heard after the swap, same supervisor process,
  the session still ``active``), and an HTTP connection opened before the swap keeps working.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import subprocess
import time
from urllib.parse import urlsplit

import httpx
import pytest

from appliance.emulator.certs import ensure_certs
from appliance.tls import AEAD_CIPHERS
from tests.harness.audio import speech
from tests.supervisor.conftest import open_call, start_supervisor, stop_supervisor, wait_until
from tests.supervisor.rtc import RATE, caller
from tests.supervisor.test_voice_loop import say_and_hear, wait_quiet

RELOAD_SECONDS = 0.5


@pytest.fixture(scope="module")
def tls_sup(tmp_path_factory, redis_srv, janus, emulator):
    tmp = tmp_path_factory.mktemp("tls-sup")
    first, second = ensure_certs(tmp / "ca1", ["127.0.0.1"]), ensure_certs(tmp / "ca2", ["127.0.0.1"])
    live = tmp / "live"
    live.mkdir()
    shutil.copy(first.cert_file, live / "cert.pem")
    shutil.copy(first.key_file, live / "key.pem")
    bundle = tmp / "cas.pem"  # the test client trusts both CAs: before and after the renewal
    bundle.write_bytes(first.ca_file.read_bytes() + second.ca_file.read_bytes())
    sp = start_supervisor(tmp, redis_srv.url, janus, slots=1, tls_ca=str(bundle), extra={
        "api": {"tls_cert_file": str(live / "cert.pem"), "tls_key_file": str(live / "key.pem"),
                "tls_reload_seconds": RELOAD_SECONDS},
        "model": {"api_key": emulator.api_key, "base_url": emulator.base_url, "ca_file": emulator.ca_file,
                  "max_retries": 5},
    })
    sp.tls = {"live": live, "first": first, "second": second, "bundle": bundle}  # type: ignore[attr-defined]
    yield sp
    stop_supervisor(sp)


def s_client(sup, *args: str) -> subprocess.CompletedProcess:
    port = urlsplit(sup.api).port
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                           *args], input="", capture_output=True, text=True, timeout=10)


def handshake_ok(res: subprocess.CompletedProcess) -> bool:
    # (s_client's exit status is no guide: it is 1 when the server closes after a TLS 1.3 handshake)
    m = re.search(r"^New, TLSv1\.[23], Cipher is (\S+)", res.stdout, re.M)
    return m is not None and m.group(1) != "(NONE)"


def served_fingerprint(sup) -> str:
    pem = s_client(sup, "-showcerts").stdout
    cert = pem[pem.index("-----BEGIN CERTIFICATE-----"):pem.index("-----END CERTIFICATE-----") + 25]
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(cert))


def test_tls_versions_and_only_aead_suites(tls_sup):
    for old in ("-tls1", "-tls1_1"):  # the client offers it (SECLEVEL 0): the *server* refuses it
        res = s_client(tls_sup, old, "-cipher", "DEFAULT:@SECLEVEL=0")
        # an alert, or (TLS 1.0 through asyncio) the server hanging up on the hello
        assert not handshake_ok(res) and re.search("alert protocol version|unexpected eof",
                                                   res.stdout + res.stderr), old
    assert handshake_ok(s_client(tls_sup, "-tls1_3"))
    offered = subprocess.run(["openssl", "ciphers", "-s", "-tls1_2", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"],
                             capture_output=True, text=True, check=True).stdout.strip().split(":")
    accepted = [c for c in offered
                if handshake_ok(s_client(tls_sup, "-tls1_2", "-cipher", f"{c}:@SECLEVEL=0"))]
    print(f"TLS 1.2 suites offered one by one: {len(offered)}, accepted: {accepted}")
    assert len(offered) > 30 and accepted, offered
    assert set(accepted) <= set(AEAD_CIPHERS.split(":")), accepted
    assert all("GCM" in c or "CHACHA20" in c for c in accepted)
    for weak in ("AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"):
        assert weak not in accepted


async def test_hsts_on_api_and_page(tls_sup):
    ctx = ssl.create_default_context(cafile=str(tls_sup.tls["bundle"]))
    async with httpx.AsyncClient(base_url=tls_sup.api, verify=ctx, timeout=10) as http:
        for path in ("/", "/readyz", "/v1/ice-servers", "/v1/sessions/nope"):
            r = await http.get(path, headers={"Authorization": f"Bearer {tls_sup.token()}"})
            assert r.headers.get("strict-transport-security") == "max-age=31536000", (path, r.headers)


async def test_certificate_renewal_keeps_the_live_call(tls_sup, sub):
    live, second = tls_sup.tls["live"], tls_sup.tls["second"]
    before = served_fingerprint(tls_sup)
    ctx = ssl.create_default_context(cafile=str(tls_sup.tls["bundle"]))
    auth = {"Authorization": f"Bearer {tls_sup.token(sub)}"}
    pc, track, rec = await caller()
    try:
        async with httpx.AsyncClient(base_url=tls_sup.api, verify=ctx, timeout=30) as http:
            sid = await open_call(http, auth, pc, tls_sup)
            await wait_quiet(rec)
            corr, _ = await say_and_hear(track, rec, speech("one two three four five", RATE))
            assert corr > 0.6
            # renew as certbot does: new files put in place by rename
            for src, name in ((second.key_file, "key.pem"), (second.cert_file, "cert.pem")):
                shutil.copy(src, live / f".{name}.new")
                os.replace(live / f".{name}.new", live / name)
            t_swap = time.monotonic()
            await wait_until(lambda: served_fingerprint(tls_sup) != before, limit=10, step=0.1,
                             what="new certificate served")
            took = time.monotonic() - t_swap
            print(f"certificate reload: new handshakes get the new certificate after {took:.2f} s")
            assert took < RELOAD_SECONDS + 3
            assert served_fingerprint(tls_sup) == ssl.DER_cert_to_PEM_cert(
                ssl.PEM_cert_to_DER_cert(second.cert_file.read_text()))
            # the same (pre-swap) keep-alive connection still works, the call is still up and talking
            info = (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()
            assert info["state"] == "active", info
            corr, _ = await say_and_hear(track, rec, speech("six seven eight nine ten", RATE))
            assert corr > 0.6
            assert tls_sup.proc.poll() is None
            assert "TLS certificate reloaded" in tls_sup.log_tail(20000)
            await http.delete(f"/v1/sessions/{sid}", headers=auth)
    finally:
        await rec.stop()
        await pc.close()
        await asyncio.sleep(0)
