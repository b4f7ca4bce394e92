"""Where a Live session connects and how: endpoint, key and TLS are values handed to each session (no
process-wide default), plus the per-call options from the session's control block.

Gemini with an API key when one is configured, else the local emulator trusting its test CA (generated
here if the emulator has not run yet, same path rule as ``voice-appliance emulator``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config, ModelConfig, secret

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"


class LiveUnavailable(ConnectionError):
    """The model could not be reached (retries exhausted) or refused us (e.g. a wrong API key)."""


@dataclass(frozen=True)
class ClientSettings:
    """One endpoint: the SDK client is shared by every session with equal settings."""

    base_url: str
    api_key: str
    ssl_context: ssl.SSLContext

    @classmethod
    def for_model(cls, m: ModelConfig, ssl_context: ssl.SSLContext | None = None) -> ClientSettings:
        """Settings from a model section that carries its own API key (Gemini, or a test's emulator)."""
        key = secret(m.api_key, m.api_key_file)
        if not key:
            raise LiveUnavailable("no model API key configured (use client_settings(cfg) for the emulator)")
        return cls(m.base_url or GEMINI_BASE_URL, key, ssl_context or tls_context(m.ca_file or None))


@dataclass(frozen=True)
class LiveOptions:
    """Per-call options (from the session's control block)."""

    voice: str
    language: str
    system_instruction: str
    resume_handle: str | None = None
    tools: Sequence[Mapping[str, object]] | None = None  # function declarations: {"name", "description", …}


def tls_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The system trust store plus, when given, an extra CA (the emulator's test CA)."""
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise LiveUnavailable(f"model.ca_file {ca_file}: cannot load a CA certificate ({exc})") from None
    return ctx


def emulator_ca_file(cfg: Config) -> Path:
    """Where ``voice-appliance emulator`` keeps its CA for this config (same rule as its CLI)."""
    wanted = Path(cfg.paths.state_dir) / "emulator"
    if wanted.exists() and os.access(wanted, os.W_OK):
        return wanted / "emulator-ca.pem"
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted / "emulator-ca.pem"
    except OSError:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "voice-appliance" / "emulator" / "emulator-ca.pem"


def client_settings(cfg: Config) -> ClientSettings:
    """The configured model's endpoint: Gemini with an API key, else the local emulator."""
    m = cfg.model
    if secret(m.api_key, m.api_key_file):
        return ClientSettings.for_model(m)
    e = cfg.emulator
    host = "127.0.0.1" if e.host in ("0.0.0.0", "::", "") else e.host
    shown = f"[{host}]" if ":" in host else host
    ca = Path(m.ca_file) if m.ca_file else emulator_ca_file(cfg)
    if not ca.exists():
        from appliance.emulator.certs import ensure_certs

        ca = ensure_certs(ca.parent, [host]).ca_file
    return ClientSettings(m.base_url or f"https://{shown}:{e.port}", e.api_key, tls_context(ca))
