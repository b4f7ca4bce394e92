"""Model profiles in the config: proactive audio is always on for 3.8 (unset → on, false → a clear
error naming the key), optional elsewhere; the tools file's ``behavior``/``scheduling`` are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config, replace
from appliance.model_profiles import model_profile

M38 = "gemini-3.8-live-preview"


def test_model_names_select_profiles() -> None:
    assert model_profile(f"models/{M38}") == "3.8"
    assert model_profile("projects/p/locations/l/publishers/google/models/gemini-3.1-flash-live") == "3.1"
    assert model_profile("gemini-2.5-flash-native-audio-preview-09-2025") == ""


def test_proactive_audio_defaults_follow_the_model(tmp_path: Path) -> None:
    base = load_config(None, env={})
    assert base.model.proactive_audio is False  # opt-in on 2.5 native audio
    assert load_config(None, env={}, overrides={"model": {"model": M38}}).model.proactive_audio is True
    assert replace(base, model={"model": M38}).model.proactive_audio is True
    p = tmp_path / "a.toml"
    p.write_text(f'[model]\nproactive_audio = true\n\n[tenants.next]\nmodel = "{M38}"\n\n'
                 '[tenants.old]\nvoice = "Kore"\n')
    cfg = load_config(p, env={})
    assert cfg.model.proactive_audio and cfg.tenants["next"].model.proactive_audio
    assert cfg.tenants["old"].model.proactive_audio  # inherits the box's choice


def test_proactive_audio_false_on_38_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.proactive_audio: 'gemini-3\.8-live-preview' always "
                                          r"uses proactive audio; remove proactive_audio = false"):
        load_config(None, env={}, overrides={"model": {"model": M38, "proactive_audio": False}})
    p = tmp_path / "t.toml"
    p.write_text(f'[model]\nproactive_audio = false\n\n[tenants.bank]\nmodel = "{M38}"\n'
                 "proactive_audio = false\n")
    with pytest.raises(ConfigError, match=r"^tenants\.bank\.proactive_audio: .* always uses proactive"):
        load_config(p, env={})
    p.write_text(f'[model]\nproactive_audio = false\n\n[tenants.bank]\nmodel = "{M38}"\n')
    assert load_config(p, env={}).tenants["bank"].model.proactive_audio  # the box's false is for its model


@pytest.mark.parametrize(("decl", "message"), [
    ({"name": "a", "scheduling": "LATER"}, r"model\.tools_file\[0\]\.scheduling: expected one of SILENT, "
                                            r"WHEN_IDLE, INTERRUPT, got 'LATER'"),
    ({"name": "a", "behavior": "ASYNC"}, r"model\.tools_file\[0\]\.behavior: expected one of BLOCKING, "
                                          r"NON_BLOCKING"),
    ({"name": "a", "scheduling": 1}, r"model\.tools_file\[0\]\.scheduling: expected one of"),
])
def test_tools_file_checks_behavior_and_scheduling(tmp_path: Path, decl: dict[str, object],
                                                   message: str) -> None:
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([decl]))
    with pytest.raises(ConfigError, match=message):
        load_config(None, env={}, overrides={"model": {"tools_file": str(f)}})
    f.write_text(json.dumps([{"name": "a", "behavior": "NON_BLOCKING", "scheduling": "interrupt"}]))
    assert load_config(None, env={}, overrides={"model": {"tools_file": str(f)}}).model.tools_file
