"""The price table (checked at config load, errors name the key) and the cost estimate by modality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config
from appliance.records.usage import cost_of, load_prices, usage_details


def test_prices_file_overrides_and_bad_files_name_the_key(tmp_path: Path) -> None:
    good = tmp_path / "prices.json"
    good.write_text(json.dumps({"my-model": {"input": {"audio": 1.0, "default": 0.5},
                                             "output": {"AUDIO": 4}}}))
    table = load_prices(str(good))
    assert table["my-model"]["input"] == {"AUDIO": 1.0, "default": 0.5}
    assert "gemini-2.5-flash-native-audio-preview-09-2025" in table  # built-ins stay
    cfg = load_config(env={}, overrides={"records": {"prices_file": str(good)}})
    assert cfg.records.prices_file == str(good)
    cases = (("[1]", "records.prices_file"), ('{"m": {"inputs": {}}}', "records.prices_file.m"),
             ('{"m": {"input": {"TEXT": -1}}}', "records.prices_file.m.input"), ("nope", "JSON"))
    for text, where in cases:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            load_config(env={}, overrides={"records": {"prices_file": str(bad)}})


def test_cost_by_modality_with_fallbacks() -> None:
    prices = {"m": {"input": {"AUDIO": 3.0, "TEXT": 0.5}, "output": {"AUDIO": 12.0, "default": 2.0}}}
    by = {"input": {"AUDIO": 1_000_000, "UNSPECIFIED": 1_000_000}, "output": {"TEXT": 500_000}}
    # unattributed input tokens at the highest input rate (3.0), output TEXT at the output default (2.0)
    assert cost_of(prices, "m", by)["cost_usd"] == pytest.approx(3.0 + 3.0 + 1.0)
    assert cost_of(prices, "unknown", by)["cost_usd"] is None


def test_usage_details_from_wire_dicts() -> None:
    um = {"promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 90},
                                  {"modality": "TEXT", "tokenCount": 10}],
          "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 40}]}
    assert usage_details(um) == {"input": {"AUDIO": 90, "TEXT": 10}, "output": {"AUDIO": 40}}
    assert usage_details({}) is None  # nothing attributed: the event stays Usage(p, r, t)
    vertex = {"candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": 5}]}
    assert usage_details(vertex) == {"input": {}, "output": {"AUDIO": 5}}
