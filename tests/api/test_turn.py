"""coturn HMAC credentials against a real turnserver: fresh ones relay, expired/wrong ones get 401."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from appliance.config import TurnConfig
from appliance.turn import MAX_TTL_SECONDS, credential, ice_servers
from tests.harness.coturn import coturn_server, uclient_check


def test_credential_format_and_ttl_cap():
    c = credential("s3cret", "s_abc", 99999, now=1_000_000)
    assert c.username == f"{1_000_000 + MAX_TTL_SECONDS}:s_abc" and c.expires_at == 1_000_000 + 600
    expected = base64.b64encode(hmac.new(b"s3cret", c.username.encode(), hashlib.sha1).digest()).decode()
    assert c.password == expected
    with pytest.raises(ValueError):
        credential("s3cret", "a:b", 60)
    with pytest.raises(ValueError):
        credential("", "a", 60)


def test_ice_server_list():
    cfg = TurnConfig(secret="k", stun_uris=["stun:turn.example:3478"], ttl_seconds=600)
    servers = ice_servers(cfg, "s_1", public_host="turn.example")
    assert servers[0] == {"urls": ["stun:turn.example:3478"]}
    turn = servers[1]
    assert turn["urls"][0] == "turn:turn.example:3478?transport=udp"
    assert turn["urls"][2].startswith("turns:turn.example:5349")
    assert int(turn["username"].split(":")[0]) - time.time() == pytest.approx(600, abs=2)
    assert ice_servers(TurnConfig(), "s_1", public_host="x") == []  # no secret: no TURN entry
    assert ice_servers(TurnConfig(secret="k", uris=["turn:a:1"]), "u")[0]["urls"] == ["turn:a:1"]


def test_real_coturn_accepts_fresh_refuses_expired(tmp_path):
    with coturn_server(tmp_path, secret="test-secret-1") as turn:
        fresh = credential("test-secret-1", "s_fresh", 600)
        ok, out = uclient_check(turn, fresh.username, fresh.password)
        assert ok, out[-1500:]
        expired = credential("test-secret-1", "s_old", 600, now=time.time() - 1200)
        ok, out_expired = uclient_check(turn, expired.username, expired.password)
        assert not ok
        wrong = credential("another-secret", "s_fresh", 600)
        ok, _ = uclient_check(turn, wrong.username, wrong.password)
        assert not ok
        log = turn.log_path.read_text(errors="replace")
        # coturn refuses the expired username: the allocation never completes
        assert f"Cannot find credentials of user <{expired.username}>" in log, log[-1500:]
        assert "Cannot complete Allocation" in out_expired
