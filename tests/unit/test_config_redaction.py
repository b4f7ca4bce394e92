"""`voice-appliance config show` redacts every secret-bearing key.

The secret keys are found by enumerating the config dataclasses, not by a list kept here: any field whose
name says it holds a secret (and is not a ``*_file`` path) must carry the SECRET marker, so a new secret
field cannot be added without being redacted.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import typing

from appliance.config import Config, secret_fields

SECRETISH = re.compile(r"secret|password|passwd|api_key|admin_key|private_key|token|credential|(^|_)key$")


def _text_fields() -> list[str]:
    """Every ``section.key`` whose value is text (a number or flag holds no secret)."""
    out = []
    for section in dataclasses.fields(Config):
        if section.name == "tenants":  # tables of [model] keys: covered by model.* (and redacted alike)
            continue
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        out += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)
                if hints[f.name] in (str, list[str])]
    return out


def test_every_secret_looking_field_is_marked():
    marked = secret_fields()
    unmarked = [name for name in _text_fields() if SECRETISH.search(name.split(".", 1)[1])
                and not name.endswith("_file") and name not in marked]
    assert unmarked == [], f"secret-bearing config keys without metadata=SECRET: {unmarked}"
    # and the known ones are there (a marker removed by accident fails too)
    assert {"model.api_key", "emulator.api_key", "janus.api_secret", "janus.admin_secret",
            "janus.audiobridge_admin_key", "turn.secret"} <= set(marked)
    assert marked["redis.url"] == "url"


def test_config_show_prints_no_secret(tmp_path):
    sentinels = {}
    lines = []
    by_section: dict[str, list[str]] = {}
    for name, kind in secret_fields().items():
        section, key = name.split(".", 1)
        value = f"SENTINEL-{section}-{key}"
        sentinels[name] = value
        if kind == "url":
            value = f"redis://user:{value}@db.example.test:6379/0"
        by_section.setdefault(section, []).append(f'{key} = "{value}"')
    for section, kv in by_section.items():
        lines += [f"[{section}]", *kv]
    cfg = tmp_path / "appliance.toml"
    cfg.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "appliance", "config", "show", "--config", str(cfg)],
                         capture_output=True, text=True, check=True).stdout
    assert "SENTINEL" not in out, out
    shown = json.loads(out)
    for name, kind in secret_fields().items():
        section, key = name.split(".", 1)
        expected = "redis://***@db.example.test:6379/0" if kind == "url" else "***"
        assert shown[section][key] == expected, name
    assert shown["redis"]["url"].endswith("@db.example.test:6379/0")  # the non-secret part stays useful
