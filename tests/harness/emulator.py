"""Start the Live emulator as a real subprocess (the `voice-appliance emulator` CLI) for tests.

    with start_emulator(tmp_path, reply="tone") as emu:
        client = emu.genai_client()            # google-genai Client trusting the emulator's test CA
        ...                                    # or emu.base_url, emu.ca_file, emu.api_key, emu.ssl_context()
        emu.sessions()                         # what the emulator saw, per conversation
        emu.audio(session_id)                  # the caller audio it received (PCM16 bytes), across resumes
        emu.fault(session_id, "close", code=1011)   # goaway / stop_reading / resume_reading / garbage / set
        emu.configure(first_byte_delay_ms=300)      # run-wide; emu.configure_next(...) for one connection
        emu.model_config()                     # appliance.config.ModelConfig pointing at the emulator

Flags are the CLI's long options with ``_`` for ``-`` (``goaway_after_s=2``, ``tool_calls=True``).
The process is stopped by PID and checked to be gone (not merely a zombie).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.emulator.process import run_emulator

API_KEY = "test-emulator-key"


@dataclass
class Emulator:
    """A running emulator subprocess and helpers to drive its control channel."""

    host: str
    port: int
    ca_file: str
    api_key: str
    proc: subprocess.Popen[str]
    log_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def client_settings(self) -> Any:
        """``workers.ai.live.settings.ClientSettings`` for this emulator."""
        from workers.ai.live.settings import ClientSettings

        return ClientSettings(self.base_url, self.api_key, self.ssl_context())

    def genai_client(self, api_key: str | None = None, api_version: str = "v1beta") -> Any:
        """A google-genai ``Client`` aimed at this emulator (TLS trusting its CA, no compression)."""
        from google import genai
        from google.genai import types

        return genai.Client(
            api_key=api_key or self.api_key,
            http_options=types.HttpOptions(
                base_url=self.base_url,
                api_version=api_version,
                async_client_args={"ssl": self.ssl_context(), "compression": None, "proxy": None},
            ),
        )

    def model_config(self, **overrides: Any) -> Any:
        """An ``appliance.config.ModelConfig`` that points at this emulator."""
        from appliance.config import ModelConfig

        values = {"api_key": self.api_key, "base_url": self.base_url, "ca_file": self.ca_file, **overrides}
        return ModelConfig(**values)

    # --- control channel -----------------------------------------------------------------------
    def _get(self, name: str, params: dict[str, Any] | None = None) -> bytes:
        q = {k: _str(v) for k, v in (params or {}).items()}
        url = f"{self.base_url}/emulator/{name}?{urllib.parse.urlencode(q)}"
        req = urllib.request.Request(url, headers={"x-goog-api-key": self.api_key})
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=10) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"emulator control {name}: {exc.code} {exc.read().decode()}") from None

    def health(self) -> dict[str, Any]:
        return json.loads(self._get("health"))

    def sessions(self) -> list[dict[str, Any]]:
        return json.loads(self._get("sessions"))["sessions"]

    def session(self, session_id: str) -> dict[str, Any]:
        for s in self.sessions():
            if s["session"] == session_id:
                return s
        raise KeyError(session_id)

    def audio(self, session_id: str) -> bytes:
        """The caller audio the emulator holds for a conversation (PCM16 LE at the sent rate)."""
        return self._get("audio", {"session": session_id})

    def fault(self, session_id: str, action: str, **params: Any) -> dict[str, Any]:
        """Inject a fault into one live session: close(code), goaway(time_left_s), stop_reading,
        resume_reading, garbage, or set(<behaviour fields>)."""
        return json.loads(self._get("fault", {"session": session_id, "action": action, **params}))

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change run-wide behaviour for new connections (reply, pacing, first_byte_delay_ms, refuse…)."""
        return json.loads(self._get("config", settings))

    def configure_next(self, **settings: Any) -> dict[str, Any]:
        """Behaviour for the next connection only."""
        return json.loads(self._get("next", settings))


def _str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@contextlib.contextmanager
def start_emulator(tmp_dir: str | os.PathLike[str], *, api_key: str = API_KEY, host: str = "127.0.0.1",
                   timeout: float = 20.0, **flags: Any) -> Iterator[Emulator]:
    """Run ``voice-appliance emulator`` on a free port with its state in ``tmp_dir``; stop it after."""
    state = Path(tmp_dir) / "emulator-state"
    args = ["--host", host, "--port", "0", "--api-key", api_key, "--state-dir", str(state)]
    for k, v in flags.items():
        opt = "--" + k.replace("_", "-")
        if v is True:
            args.append(opt)
        elif v is not False and v is not None:
            args += [opt, str(v)]
    with run_emulator(args, timeout=timeout) as child:
        yield Emulator(host=child.host, port=child.port, ca_file=child.ca_file, api_key=api_key,
                       proc=child.proc, log_lines=child.log_lines)


# --- audio helpers (tones, test signals, frequency and correlation checks) ------------------------


def tone(freq: float, seconds: float, rate: int = 16000, amplitude: float = 0.3) -> bytes:
    """A sine tone as PCM16 LE mono."""
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def silence(seconds: float, rate: int = 16000) -> bytes:
    return bytes(2 * int(seconds * rate))


def chirp(
    seconds: float, rate: int = 16000, f0: float = 300.0, f1: float = 3000.0, amplitude: float = 0.3
) -> bytes:
    """A linear chirp: unlike a tone, its cross-correlation has a single sharp peak."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds))
    return (amplitude * 32767 * np.sin(phase)).astype("<i2").tobytes()


def counter_signal(n_samples: int, start: int = 0) -> bytes:
    """PCM16 whose samples count up (mod 2^15): any lost or repeated chunk is visible exactly."""
    return (np.arange(start, start + n_samples) % 32768).astype("<i2").tobytes()


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float64)


def dominant_frequency(data: bytes, rate: int) -> float:
    """Frequency (Hz) of the strongest FFT bin of PCM16 audio."""
    x = pcm(data)
    if not len(x):
        return 0.0
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def max_normalized_correlation(a: bytes, b: bytes) -> float:
    """Peak of the normalised cross-correlation of two PCM16 signals (1.0 = identical shape)."""
    x, y = pcm(a), pcm(b)
    n = len(x) + len(y)
    size = 1 << (n - 1).bit_length()
    c = np.fft.irfft(np.fft.rfft(x, size) * np.conj(np.fft.rfft(y, size)), size)
    return float(np.max(np.abs(c)) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-9))


# --- Vertex AI: a service account the emulator trusts ----------------------------------------------
@dataclass
class ServiceAccount:
    """A generated service-account key: ``public_pem`` for the emulator, ``key_file(token_uri)`` for
    google-auth (a key file exactly like the ones the Cloud console hands out)."""

    email: str
    private_pem: str
    public_pem: bytes
    key_id: str

    def key_file(self, path: Path, token_uri: str, project: str = "va-test-project") -> Path:
        path.write_text(json.dumps({
            "type": "service_account", "project_id": project, "private_key_id": self.key_id,
            "private_key": self.private_pem, "client_email": self.email, "client_id": "1",
            "token_uri": token_uri,
        }))
        return path


def service_account(name: str = "va-test") -> ServiceAccount:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return ServiceAccount(f"{name}@va-test-project.iam.gserviceaccount.com", private, public,
                          secrets.token_hex(8))
