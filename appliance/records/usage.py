"""Token usage by modality and its cost estimate.

The Live API reports ``usageMetadata`` with ``promptTokenCount``/``responseTokenCount`` and, per
direction, ``promptTokensDetails``/``responseTokensDetails`` = ``[{modality, tokenCount}]``. The AI
worker spools each report with the per-modality split (``usage_details``); the record sums them and
prices them with a table per model (``records.prices_file``, USD per million tokens)::

    {"gemini-2.5-flash-native-audio-preview-09-2025":
        {"input": {"TEXT": 0.5, "AUDIO": 3.0}, "output": {"TEXT": 2.0, "AUDIO": 12.0}}}

A modality missing from a model's entry is priced at that direction's ``default`` (or the highest
listed rate, so an estimate errs high). Tokens the server did not attribute (``UNSPECIFIED``) likewise.
The built-in table (Google's published Live API rates for the default native-audio model, 2025) is
an estimate only; operators set their own contract prices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.config import ConfigError

PriceTable = dict[str, dict[str, dict[str, float]]]

_NATIVE_AUDIO = {"input": {"TEXT": 0.5, "AUDIO": 3.0, "VIDEO": 3.0, "IMAGE": 3.0},
                 "output": {"TEXT": 2.0, "AUDIO": 12.0}}
BUILTIN_PRICES: PriceTable = {
    "gemini-2.5-flash-native-audio-preview-09-2025": _NATIVE_AUDIO,
    "gemini-2.5-flash-native-audio-latest": _NATIVE_AUDIO,
}


def load_prices(path: str) -> PriceTable:
    """The built-in table, overridden per model by ``records.prices_file`` (checked at start-up)."""
    table: PriceTable = {k: {d: dict(v) for d, v in e.items()} for k, e in BUILTIN_PRICES.items()}
    if not path:
        return table
    key = "records.prices_file"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{key}: {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected an object of model → prices")
    for model, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - {"input", "output"}:
            raise ConfigError(f"{key}.{model}: expected {{\"input\": {{…}}, \"output\": {{…}}}}")
        for direction, rates in entry.items():
            if not isinstance(rates, dict) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
                    for v in rates.values()):
                raise ConfigError(f"{key}.{model}.{direction}: expected modality → USD per million tokens")
        table[model] = {d: {m.upper() if m != "default" else m: float(v) for m, v in r.items()}
                        for d, r in entry.items()}
    return table


def usage_details(um: Any) -> dict[str, dict[str, int]] | None:
    """``{"input": {modality: n}, "output": {...}}`` from a usageMetadata dict (camelCase) or SDK object;
    None when the server attributed no tokens to a modality. Vertex names the output side
    ``candidatesTokensDetails``."""
    out: dict[str, dict[str, int]] = {"input": {}, "output": {}}
    for direction, names in (("input", (("promptTokensDetails", "prompt_tokens_details"),)),
                             ("output", (("responseTokensDetails", "response_tokens_details"),
                                         ("candidatesTokensDetails", "candidates_tokens_details")))):
        for camel, snake in names:
            items = um.get(camel) if isinstance(um, dict) else getattr(um, snake, None)
            for d in items or ():
                modality = d.get("modality") if isinstance(d, dict) else getattr(d, "modality", None)
                n = d.get("tokenCount") if isinstance(d, dict) else getattr(d, "token_count", None)
                modality = str(getattr(modality, "value", modality) or "UNSPECIFIED").upper()
                if isinstance(n, int) and n > 0:
                    out[direction][modality] = out[direction].get(modality, 0) + n
    return out if out["input"] or out["output"] else None


def cost_of(prices: PriceTable, model: str | None, by_modality: dict[str, dict[str, int]]) -> dict[str, Any]:
    """``{"cost_usd": float | None, "price_model": str | None}``: None when the model has no price."""
    entry = prices.get(model or "") or prices.get("default")
    if entry is None:
        return {"cost_usd": None, "currency": "USD"}
    total = 0.0
    for direction, counts in by_modality.items():
        rates = entry.get(direction, {})
        fallback = rates.get("default", max(rates.values(), default=0.0))
        for modality, n in counts.items():
            total += n * rates.get(modality, fallback) / 1e6
    return {"cost_usd": round(total, 6), "currency": "USD"}
