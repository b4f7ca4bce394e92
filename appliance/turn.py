"""coturn time-limited credentials (the TURN REST API scheme, coturn ``use-auth-secret``).

coturn and the appliance share one secret; the appliance hands each caller a username
``"<expiry-unix>:<user>"`` and password ``base64(HMAC-SHA1(secret, username))``. coturn recomputes the
HMAC and refuses the username once its expiry has passed, so no per-user state is needed anywhere. The
scheme is 15 lines of stdlib code; no library is worth a dependency for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from appliance.config import TurnConfig, secret

MAX_TTL_SECONDS = 3600


@dataclass(frozen=True)
class TurnCredential:
    username: str
    password: str
    expires_at: int


def credential(shared_secret: str, user: str, ttl_seconds: int, now: float | None = None) -> TurnCredential:
    """Mint one credential for ``user`` valid ``ttl_seconds`` (capped at one hour) from ``now``."""
    if not shared_secret:
        raise ValueError("TURN shared secret is empty")
    if ":" in user:
        raise ValueError("TURN user must not contain ':'")
    ttl = max(1, min(int(ttl_seconds), MAX_TTL_SECONDS))
    expires = int(time.time() if now is None else now) + ttl
    username = f"{expires}:{user}"
    digest = hmac.new(shared_secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode("ascii"), expires)


def default_uris(public_host: str) -> list[str]:
    """TURN URIs for a box reachable at ``public_host``: UDP and TCP on 3478, TLS on 5349."""
    host = f"[{public_host}]" if ":" in public_host else public_host
    return [
        f"turn:{host}:3478?transport=udp",
        f"turn:{host}:3478?transport=tcp",
        f"turns:{host}:5349?transport=tcp",
    ]


def ice_servers(cfg: TurnConfig, user: str, public_host: str = "", now: float | None = None) -> list[dict]:
    """The RTCPeerConnection ``iceServers`` list for one caller (STUN entries first, then TURN).

    Without a configured secret no TURN entry is returned (the caller falls back to host/STUN
    candidates); without configured URIs the standard ports on ``public_host`` are used.
    """
    servers: list[dict] = []
    if cfg.stun_uris:
        servers.append({"urls": list(cfg.stun_uris)})
    shared = secret(cfg.secret, cfg.secret_file)
    uris = list(cfg.uris) or (default_uris(public_host) if public_host else [])
    if shared and uris:
        cred = credential(shared, user, cfg.ttl_seconds, now)
        servers.append({"urls": uris, "username": cred.username, "credential": cred.password})
    return servers
