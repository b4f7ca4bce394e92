"""A minimal TURN client (RFC 8656 over UDP) for testing coturn's peer policy.

    c = TurnClient(("10.213.0.2", 3478), username, password)
    c.allocate()                      # long-term credential auth (401 → realm/nonce → MESSAGE-INTEGRITY)
    c.create_permission("127.0.0.1")  # → TurnError(403) when coturn's peer policy refuses the address
    c.send("10.213.0.2", 20001, b"x") # a Send indication; c.receive() returns (peer, data) from a Data one

turnutils_uclient only relays between its own two allocations; testing *which peers* a relay reaches
needs CreatePermission to an arbitrary address and a Send indication, so this speaks the protocol
itself (~150 lines of stdlib; no maintained Python TURN client library exists to pull in instead).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

MAGIC = 0x2112A442
ALLOCATE, CREATE_PERMISSION, SEND_IND, DATA_IND = 0x0003, 0x0008, 0x0016, 0x0017
SUCCESS, ERROR = 0x0100, 0x0110
A_USERNAME, A_MI, A_ERROR, A_LIFETIME = 0x0006, 0x0008, 0x0009, 0x000D
A_PEER, A_DATA, A_REALM, A_NONCE, A_RELAYED = 0x0012, 0x0013, 0x0014, 0x0015, 0x0016
A_FAMILY, A_TRANSPORT = 0x0017, 0x0019
UDP, TCP = 17, 6


class TurnError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


@dataclass
class Message:
    type: int
    tid: bytes
    attrs: list[tuple[int, bytes]]

    def get(self, t: int) -> bytes | None:
        return next((v for k, v in self.attrs if k == t), None)


def _attr(t: int, v: bytes) -> bytes:
    return struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4)


def _xor_addr(ip: str, port: int, tid: bytes) -> bytes:
    addr = ipaddress.ip_address(ip)
    mask = struct.pack("!I", MAGIC) + (tid if addr.version == 6 else b"")
    raw = bytes(a ^ b for a, b in zip(addr.packed, mask[: len(addr.packed)], strict=True))
    return struct.pack("!BBH", 0, 1 if addr.version == 4 else 2, port ^ (MAGIC >> 16)) + raw


def _unxor_addr(v: bytes, tid: bytes) -> tuple[str, int]:
    family, port = v[1], struct.unpack("!H", v[2:4])[0] ^ (MAGIC >> 16)
    mask = struct.pack("!I", MAGIC) + (tid if family == 2 else b"")
    raw = bytes(a ^ b for a, b in zip(v[4:], mask[: len(v) - 4], strict=True))
    return str(ipaddress.ip_address(raw)), port


def parse(data: bytes) -> Message:
    mtype, length, magic = struct.unpack("!HHI", data[:8])
    if magic != MAGIC:
        raise ValueError("not a STUN message")
    tid, attrs, i = data[8:20], [], 20
    while i < 20 + length:
        t, n = struct.unpack("!HH", data[i:i + 4])
        attrs.append((t, data[i + 4:i + 4 + n]))
        i += 4 + n + (-n % 4)
    return Message(mtype, tid, attrs)


class TurnClient:
    """One UDP allocation on a TURN server; blocking calls with a per-call timeout."""

    def __init__(self, server: tuple[str, int], username: str, password: str, timeout: float = 2.0) -> None:
        self.server = server
        self.username, self.password = username, password
        self.sock = socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.realm = self.nonce = b""
        self.relayed: tuple[str, int] | None = None

    def close(self) -> None:
        self.sock.close()

    def _encode(self, mtype: int, tid: bytes, attrs: list[tuple[int, bytes]], integrity: bool) -> bytes:
        body = b"".join(_attr(t, v) for t, v in attrs)
        if integrity and self.realm:
            body = (_attr(A_USERNAME, self.username.encode()) + _attr(A_REALM, self.realm)
                    + _attr(A_NONCE, self.nonce) + body)
            key = hashlib.md5(f"{self.username}:{self.realm.decode()}:{self.password}".encode()).digest()
            head = struct.pack("!HHI", mtype, len(body) + 24, MAGIC) + tid
            body += _attr(A_MI, hmac.new(key, head + body, hashlib.sha1).digest())
        return struct.pack("!HHI", mtype, len(body), MAGIC) + tid + body

    def _request(self, method: int, attrs: Callable[[bytes], list[tuple[int, bytes]]]) -> Message:
        """Send a request (``attrs(tid)``: XOR-PEER-ADDRESS of a v6 peer depends on the transaction id)."""
        for _ in range(3):  # first try unauthenticated (learns realm/nonce), then with credentials
            tid = os.urandom(12)
            self.sock.sendto(self._encode(method, tid, attrs(tid), integrity=True), self.server)
            while True:
                msg = parse(self.sock.recv(65535))
                if msg.tid == tid:
                    break
            if msg.type == method | SUCCESS:
                return msg
            err = msg.get(A_ERROR) or b"\0\0\0\0"
            code = err[2] * 100 + err[3]
            if code in (401, 438) and msg.get(A_NONCE):
                self.realm = msg.get(A_REALM) or self.realm
                self.nonce = msg.get(A_NONCE) or b""
                continue
            raise TurnError(code, err[4:].decode(errors="replace"))
        raise TurnError(401, "authentication failed")

    def allocate(self, transport: int = UDP, family: int = 4) -> tuple[str, int]:
        attrs = [(A_TRANSPORT, bytes([transport, 0, 0, 0])), (A_LIFETIME, struct.pack("!I", 600))]
        if family == 6:
            attrs.append((A_FAMILY, bytes([2, 0, 0, 0])))
        msg = self._request(ALLOCATE, lambda _tid: attrs)
        relayed = msg.get(A_RELAYED)
        assert relayed is not None, "no XOR-RELAYED-ADDRESS"
        self.relayed = _unxor_addr(relayed, msg.tid)
        return self.relayed

    def create_permission(self, peer_ip: str) -> None:
        self._request(CREATE_PERMISSION, lambda tid: [(A_PEER, _xor_addr(peer_ip, 0, tid))])

    def send(self, peer_ip: str, port: int, data: bytes) -> None:
        tid = os.urandom(12)
        self.sock.sendto(self._encode(SEND_IND, tid, [(A_PEER, _xor_addr(peer_ip, port, tid)),
                                                       (A_DATA, data)], integrity=False), self.server)

    def receive(self) -> tuple[tuple[str, int], bytes]:
        """The next Data indication: ((peer ip, port), data). socket.timeout when none comes."""
        while True:
            msg = parse(self.sock.recv(65535))
            if msg.type == DATA_IND:
                peer, data = msg.get(A_PEER), msg.get(A_DATA)
                assert peer is not None and data is not None
                return _unxor_addr(peer, msg.tid), data
