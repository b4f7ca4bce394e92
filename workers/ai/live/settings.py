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
from typing import TYPE_CHECKING

from appliance.config import Config, ModelConfig, check_model_platform, credential_path, secret

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from requests.adapters import HTTPAdapter

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"


class LiveUnavailable(ConnectionError):
    """The model could not be reached (retries exhausted) or refused us (e.g. a wrong API key)."""


@dataclass(frozen=True)
class ClientSettings:
    """One endpoint: the SDK client is shared by every session with equal settings.

    ``platform`` "vertex": ``project``/``location`` pin the region; ``credentials`` (google-auth
    service-account credentials) give a Bearer token, else ``api_key`` is an express-mode key.
    """

    base_url: str
    api_key: str
    ssl_context: ssl.SSLContext
    platform: str = "developer"
    project: str = ""
    location: str = ""
    credentials: Credentials | None = None

    @classmethod
    def for_model(cls, m: ModelConfig, ssl_context: ssl.SSLContext | None = None) -> ClientSettings:
        """Settings from a model section that carries its own credentials (Gemini or Vertex, or a
        test's emulator)."""
        ctx = ssl_context or tls_context(m.ca_file or None)
        key = secret(m.api_key, m.api_key_file)
        if m.platform == "vertex":
            check_model_platform(m)
            creds = None if key else service_account_credentials(m.credentials_file)
            base = m.base_url or f"https://{m.location}-aiplatform.googleapis.com"
            if m.location == "global" and not m.base_url:
                base = "https://aiplatform.googleapis.com"
            return cls(base, key, ctx, "vertex", m.project, m.location, creds)
        if not key:
            raise LiveUnavailable("no model API key configured (use client_settings(cfg) for the emulator)")
        return cls(m.base_url or GEMINI_BASE_URL, key, ctx)

    def api_version(self, configured: str) -> str:
        if self.platform == "vertex":
            return configured if configured in ("v1", "v1beta1") else "v1beta1"
        return configured


SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


def service_account_credentials(path: str) -> Credentials:
    """google-auth service-account credentials from a key file (a relative name resolves in
    ``$CREDENTIALS_DIRECTORY``, where systemd's ``LoadCredential=`` puts it). No token yet: the
    first refresh happens in a thread before the first connect (``refresh_token``)."""
    from google.oauth2 import service_account

    full = credential_path(path)
    try:
        return service_account.Credentials.from_service_account_file(str(full), scopes=list(SCOPES))
    except (OSError, ValueError) as exc:
        raise LiveUnavailable(f"model.credentials_file {path}: not a usable service-account key "
                              f"({exc})") from None


def refresh_token(s: ClientSettings) -> None:
    """Get or renew the Bearer token (blocking HTTPS to the key's ``token_uri``: call it in a thread,
    never on the loop). Raises LiveUnavailable with the token endpoint's answer."""
    creds = s.credentials
    if creds is None or creds.valid:
        return
    import google.auth.exceptions
    import requests
    from google.auth.transport.requests import Request

    session = requests.Session()
    session.mount("https://", _ContextAdapter(s.ssl_context))  # the websocket's trust: system + ca_file
    try:
        creds.refresh(Request(session))
    except (google.auth.exceptions.GoogleAuthError, requests.RequestException) as exc:
        raise LiveUnavailable(f"service-account token refused: {exc}") from None
    finally:
        session.close()


def _ContextAdapter(ctx: ssl.SSLContext) -> HTTPAdapter:
    from requests.adapters import HTTPAdapter

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: object, **kwargs: object) -> None:
            kwargs["ssl_context"] = ctx
            super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]

    return Adapter()


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
    if m.platform == "vertex" or secret(m.api_key, m.api_key_file):
        return ClientSettings.for_model(m)
    e = cfg.emulator
    host = "127.0.0.1" if e.host in ("0.0.0.0", "::", "") else e.host
    shown = f"[{host}]" if ":" in host else host
    ca = Path(m.ca_file) if m.ca_file else emulator_ca_file(cfg)
    if not ca.exists():
        from appliance.emulator.certs import ensure_certs

        ca = ensure_certs(ca.parent, [host]).ca_file
    return ClientSettings(m.base_url or f"https://{shown}:{e.port}", e.api_key, tls_context(ca))
