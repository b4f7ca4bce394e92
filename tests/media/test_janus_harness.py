"""The shared Janus harness: config rendering, readiness, secrets enforced, teardown by PID."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from appliance import janus_conf
from appliance.janus import AUDIOBRIDGE, JanusClient, JanusError
from tests.harness.janus import janus_available, janus_in_netns

pytestmark = pytest.mark.janus


def test_render_disables_unused_plugins_and_guards_admin() -> None:
    files = janus_conf.render(janus_conf.JanusSettings(admin_secret="", api_secret="s"))
    jcfg = files["janus.jcfg"]
    disabled = [line for line in jcfg.splitlines() if line.strip().startswith("disable")]
    plugins_off, transports_off = disabled[0], disabled[1]
    assert "libjanus_videoroom.so" in plugins_off and "libjanus_nosip.so" not in plugins_off
    assert "libjanus_audiobridge.so" not in plugins_off
    assert "libjanus_websockets.so" in transports_off and "libjanus_http.so" not in transports_off
    assert "admin_http = false" in files["janus.transport.http.jcfg"]
    assert 'api_secret = "s"' in jcfg


async def test_janus_runs_in_namespace_with_secrets(janus) -> None:
    async with httpx.AsyncClient() as http:
        info = (await http.get(f"{janus.url}/info")).json()
        assert info["version_string"] == "1.1.2"
        plugins = set(info["plugins"])
        assert plugins == {"janus.plugin.nosip", "janus.plugin.audiobridge"}
        assert set(info["transports"]) == {"janus.transport.http"}
        req = {"janus": "create", "transaction": "x", "apisecret": "no"}
        bad = (await http.post(janus.url, json=req)).json()
        assert bad["janus"] == "error" and bad["error"]["code"] == 403
        adm = {"janus": "list_sessions", "transaction": "y"}
        bad_admin = (await http.post(janus.admin_url, json={**adm, "admin_secret": "no"})).json()
        assert bad_admin["janus"] == "error"
        ok_admin = (await http.post(janus.admin_url, json={**adm, "admin_secret": janus.admin_secret})).json()
        assert ok_admin["janus"] == "success"
    async with JanusClient(janus.url, api_secret=janus.api_secret) as c:
        h = await (await c.create_session()).attach(AUDIOBRIDGE)
        data, _ = await h.message({"request": "list"})
        assert data["audiobridge"] == "success"
        with pytest.raises(JanusError):  # the AudioBridge admin_key from the rendered config is enforced
            await h.message({"request": "create", "room": 5, "admin_key": "wrong"})


def test_teardown_removes_process_and_namespace() -> None:
    if not janus_available():
        pytest.skip("needs root, janus and iproute2")
    with janus_in_netns() as j:
        pid, ns = j.pid, j.netns
        assert j.alive()
        out = j.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert "127.0.0.2/32" in out and j.ns_ip in out
    assert not j.alive()
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert pid > 0
