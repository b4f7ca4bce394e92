"""The emulator's Vertex AI side: the LlmBidiService path, Bearer tokens from an OAuth ``/token``
endpoint that accepts a service-account JWT assertion, and Vertex model names.

So the real google-genai SDK (``vertexai=True``) and google-auth's service-account flow run unchanged:
a key file whose ``token_uri`` is ``https://<emulator>/token`` gets a token here (the assertion's
signature is verified with the public key the emulator was given, ``--vertex-sa-key``), and the Live
websocket at ``/ws/google.cloud.aiplatform.<v>.LlmBidiService/BidiGenerateContent`` takes
``Authorization: Bearer <token>`` (or an express-mode API key in ``x-goog-api-key``) and a model named
``projects/<p>/locations/<l>/publishers/google/models/<m>`` (express: ``publishers/google/models/<m>``).

Why a POST on the websocket port: websockets' HTTP parser only takes GET, so the listener's connection
class looks at the first request line and answers ``POST /token`` itself; everything else is the
websocket server's as before.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection

log = logging.getLogger("appliance.emulator")

PREFIX = "/ws/google.cloud.aiplatform."
SUFFIX = ".LlmBidiService/BidiGenerateContent"
VERSIONS = ("v1beta1", "v1")
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_SECONDS = 3600
_MODEL = re.compile(r"^(?:projects/(?P<project>[a-z][a-z0-9-]{4,28}[a-z0-9])/"
                    r"locations/(?P<location>[a-z0-9-]+)/)?publishers/google/models/(?P<model>[A-Za-z0-9._-]+)$")
MAX_BODY = 16384


def vertex_version(path: str) -> str | None:
    """The API version of a Vertex Live path, or None if it is not one."""
    if path.startswith(PREFIX) and path.endswith(SUFFIX):
        return path[len(PREFIX):-len(SUFFIX)]
    return None


def parse_model(name: str) -> dict[str, str] | None:
    """``{"project", "location", "model"}`` of a Vertex model name (project/location "" in express mode)."""
    m = _MODEL.match(name)
    if not m:
        return None
    return {k: v or "" for k, v in m.groupdict().items()}


@dataclass
class TokenIssuer:
    """Service-account public keys trusted for assertions, and the Bearer tokens handed out."""

    public_keys: list[bytes] = field(default_factory=list)
    tokens: dict[str, tuple[float, str]] = field(default_factory=dict)  # token → (expiry, client email)
    issued: int = 0
    refused: int = 0

    def bearer_ok(self, header: str) -> bool:
        if not header.startswith("Bearer "):
            return False
        entry = self.tokens.get(header[len("Bearer "):].strip())
        return entry is not None and entry[0] > time.time()

    def exchange(self, body: bytes) -> tuple[int, dict[str, object]]:
        """The OAuth 2.0 JWT-bearer grant (RFC 7523) as Google's token endpoint answers it."""
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        if (form.get("grant_type") or [""])[0] != JWT_BEARER:
            return 400, {"error": "unsupported_grant_type", "error_description": "expected " + JWT_BEARER}
        assertion = (form.get("assertion") or [""])[0]
        claims = self._verify(assertion)
        if claims is None:
            self.refused += 1
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        if not str(claims.get("aud", "")).endswith("/token") or not claims.get("scope"):
            self.refused += 1
            return 400, {"error": "invalid_scope",
                         "error_description": "aud must be the token URI and a scope given"}
        token = "emu-" + secrets.token_urlsafe(24)
        self.tokens[token] = (time.time() + TOKEN_SECONDS, str(claims.get("iss", "")))
        self.issued += 1
        return 200, {"access_token": token, "expires_in": TOKEN_SECONDS, "token_type": "Bearer"}

    def _verify(self, assertion: str) -> dict[str, object] | None:
        from google.auth import exceptions, jwt

        for pem in self.public_keys:
            try:
                return dict(jwt.decode(assertion, certs=pem, verify=True, clock_skew_in_seconds=30))
            except (ValueError, exceptions.GoogleAuthError):
                continue
        return None


def connection_class(issuer: TokenIssuer) -> type[ServerConnection]:
    """A websockets ``ServerConnection`` that answers ``POST /token`` before the websocket parser sees it."""

    class TokenAwareConnection(ServerConnection):
        _sniff: bytearray | None = None
        _decided = False

        def data_received(self, data: bytes) -> None:
            if self._decided:
                super().data_received(data)
                return
            buf = (self._sniff or bytearray()) + data
            if len(buf) < 5 and b"\r\n" not in buf:
                self._sniff = buf
                return
            if not buf.startswith(b"POST "):
                self._decided = True
                super().data_received(bytes(buf))
                return
            head, sep, body = bytes(buf).partition(b"\r\n\r\n")
            if not sep:
                if len(buf) > MAX_BODY:
                    self._answer(413, {"error": "request too large"})
                self._sniff = buf
                return
            length = _content_length(head)
            if length is None or length > MAX_BODY:
                self._answer(400 if length is None else 413, {"error": "bad request body"})
                return
            if len(body) < length:
                self._sniff = buf
                return
            path = head.split(b" ", 2)[1].decode("latin-1", "replace") if head.count(b" ") >= 2 else ""
            if urllib.parse.urlsplit(path).path != "/token":
                self._answer(404, {"error": "not found"})
                return
            self._answer(*issuer.exchange(body[:length]))

        def _answer(self, status: int, payload: dict[str, object]) -> None:
            self._decided = True
            data = json.dumps(payload).encode()
            reason = "OK" if status == 200 else "Error"
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
            self.transport.write(head + data)
            self.transport.close()

    return TokenAwareConnection


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return 0
