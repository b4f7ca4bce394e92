"""Envelope encryption at rest: AES-256-GCM data keys per (tenant, period), wrapped by a master key.

Why envelope keys (not one key for everything): rotating the master key re-wraps a handful of small
data keys instead of re-encrypting every stored transcript; deleting one data key crypto-shreds a
tenant's period (backups included); and a KMS/Vault only ever sees data keys, never call content.

Pieces (each replaceable):
- :class:`MasterKeys` — the key-encryption keys. The built-in one reads a systemd credential
  (``compliance.master_key_file``): one ``<kek-id>:<base64 32 bytes>`` per line, the LAST line is the
  current one (rotation = append a line; old lines stay until `keys rewrap` has moved every data key).
  A KMS or Vault Transit backend implements the same two methods (``wrap``/``unwrap``) — see
  docs/compliance.md.
- :class:`KeyStore` — where wrapped data keys live (:class:`FileKeyStore` for a box's spool; the records
  database keeps its own table with the same fields).
- :class:`Keyring` — seals and opens values.

Sealed value (bytes): ``0x01 | len(key_id) | key_id | nonce(12) | ciphertext+tag``. The header and the
caller's ``context`` (e.g. ``b"call:<id>:transcript"``) are the GCM associated data, so a ciphertext moved
to another record or field fails to open. Any failure to open is :class:`DecryptError` naming the key id
and why — never plaintext, never a crash. `cryptography` is the well-kept AEAD implementation (already a
dependency for JWTs).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
_KEK_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TENANT = re.compile(r"[^a-z0-9-]")


class DecryptError(ValueError):
    """A sealed value could not be opened (unknown key, wrong key, tampered bytes or wrong context)."""


class KeyConfigError(ValueError):
    """The master key material is missing or malformed (the message names the line, never the key)."""


@dataclass(frozen=True)
class WrappedKey:
    """One data key as stored: only its wrapped form, under the master key ``kek_id``."""

    key_id: str
    tenant: str
    period: str
    kek_id: str
    wrapped: str  # base64 (nonce | AES-GCM(kek, dek))
    created_at: float
    retired: bool = False  # no new seals; still opens old data


class Wrapper(Protocol):
    """What a master-key backend (local credential, KMS, Vault Transit) must do."""

    @property
    def current_id(self) -> str: ...

    def wrap(self, dek: bytes, aad: bytes) -> tuple[str, bytes]: ...

    def unwrap(self, kek_id: str, wrapped: bytes, aad: bytes) -> bytes: ...


class MasterKeys:
    """Master keys from a credential file (``<kek-id>:<base64 key>`` per line; last line current)."""

    def __init__(self, keys: dict[str, bytes], current: str) -> None:
        if current not in keys:
            raise KeyConfigError("the current master key id is not among the keys")
        self._keys = dict(keys)
        self._current = current

    @classmethod
    def parse(cls, text: str) -> MasterKeys:
        keys: dict[str, bytes] = {}
        current = ""
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            kid, sep, b64 = line.partition(":")
            if not sep or not _KEK_ID.match(kid):
                raise KeyConfigError(f"master key line {n}: expected '<id>:<base64 key>'")
            try:
                key = base64.b64decode(b64, validate=True)
            except binascii.Error:
                raise KeyConfigError(f"master key line {n} ({kid}): not base64") from None
            if len(key) != KEY_BYTES:
                raise KeyConfigError(f"master key line {n} ({kid}): {len(key)} bytes, need {KEY_BYTES}")
            if kid in keys:
                raise KeyConfigError(f"master key line {n}: duplicate id {kid}")
            keys[kid] = key
            current = kid
        if not keys:
            raise KeyConfigError("no master key in the credential")
        return cls(keys, current)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> MasterKeys:
        return cls.parse(Path(path).read_text())

    @staticmethod
    def new_line(kek_id: str) -> str:
        """A fresh credential line for :meth:`parse` (``voice-appliance keys new-master``)."""
        if not _KEK_ID.match(kek_id):
            raise KeyConfigError("master key id: letters, digits, '_', '.', '-' (1-64)")
        return f"{kek_id}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"

    @property
    def current_id(self) -> str:
        return self._current

    def wrap(self, dek: bytes, aad: bytes) -> tuple[str, bytes]:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return self._current, nonce + AESGCM(self._keys[self._current]).encrypt(nonce, dek, aad)

    def unwrap(self, kek_id: str, wrapped: bytes, aad: bytes) -> bytes:
        key = self._keys.get(kek_id)
        if key is None:
            raise DecryptError(f"master key {kek_id!r} is not loaded")
        try:
            return AESGCM(key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptError(f"data key does not open under master key {kek_id!r}") from None


class KeyStore(Protocol):
    def get(self, key_id: str) -> WrappedKey | None: ...

    def put(self, key: WrappedKey) -> None: ...

    def delete(self, key_id: str) -> None: ...

    def all(self) -> list[WrappedKey]: ...


class FileKeyStore:
    """Wrapped data keys in one JSON file (0600, replaced atomically): small, a box's own spool keys."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys: dict[str, WrappedKey] = {}
        if self.path.exists():
            for item in json.loads(self.path.read_text()):
                key = WrappedKey(**item)
                self._keys[key.key_id] = key

    def _save(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([asdict(k) for k in self._keys.values()], f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def get(self, key_id: str) -> WrappedKey | None:
        return self._keys.get(key_id)

    def put(self, key: WrappedKey) -> None:
        with self._lock:
            self._keys[key.key_id] = key
            self._save()

    def delete(self, key_id: str) -> None:
        with self._lock:
            if self._keys.pop(key_id, None) is not None:
                self._save()

    def all(self) -> list[WrappedKey]:
        return list(self._keys.values())


def _period(now: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(now))


def _tenant_tag(tenant: str) -> str:
    return _TENANT.sub("-", (tenant or "default").lower())[:32] or "default"


def _wrap_aad(key_id: str) -> bytes:
    return b"va-dek:" + key_id.encode()


class Keyring:
    """Seal/open values with per-(tenant, month) data keys; rotate and re-wrap without downtime."""

    def __init__(self, master: Wrapper, store: KeyStore, clock: Callable[[], float] = time.time) -> None:
        self.master = master
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._plain: dict[str, bytes] = {}  # unwrapped data keys, in memory only

    # -- data keys -------------------------------------------------------------------------------
    def _current_key(self, tenant: str) -> tuple[str, bytes]:
        tag, period = _tenant_tag(tenant), _period(self.clock())
        with self._lock:
            live = [k for k in self.store.all() if k.tenant == tag and k.period == period and not k.retired]
            if live:
                key = max(live, key=lambda k: k.created_at)
                return key.key_id, self._open_key(key)
            key_id = f"{tag}.{period}.{secrets.token_hex(4)}"
            dek = AESGCM.generate_key(bit_length=256)
            kek_id, wrapped = self.master.wrap(dek, _wrap_aad(key_id))
            self.store.put(WrappedKey(key_id, tag, period, kek_id, base64.b64encode(wrapped).decode(),
                                      self.clock()))
            self._plain[key_id] = dek
            return key_id, dek

    def _open_key(self, key: WrappedKey) -> bytes:
        dek = self._plain.get(key.key_id)
        if dek is None:
            dek = self.master.unwrap(key.kek_id, base64.b64decode(key.wrapped), _wrap_aad(key.key_id))
            self._plain[key.key_id] = dek
        return dek

    def rotate(self, tenants: Iterable[str] | None = None) -> list[str]:
        """Retire the current data keys (all tenants, or the given ones): the next seal makes a new key.
        Old keys keep opening old data. Returns the retired key ids."""
        wanted = None if tenants is None else {_tenant_tag(t) for t in tenants}
        retired = []
        with self._lock:
            for key in self.store.all():
                if not key.retired and (wanted is None or key.tenant in wanted):
                    self.store.put(WrappedKey(**{**asdict(key), "retired": True}))
                    retired.append(key.key_id)
        return retired

    def rewrap(self) -> int:
        """Re-wrap every data key under the master's current key (after adding a master key line);
        data is not touched. Returns how many keys moved."""
        moved = 0
        with self._lock:
            for key in self.store.all():
                if key.kek_id == self.master.current_id:
                    continue
                dek = self._open_key(key)
                kek_id, wrapped = self.master.wrap(dek, _wrap_aad(key.key_id))
                self.store.put(WrappedKey(**{**asdict(key), "kek_id": kek_id,
                                             "wrapped": base64.b64encode(wrapped).decode()}))
                moved += 1
        return moved

    def shred(self, key_ids: Iterable[str]) -> None:
        """Delete data keys: what they sealed can never be opened again (crypto-erasure)."""
        with self._lock:
            for key_id in key_ids:
                self.store.delete(key_id)
                self._plain.pop(key_id, None)

    # -- values ----------------------------------------------------------------------------------
    def seal(self, plaintext: bytes, *, context: bytes, tenant: str = "") -> bytes:
        key_id, dek = self._current_key(tenant)
        kid = key_id.encode()
        header = bytes([VERSION, len(kid)]) + kid
        nonce = secrets.token_bytes(NONCE_BYTES)
        return header + nonce + AESGCM(dek).encrypt(nonce, plaintext, header + b"|" + context)

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        if len(blob) < 2 or blob[0] != VERSION or len(blob) < 2 + blob[1] + NONCE_BYTES + 16:
            raise DecryptError("not a sealed value (bad header or too short)")
        return blob[2:2 + blob[1]].decode("ascii", "replace")

    def open(self, blob: bytes, *, context: bytes) -> bytes:
        key_id = self.key_id_of(blob)
        key = self.store.get(key_id)
        if key is None:
            raise DecryptError(f"data key {key_id!r} not found (shredded or from another keyring)")
        header_len = 2 + blob[1]
        header, nonce, body = blob[:header_len], blob[header_len:header_len + NONCE_BYTES], \
            blob[header_len + NONCE_BYTES:]
        try:
            return AESGCM(self._open_key(key)).decrypt(nonce, body, header + b"|" + context)
        except InvalidTag:
            raise DecryptError(f"value sealed with {key_id!r} failed authentication "
                               "(tampered, or opened with the wrong context)") from None
