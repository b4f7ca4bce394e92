"""Encryption at rest applied to the call records: the master key credential, the PostgreSQL key store,
the spool's key stores, and sealing/opening of the sensitive fields of a record item.

Where each piece of ``envelope`` lives:
- master key: ``compliance.master_key_file`` (a credential; default ``<paths.state_dir>/secrets/
  master-key``). `voice-appliance run`, the supervisor and the .deb postinst create it when missing
  (:func:`ensure_master_key`); the fleet shares one file so every box opens every record.
- data keys of the records database: the ``data_keys`` table (:class:`PgKeyStore`). The Keyring API is
  synchronous, the database async: the store is an in-memory copy that :meth:`PgKeyStore.load` refreshes
  and :meth:`PgKeyStore.flush` writes back (new or changed keys) inside the caller's transaction, so a
  data key commits with the first value it sealed, or not at all.
- data keys of a spool directory: ``keys.json`` in that directory (one producer per directory writes
  it; the reader re-reads it when it meets a key it does not know, :class:`SpoolKeyStore`).

What is sealed (``SEALED_FIELDS``): transcript text, and any field named in that table for other item
kinds (a callback number, …). A spool item carries them as ``"sealed": base64(seal(json(fields)))``
with the item id as context; the database column ``transcript_lines.text_sealed`` with the line id.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.compliance.envelope import DecryptError, FileKeyStore, Keyring, MasterKeys, WrappedKey
from appliance.config import credential_path

# item kind → the fields sealed in the spool (they are opened by the writer and sealed again for the
# database, so the spool's keys never need to leave the box)
SEALED_FIELDS: dict[str, tuple[str, ...]] = {"transcript": ("text",), "event": ("callback_number",)}


def master_key_path(cfg: Any) -> Path:
    configured = cfg.compliance.master_key_file
    if configured:
        return credential_path(configured)
    return Path(cfg.paths.state_dir) / "secrets" / "master-key"


def ensure_master_key(path: Path, kek_id: str = "m1") -> bool:
    """Create the master key credential (0600) if it does not exist. True if created."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(MasterKeys.new_line(kek_id) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # never replaces a key another process created meanwhile
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def load_master(cfg: Any, *, create: bool = True) -> MasterKeys:
    path = master_key_path(cfg)
    if create:
        ensure_master_key(path)
    return MasterKeys.from_file(path)


# -- spool ---------------------------------------------------------------------------------------
class SpoolKeyStore(FileKeyStore):
    """A spool directory's ``keys.json``; the reader side re-reads it on a miss (the producer adds keys)."""

    def get(self, key_id: str) -> WrappedKey | None:
        key = super().get(key_id)
        if key is None and self.path.exists():
            with self._lock:
                for item in json.loads(self.path.read_text()):
                    k = WrappedKey(**item)
                    self._keys[k.key_id] = k
            key = super().get(key_id)
        return key


def spool_keyring(master: MasterKeys, directory: Path) -> Keyring:
    directory.mkdir(parents=True, exist_ok=True)
    return Keyring(master, SpoolKeyStore(directory / "keys.json"))


def seal_item(keyring: Keyring, item: dict[str, Any]) -> dict[str, Any]:
    """The spool form of ``item``: its sensitive fields replaced by one sealed blob."""
    fields = SEALED_FIELDS.get(str(item.get("kind")), ())
    secret = {f: item[f] for f in fields if f in item}
    if not secret:
        return item
    out = {k: v for k, v in item.items() if k not in secret}
    blob = keyring.seal(json.dumps(secret, ensure_ascii=False).encode(), context=_spool_ctx(item),
                        tenant=str(item.get("tenant") or ""))
    out["sealed"] = base64.b64encode(blob).decode()
    return out


def open_item(keyring: Keyring, item: dict[str, Any]) -> dict[str, Any]:
    """The plain item back (reader side). Raises DecryptError naming the key, never the content."""
    sealed = item.get("sealed")
    if not isinstance(sealed, str):
        return item
    try:
        blob = base64.b64decode(sealed, validate=True)
    except ValueError:
        raise DecryptError("sealed field is not base64") from None
    fields = json.loads(keyring.open(blob, context=_spool_ctx(item)))
    out = {k: v for k, v in item.items() if k != "sealed"}
    out.update(fields)
    return out


