"""The session API's own TLS (single-box installs, where the box terminates public TLS itself).

One policy: TLS 1.2 or 1.3, forward-secret AEAD suites only (uvicorn's default admits SHA-1 CBC suites
under TLS 1.2), no compression or renegotiation. Certificate renewal must not restart the supervisor
(that would end every call), so :class:`CertReloader` watches the certificate and key files and loads the
new chain into the *same* SSLContext: each new handshake gets the new certificate, established
connections and calls carry on untouched. A half-written pair (key and certificate from different
renewals) fails to load and is retried on the next check; the old certificate stays in service meanwhile.
:class:`HstsMiddleware` adds ``Strict-Transport-Security`` to every response served over TLS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("appliance.tls")

# Mozilla's "intermediate" TLS 1.2 list without the DHE suites (TLS 1.3 suites are all AEAD already).
AEAD_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
HSTS_VALUE = b"max-age=31536000"  # one year; no includeSubDomains: the operator's other hosts are theirs
RELOAD_CHECK_SECONDS = 10.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server SSLContext with the appliance's TLS policy and the given certificate chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _signature(*paths: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)  # follows symlinks (certbot's live/ links point at the current archive files)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class CertReloader:
    """Owns the API's SSLContext and reloads its certificate chain in place when the files change."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self._seen = _signature(cert_file, key_file)
        self.context = server_context(cert_file, key_file)
        self.reloads = 0

    def check(self) -> bool:
        """Reload when either file changed since the last successful load; True if it reloaded."""
        try:
            sig = _signature(self.cert_file, self.key_file)
            if sig == self._seen:
                return False
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:  # mid-renewal or broken: keep serving the old chain
            log.error("TLS certificate reload failed; still serving the previous certificate",
                      extra={"cert_file": self.cert_file, "error": str(exc)})
            return False
        self._seen = sig
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"cert_file": self.cert_file})
        return True

    async def run(self, interval: float = RELOAD_CHECK_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.check)


class HstsMiddleware:
    """ASGI middleware: ``Strict-Transport-Security`` on every HTTP response sent over TLS."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"strict-transport-security", HSTS_VALUE))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_hsts)
