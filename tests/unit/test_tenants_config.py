"""``[tenants.<name>]`` tables: inherit ``[model]``, override any of its keys, are checked like it (the
key named as ``tenants.<name>.<key>``), and survive replace / config show."""

from __future__ import annotations

import json

import pytest

from appliance.config import ConfigError, load_config, redacted_dict, replace, tenant, to_toml_dict
from appliance.runner import dumps_toml

TOML = """
[model]
voice = "Puck"
system_instruction = "Default prompt."

[tenants.bank]
voice = "Kore"
system_instruction = "You are the bank's agent."
fallback_model = "gemini-3.1-flash-live-preview"
fallback_weight = 0.8
max_sessions = 3
recording = "transcript"
consent = "announce"

[tenants.eu]
platform = "vertex"
project = "p-eu"
location = "europe-west4"
allowed_locations = ["europe-west4"]
api_key = "express-key"
"""


def test_tenants_inherit_and_override(tmp_path) -> None:
    p = tmp_path / "a.toml"
    p.write_text(TOML)
    cfg = load_config(p, env={})
    bank = cfg.tenants["bank"]
    assert bank.model.voice == "Kore" and bank.model.system_instruction == "You are the bank's agent."
    assert bank.model.language == cfg.model.language and bank.model.model == cfg.model.model  # inherited
    assert (bank.model.fallback_model, bank.model.fallback_weight) == ("gemini-3.1-flash-live-preview", 0.8)
    assert (bank.max_sessions, bank.recording, bank.consent) == (3, "transcript", "announce")
    eu = cfg.tenants["eu"].model
    assert (eu.platform, eu.project, eu.location) == ("vertex", "p-eu", "europe-west4")
    assert cfg.model.platform == "developer"  # the default tenant is untouched
    assert tenant(cfg, None).model is cfg.model and tenant(cfg, "default").name == "default"
    with pytest.raises(KeyError):
        tenant(cfg, "nobody")
    # replace keeps the tables and re-derives them from the new [model]
    cfg2 = replace(cfg, model={"language": "fr-FR"})
    assert cfg2.tenants["bank"].model.language == "fr-FR" and cfg2.tenants["bank"].model.voice == "Kore"
    # config show / the generated runner config round-trip
    shown = to_toml_dict(cfg)
    assert shown["tenants"]["bank"]["voice"] == "Kore"
    q = tmp_path / "b.toml"
    q.write_text(dumps_toml(shown))
    assert load_config(q, env={}).tenants == cfg.tenants
    json.dumps(shown)  # `config show` prints it as JSON
    # config show redacts a tenant's secrets like [model]'s
    shown = redacted_dict(replace(cfg, tenants={"bank": {"tools_secret": "hush", "api_key": "k"}}))
    assert shown["tenants"]["bank"] == {"tools_secret": "***", "api_key": "***"}


@pytest.mark.parametrize(("table", "message"), [
    ({"voise": "Kore"}, "tenants.t1.voise: unknown key"),
    ({"chunk_ms": 5}, "tenants.t1.chunk_ms: expected a value from 20 to 50, got 5"),
    ({"fallback_weight": 1.5}, "tenants.t1.fallback_weight: expected a value from 0 to 1"),
    ({"fallback_weight": 0.5}, "tenants.t1.fallback_weight: needs tenants.t1.fallback_model"),
    ({"max_sessions": -1}, "tenants.t1.max_sessions: expected a value from 0"),
    ({"recording": "always"}, "tenants.t1.recording: expected one of off, audio"),
    ({"consent": "maybe"}, "tenants.t1.consent: expected one of none, announce, opt_in"),
    ({"greeting": "  "}, "tenants.t1.greeting: empty, but the greeting is the AI disclosure"),
    ({"tools_url": "ftp://x"}, "tenants.t1.tools_url: expected an http:// or https:// URL"),
    ({"tools_file": "/nonexistent/tools.json"}, "tenants.t1.tools_file: cannot read"),
    ({"platform": "vertex", "location": "us-central1", "allowed_locations": ["europe-west4"],
      "api_key": "k"}, "tenants.t1: model.location: 'us-central1' is outside model.allowed_locations"),
    ({"voice": 3}, "tenants.t1.voice: expected a string, got 3"),
    ({"payment_url": "ftp://x"}, "tenants.t1.payment_url: expected an http:// or https:// URL"),
    ({"secure_entry_at_start": True}, "tenants.t1.secure_entry_at_start: needs tenants.t1.payment_url"),
    ({"secure_entry_max_digits": 40}, "tenants.t1.secure_entry_max_digits: expected a value from 1 to 32"),
    ({"consent_prompt": 3}, "tenants.t1.consent_prompt: expected a string, got 3"),
])
def test_bad_tenant_tables_name_the_key(table, message) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        replace(load_config(None, env={}), tenants={"t1": table})


@pytest.mark.parametrize("name", ["default", "Bank", "-x", "a" * 40, "a.b"])
def test_bad_tenant_names(name) -> None:
    with pytest.raises(ConfigError, match=f"tenants.{name}: expected a name matching"):
        replace(load_config(None, env={}), tenants={name: {}})


def test_eu_only_box_refuses_a_tenant_outside_its_regions() -> None:
    """``[model] allowed_locations`` binds every tenant that does not set its own (EU residency)."""
    base = replace(load_config(None, env={}), model={"allowed_locations": ["europe-west4"]})
    with pytest.raises(ConfigError, match=r"^tenants\.us: model\.location: 'us-central1' is outside"):
        replace(base, tenants={"us": {"platform": "vertex", "project": "p", "location": "us-central1",
                                      "api_key": "k"}})
    eu = replace(base, tenants={"eu": {"platform": "vertex", "project": "p", "location": "europe-west4",
                                       "api_key": "k"}})
    assert eu.tenants["eu"].model.location == "europe-west4"

