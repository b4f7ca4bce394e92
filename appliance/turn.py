"""coturn time-limited credentials (the TURN REST API scheme, coturn ``use-auth-secret``) and the relay's
peer policy.

coturn and the appliance share one secret; the appliance hands each caller a username
``"<expiry-unix>:<user>"`` and password ``base64(HMAC-SHA1(secret, username))``. coturn recomputes the
HMAC and refuses the username once its expiry has passed, so no per-user state is needed anywhere. The
scheme is 15 lines of stdlib code; no library is worth a dependency for it.

``<user>`` is a keyed hash of the caller's JWT ``sub`` (:func:`turn_user`): stable per caller, so
coturn's ``user-quota`` binds per caller, and meaningless without the secret, so coturn's logs hold no
personal data. The peer policy (:func:`peer_policy_lines`) denies every peer address except Janus's own
ICE addresses: a relay is a way to Janus on this box, never into the box or its network (the threat
model is in docs/security.md; the Ansible role's template renders the same lines).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass

from appliance.config import TurnConfig, secret

MAX_TTL_SECONDS = 600  # a leaked credential is good for ten minutes at most (the JWT lives 15)
# Every address there is: coturn checks allowed-peer-ip before denied-peer-ip, so this plus
# allowed-peer-ip=<Janus> leaves exactly Janus reachable (private, loopback, reserved and the box's own
# other addresses included).
DENY_ALL_PEERS = ("0.0.0.0-255.255.255.255", "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
DEFAULT_MAX_BPS = 64000  # bytes/s per allocation: Opus at its 510 kb/s maximum plus RTCP fits


@dataclass(frozen=True)
class TurnCredential:
    username: str
    password: str
    expires_at: int


def turn_user(shared_secret: str, sub: str) -> str:
    """The TURN user for the caller ``sub``: ``u_`` + 128 bits of HMAC-SHA256(secret, "turn-user" ‖ sub).

    Stable for one caller on every box of a fleet (they share the secret), unlinkable to ``sub`` without it.
    """
    if not shared_secret:
        raise ValueError("TURN shared secret is empty")
    mac = hmac.new(shared_secret.encode(), b"turn-user\0" + sub.encode(), hashlib.sha256).digest()
    return "u_" + base64.urlsafe_b64encode(mac[:16]).decode("ascii").rstrip("=")


def credential(shared_secret: str, user: str, ttl_seconds: int, now: float | None = None) -> TurnCredential:
    """Mint one credential for ``user`` valid ``ttl_seconds`` (capped at :data:`MAX_TTL_SECONDS`)."""
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
    """TURN URIs for a box reachable at ``public_host``: UDP on 3478, TLS on 5349 (no TCP relay, but
    TCP and TLS to coturn itself still get a caller out of a UDP-blocking network)."""
    host = f"[{public_host}]" if ":" in public_host else public_host
    return [
        f"turn:{host}:3478?transport=udp",
        f"turn:{host}:3478?transport=tcp",
        f"turns:{host}:5349?transport=tcp",
    ]


def peer_policy_lines(janus_addresses: list[str], max_bps: int = DEFAULT_MAX_BPS) -> list[str]:
    """coturn config lines that confine relays to ``janus_addresses`` (v4 and/or v6) over UDP.

    No address at all leaves every peer denied (a relay that relays nothing) rather than open.
    """
    for a in janus_addresses:
        ipaddress.ip_address(a)  # ValueError on anything but one plain address
    lines = ["no-tcp-relay", "no-multicast-peers", f"max-bps={int(max_bps)}"]
    lines += [f"denied-peer-ip={r}" for r in DENY_ALL_PEERS]
    lines += [f"allowed-peer-ip={a}" for a in janus_addresses]
    return lines


def ice_servers(cfg: TurnConfig, sub: str, public_host: str = "", now: float | None = None) -> list[dict]:
    """The RTCPeerConnection ``iceServers`` list for the caller ``sub`` (STUN entries first, then TURN).

    Without a configured secret no TURN entry is returned (the caller falls back to host/STUN
    candidates); without configured URIs the standard ports on ``public_host`` are used.
    """
    servers: list[dict] = []
    if cfg.stun_uris:
        servers.append({"urls": list(cfg.stun_uris)})
    shared = secret(cfg.secret, cfg.secret_file)
    uris = list(cfg.uris) or (default_uris(public_host) if public_host else [])
    if shared and uris:
        cred = credential(shared, turn_user(shared, sub), cfg.ttl_seconds, now)
        servers.append({"urls": uris, "username": cred.username, "credential": cred.password})
    return servers
