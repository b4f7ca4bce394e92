"""Config loading: TOML + VA_* overrides, and errors that name the key and the expected form."""

import re
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config, replace


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "appliance.toml"
    p.write_text(text)
    return p


def test_defaults_use_emulator(tmp_path):
    cfg = load_config(write(tmp_path, ""), env={})
    assert cfg.uses_emulator
    assert cfg.model.chunk_ms == 40


def test_file_and_env_override(tmp_path):
    p = write(tmp_path, "[shards]\ncount = 2\n[model]\nvoice = 'Kore'\n")
    env = {"VA_SHARDS_SLOTS": "10", "VA_MODEL_API_KEY": "k-123", "VA_TURN_URIS": '["turn:a"]'}
    cfg = load_config(p, env=env)
    assert cfg.shards.count == 2 and cfg.shards.slots == 10
    assert cfg.model.voice == "Kore" and not cfg.uses_emulator
    assert cfg.turn.uris == ["turn:a"]


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[model]\nchunk_ms = 'x'\n", {}, "model.chunk_ms: expected an integer"),
        ("[model]\nchunk_ms = 100\n", {}, "model.chunk_ms: expected a value from 20 to 50"),
        ("[model]\nchunkms = 30\n", {}, "model.chunkms: unknown key"),
        ("[modle]\n", {}, "modle: unknown section"),
        ("[emulator]\nreply = 'sing'\n", {}, "emulator.reply: expected one of echo, tone, silence"),
        ("", {"VA_SHARDS_COUNT": "many"}, "shards.count: expected an integer"),
        ("[media]\nrtp_port_min = 5000\nrtp_port_max = 4000\n", {}, "media.rtp_port_min"),
        ("this is = = not toml", {}, "not valid TOML"),
        ("[api]\nbox_id = 'Box_1'\n", {}, "api.box_id: expected"),
        ("[api]\ntrusted_proxies = ['10.0.0.0/33']\n", {}, "api.trusted_proxies[0]: expected an address"),
        ("[redis]\nsentinels = ['10.0.0.1']\n", {}, 'redis.sentinels[0]: expected "host:port"'),
        ("[redis]\nsentinels = ['h:1']\nsentinel_master = ''\n", {}, "redis.sentinel_master: required"),
        ("[api]\nmigrate_grace_seconds = 0\n", {}, "api.migrate_grace_seconds: expected a value from 1"),
    ],
)
def test_errors_name_key(tmp_path, text, env, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(write(tmp_path, text), env=env)


def test_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_secret_file_via_credentials_directory(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gemini-key").write_text("sekrit\n")
    cfg = load_config(write(tmp_path, "[model]\napi_key_file = 'gemini-key'\n"), env={})
    import os

    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)
    try:
        assert not cfg.uses_emulator
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]


def test_replace_validates(tmp_path):
    cfg = load_config(write(tmp_path, ""), env={})
    assert replace(cfg, shards={"count": 3}).shards.count == 3
    with pytest.raises(ConfigError, match=r"shards\.count"):
        replace(cfg, shards={"count": -1})


def _tools(tmp_path: Path, content: str) -> str:
    p = tmp_path / "tools.json"
    p.write_text(content)
    return str(p)


def test_tools_file_is_loaded_and_checked_at_config_load(tmp_path):
    from appliance.config import load_tool_declarations

    good = _tools(tmp_path, '[{"name": "lookup_order", "description": "Find an order", '
                            '"parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}]')
    cfg = load_config(None, env={}, overrides={"model": {"tools_file": good,
                                                          "tools_url": "http://127.0.0.1:8080/tools"}})
    assert cfg.model.tools_timeout_seconds == 5.0
    assert load_tool_declarations(cfg.model.tools_file)[0]["name"] == "lookup_order"


@pytest.mark.parametrize(("content", "needle"), [
    ("not json", "model.tools_file: .* is not valid JSON"),
    ("[]", "model.tools_file: expected a non-empty JSON list"),
    ('{"name": "x"}', "model.tools_file: expected a non-empty JSON list"),
    ('["x"]', r"model.tools_file\[0\]: expected an object"),
    ('[{"description": "no name"}]', r"model.tools_file\[0\].name: expected a name"),
    ('[{"name": "a b"}]', r"model.tools_file\[0\].name: expected a name"),
    ('[{"name": "f"}, {"name": "f"}]', r"model.tools_file\[1\].name: duplicate function name 'f'"),
    ('[{"name": "f", "paramters": {}}]', r"model.tools_file\[0\].paramters: unknown key"),
    ('[{"name": "f", "parameters": "object"}]', r"model.tools_file\[0\].parameters: expected a JSON object"),
    ('[{"name": "f", "description": 3}]', r"model.tools_file\[0\].description: expected a string"),
])
def test_bad_tools_file_names_the_key(tmp_path, content, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, env={}, overrides={"model": {"tools_file": _tools(tmp_path, content)}})


def test_missing_tools_file_and_bad_url_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.tools_file: cannot read"):
        load_config(None, env={}, overrides={"model": {"tools_file": str(tmp_path / "nope.json")}})
    with pytest.raises(ConfigError, match=r"model\.tools_url: expected an http"):
        load_config(None, env={}, overrides={"model": {"tools_url": "tools.local/x"}})
    with pytest.raises(ConfigError, match=r"model\.dtmf_flush_ms: expected a value from 100 to 10000"):
        load_config(None, env={}, overrides={"model": {"dtmf_flush_ms": 0}})


def test_fleet_defaults(tmp_path):
    from appliance.config import box_id, private_host

    text = "[api]\nprivate_host = '10.1.0.5'\nmetrics_host = '10.2.0.5'\n"
    cfg = load_config(write(tmp_path, text), env={})
    assert cfg.api.drain_timeout_seconds == 300 and cfg.api.trusted_proxies == []
    assert private_host(cfg, cfg.api.agent_check_host) == "10.1.0.5"
    assert private_host(cfg, cfg.api.metrics_host) == "10.2.0.5"
    assert box_id(cfg) and box_id(replace(cfg, api={"box_id": "lb-box-7"})) == "lb-box-7"


def test_ai_disclosure_cannot_be_turned_off_silently() -> None:
    with pytest.raises(ConfigError, match=r"model\.greeting: empty, but the greeting is the AI disclosure"):
        load_config(None, env={"VA_MODEL_GREETING": '""'})
    with pytest.raises(ConfigError, match=r"compliance\.ai_disclosure_off_reason: required"):
        load_config(None, env={"VA_MODEL_GREETING": '""', "VA_COMPLIANCE_AI_DISCLOSURE": "false"})
    cfg = load_config(None, env={"VA_MODEL_GREETING": '""', "VA_COMPLIANCE_AI_DISCLOSURE": "false",
                                 "VA_COMPLIANCE_AI_DISCLOSURE_OFF_REASON": "disclosed by the IVR before"})
    assert not cfg.compliance.ai_disclosure