def _spool_ctx(item: dict[str, Any]) -> bytes:
    return f"spool:{item.get('id')}:{item.get('kind')}".encode()


SEALED_PREFIX = "sealed:"


def seal_text(keyring: Keyring | None, text: str, context: bytes, tenant: str = "") -> str:
    """A text column's sealed form (``sealed:<base64>``); unchanged without a keyring."""
    if keyring is None:
        return text
    return SEALED_PREFIX + base64.b64encode(keyring.seal(text.encode(), context=context,
                                                          tenant=tenant)).decode()


def open_text(keyring: Keyring | None, value: str, context: bytes) -> str:
    """Inverse of :func:`seal_text` (a plain value passes through). Raises DecryptError."""
    if not value.startswith(SEALED_PREFIX):
        return value
    if keyring is None:
        raise DecryptError("sealed value but no master key configured")
    try:
        blob = base64.b64decode(value[len(SEALED_PREFIX):], validate=True)
    except ValueError:
        raise DecryptError("sealed value is not base64") from None
    return keyring.open(blob, context=context).decode()


def webhook_text_ctx(event_id: str) -> bytes:
    return f"webhook-text:{event_id}".encode()


def webhook_body_ctx(event_id: str) -> bytes:
    return f"webhook-body:{event_id}".encode()


def transcript_ctx(line_id: str) -> bytes:
    return f"transcript:{line_id}".encode()


def callback_ctx(event_id: str) -> bytes:
    """A callback number in ``call_events.data`` (issue 15)."""
    return f"callback:{event_id}".encode()


# -- PostgreSQL ----------------------------------------------------------------------------------
class PgKeyStore:
    """The ``data_keys`` table as a :class:`~appliance.compliance.envelope.KeyStore` (see the docstring)."""

    def __init__(self) -> None:
        self._keys: dict[str, WrappedKey] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()

    async def load(self, conn: Any) -> None:
        cur = await conn.execute("SELECT key_id, tenant, period, kek_id, wrapped, created_at, retired"
                                 " FROM data_keys")
        rows = await cur.fetchall()
        self._keys = {r[0]: WrappedKey(r[0], r[1], r[2], r[3], r[4], r[5].timestamp(), bool(r[6]))
                      for r in rows}
        self._dirty.clear()
        self._deleted.clear()

    async def flush(self, conn: Any) -> int:
        """Write new/changed/deleted keys (call inside the transaction that uses them)."""
        n = 0
        for key_id in sorted(self._dirty):
            k = self._keys.get(key_id)
            if k is None:
                continue
            await conn.execute(
                "INSERT INTO data_keys (key_id, tenant, period, kek_id, wrapped, created_at, retired)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (key_id) DO UPDATE SET kek_id = EXCLUDED.kek_id,"
                " wrapped = EXCLUDED.wrapped, retired = data_keys.retired OR EXCLUDED.retired",
                (k.key_id, k.tenant, k.period, k.kek_id, k.wrapped,
                 datetime.fromtimestamp(k.created_at, UTC), k.retired))
            n += 1
        for key_id in sorted(self._deleted):
            await conn.execute("DELETE FROM data_keys WHERE key_id = %s", (key_id,))
            n += 1
        self._dirty.clear()
        self._deleted.clear()
        return n

    # KeyStore protocol (synchronous, in memory)
    def get(self, key_id: str) -> WrappedKey | None:
        return self._keys.get(key_id)

    def put(self, key: WrappedKey) -> None:
        self._keys[key.key_id] = key
        self._dirty.add(key.key_id)

    def delete(self, key_id: str) -> None:
        if self._keys.pop(key_id, None) is not None:
            self._deleted.add(key_id)

    def all(self) -> list[WrappedKey]:
        return list(self._keys.values())


def db_keyring(master: MasterKeys, clock: Callable[[], float] | None = None) -> Keyring:
    store = PgKeyStore()
    return Keyring(master, store) if clock is None else Keyring(master, store, clock)


def pg_store(keyring: Keyring) -> PgKeyStore:
    store = keyring.store
    assert isinstance(store, PgKeyStore)
    return store


def describe(keyring: Keyring) -> list[dict[str, Any]]:
    """The data keys without their material (``voice-appliance keys list``)."""
    return [{k: v for k, v in asdict(key).items() if k != "wrapped"} for key in keyring.store.all()]
