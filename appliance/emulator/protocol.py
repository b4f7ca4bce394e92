"""Parsing client frames and building server frames of the Live API (BidiGenerateContent).

The SDK sends text JSON whose top-level keys are snake_case (``realtime_input``) while nested keys are
mixed (``activityStart`` next to ``mime_type``), and URL-safe base64; other clients send camelCase and the
standard alphabet. Everything is normalised here to camelCase so the server logic sees one form. Hand
written (not the SDK's pydantic models) because the emulator must also accept what the SDK would never
produce, and reject bad input with a precise reason instead of a validation traceback.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

CLIENT_TYPES = ("setup", "realtimeInput", "clientContent", "toolResponse")
# Payloads whose keys are user data (function arguments/results) and must not be renamed.
_OPAQUE = {"response", "args", "parameters", "parametersJsonSchema", "responseJsonSchema"}
_SNAKE = re.compile(r"_([a-z0-9])")


class ProtocolError(ValueError):
    """The client sent something the Live API rejects; the connection is closed with ``code``."""

    def __init__(self, reason: str, code: int = 1007) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def camel(key: str) -> str:
    """``mime_type`` → ``mimeType``; camelCase keys are returned unchanged."""
    return _SNAKE.sub(lambda m: m.group(1).upper(), key) if "_" in key else key


def normalize(value: Any) -> Any:
    """Recursively camelCase dict keys, leaving opaque user payloads (function args/results) alone."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            ck = camel(k)
            out[ck] = v if ck in _OPAQUE else normalize(v)
        return out
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def parse_client_frame(frame: str | bytes) -> tuple[str, dict[str, Any]]:
    """Decode one client frame into ``(message_type, body)``; raise :class:`ProtocolError` if invalid."""
    try:
        msg = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"Invalid JSON payload: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("Invalid JSON payload: expected an object")
    msg = normalize(msg)
    known = [k for k in msg if k in CLIENT_TYPES]
    unknown = [k for k in msg if k not in CLIENT_TYPES]
    if unknown:
        raise ProtocolError(f'Invalid JSON payload received. Unknown name "{unknown[0]}"')
    if len(known) != 1:
        raise ProtocolError("Invalid JSON payload: expected exactly one message type")
    body = msg[known[0]]
    if not isinstance(body, dict):
        raise ProtocolError(f"Invalid JSON payload: {known[0]} must be an object")
    return known[0], body


def decode_b64(data: Any) -> bytes:
    """Decode base64 in either alphabet, padded or not; reject truncated or non-base64 text."""
    if not isinstance(data, str):
        raise ProtocolError("Invalid value for bytes field: expected a base64 string")
    s = data.strip().replace("-", "+").replace("_", "/")
    s = s.rstrip("=")
    if len(s) % 4 == 1:
        raise ProtocolError("Invalid value for bytes field: truncated base64")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("Invalid value for bytes field: not base64") from None


def pcm_rate(mime_type: Any) -> int:
    """Sample rate from ``audio/pcm;rate=16000`` (16000 when absent); other types are rejected."""
    if not isinstance(mime_type, str) or not mime_type.startswith("audio/pcm"):
        raise ProtocolError(f"Unsupported mime type {mime_type!r}: expected audio/pcm")
    m = re.search(r"rate=(\d+)", mime_type)
    rate = int(m.group(1)) if m else 16000
    if not 8000 <= rate <= 48000:
        raise ProtocolError(f"Unsupported sample rate {rate}")
    return rate


def dumps(msg: dict[str, Any]) -> bytes:
    """Serialise a server message; real servers send binary frames of UTF-8 JSON."""
    return json.dumps(msg, separators=(",", ":")).encode()


def audio_message(pcm24k: bytes) -> bytes:
    data = base64.b64encode(pcm24k).decode()
    return dumps(
        {"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000",
                                                                   "data": data}}]}}}
    )


def duration(seconds: float) -> str:
    """google.protobuf.Duration JSON form (``"1.5s"``)."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
