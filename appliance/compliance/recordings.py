"""Call recordings at rest: where they live, how they are sealed, read back, paused, erased and purged.

The AI worker writes them (``workers/ai/recording.py``); the admin API, retention and GDPR requests read
and delete them through :class:`RecordingStore`. Layout under ``<paths.state_dir>/recordings``:

- ``shard-<n>/keys.json`` — the writing shard's wrapped data keys (envelope keys, per tenant and month,
  under ``compliance.master_key_file``; one writer process per directory, like the record spool);
- ``shard-<n>/<session>.<part>.ogg.sealed`` — the Ogg Opus file, sealed in chunks as it is written:
  ``u32 length | sealed blob`` records, each an AES-256-GCM envelope value whose associated data names
  the session, part, chunk number and whether it is the last chunk. A chunk moved, reordered, edited or
  dropped fails to open; a file whose last chunk is not marked final was cut short (the writer died) and
  is served as far as it goes, flagged incomplete. No plaintext Ogg ever touches the disk;
- ``shard-<n>/<session>.<part>.json`` — the sidecar (plain JSON, timings only, no content): channel roles
  (left = caller, right = AI), the AI-generated segments of the right channel (EU AI Act art. 50(2)
  marking; the Ogg's own OpusTags also name the AI channel) and the gaps (paused by an operator, during
  secure keypad entry, or audio dropped under overload). A restarted AI worker starts a new part;
- ``control/<session>.pause`` — present while an operator has paused the recording (the worker polls it;
  no socket between the admin API and the workers is needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.compliance.atrest import SpoolKeyStore, load_master
from appliance.compliance.envelope import DecryptError, KeyConfigError, Keyring, MasterKeys

SUFFIX = ".ogg.sealed"
_LEN = struct.Struct(">I")
MAX_CHUNK = 16 * 1024 * 1024
SESSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
DAY = 86400.0


def recordings_root(cfg: Any) -> Path:
    return Path(cfg.paths.state_dir) / "recordings"


def records_audio(policy: str) -> bool:
    """A ``recording`` policy (``tenants.<name>.recording``, ``compliance.recording``) that keeps audio."""
    return policy in ("audio", "audio_and_transcript")


def chunk_context(session: str, part: int, index: int, final: bool) -> bytes:
    return f"recording:{session}:{part}:{index}:{'final' if final else 'more'}".encode()


def write_chunk(f: Any, keyring: Keyring, data: bytes, *, session: str, part: int, index: int,
                final: bool, tenant: str) -> None:
    blob = keyring.seal(data, context=chunk_context(session, part, index, final), tenant=tenant)
    f.write(_LEN.pack(len(blob)) + blob)


def pause_path(root: Path, session: str) -> Path:
    return root / "control" / f"{session}.pause"


@dataclass(frozen=True)
class Part:
    session: str
    part: int
    audio: Path
    sidecar: Path

    def meta(self) -> dict[str, Any]:
        try:
            data = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return {"session_id": self.session, "part": self.part, "complete": False}
        return data if isinstance(data, dict) else {}


class RecordingStore:
    """Read side of the recordings of this box (the admin API, retention, GDPR)."""

    def __init__(self, root: Path, master: MasterKeys | None,
                 load: Callable[[], MasterKeys] | None = None) -> None:
        self.root = Path(root)
        self.master = master
        self._load = load
        self._keyrings: dict[Path, Keyring] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> RecordingStore:
        """The master key is read when a recording is first opened (a box that records nothing, or whose
        credential is missing, still starts)."""
        return cls(recordings_root(cfg), None, lambda: load_master(cfg))

    # -- finding ---------------------------------------------------------------------------------
    def parts(self, session: str) -> list[Part]:
        if not SESSION_RE.match(session) or not self.root.is_dir():
            return []
        out = []
        for shard in sorted(self.root.glob("shard-*")):
            for path in shard.glob(f"{glob_escape(session)}.*{SUFFIX}"):
                num = path.name[len(session) + 1: -len(SUFFIX)]
                if num.isdigit():
                    out.append(Part(session, int(num), path, path.with_name(f"{session}.{num}.json")))
        return sorted(out, key=lambda p: p.part)

    def all_parts(self) -> Iterator[Part]:
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.glob("shard-*")):
            for path in shard.glob(f"*{SUFFIX}"):
                stem = path.name[: -len(SUFFIX)]
                session, _, num = stem.rpartition(".")
                if session and num.isdigit():
                    yield Part(session, int(num), path, path.with_name(f"{stem}.json"))

    def describe(self, session: str) -> list[dict[str, Any]]:
        """The sidecars of a session's parts (metadata only: for the admin API and a GDPR export)."""
        return [p.meta() for p in self.parts(session)]

    # -- reading ---------------------------------------------------------------------------------
    def _keyring(self, directory: Path) -> Keyring:
        if self.master is None and self._load is not None:
            try:
                self.master = self._load()
            except (OSError, KeyConfigError) as exc:
                raise DecryptError(f"master key unavailable: {exc}") from None
        if self.master is None:
            raise DecryptError("no master key configured")
        ring = self._keyrings.get(directory)
        if ring is None:
            ring = self._keyrings[directory] = Keyring(self.master, SpoolKeyStore(directory / "keys.json"))
        return ring

    def open_part(self, part: Part) -> Iterator[bytes]:
        """The plain Ogg bytes of one part, chunk by chunk (decrypted on the fly, never stored).
        Raises DecryptError for a chunk that does not open; a cut-short file ends after its last whole
        chunk (``complete: false`` in the sidecar says so)."""
        keyring = self._keyring(part.audio.parent)
        with part.audio.open("rb") as f:
            index = 0
            pending = _read_record(f)
            while pending is not None:
                nxt = _read_record(f)
                last = nxt is None
                ctx = chunk_context(part.session, part.part, index, final=last)
                try:
                    yield keyring.open(pending, context=ctx)
                except DecryptError:
                    if not last:
                        raise
                    # the writer died before sealing its final chunk: this one was sealed as "more"
                    yield keyring.open(pending, context=chunk_context(part.session, part.part, index, False))
                pending, index = nxt, index + 1

    def open_session(self, session: str) -> Iterator[bytes]:
        """All parts in order: a chained Ogg stream (RFC 3533 §4) when a worker restart split the call."""
        for part in self.parts(session):
            yield from self.open_part(part)

    # -- pausing (the AI worker polls the flag) ----------------------------------------------------
    def set_paused(self, session: str, paused: bool, *, by: str) -> None:
        path = pause_path(self.root, session)
        if paused:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"by": by, "at": time.time()}))
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def paused(self, session: str) -> bool:
        return pause_path(self.root, session).exists()

    # -- erasing ---------------------------------------------------------------------------------
    def delete(self, sessions: Iterable[str]) -> int:
        """Delete every part (audio and sidecar) of the given sessions; how many parts went."""
        n = 0
        for session in sessions:
            for part in self.parts(session):
                _remove(part)
                n += 1
            self.set_paused(session, False, by="")
        return n

    def purge(self, days: int, *, live: Iterable[str] = (), now: float | None = None) -> int:
        """Retention (``compliance.retention_days_recordings``): parts whose call ended (or, without an
        end time, whose file was last written) before the cutoff; never a live call's."""
        cutoff = (time.time() if now is None else now) - days * DAY
        spare = set(live)
        n = 0
        for part in list(self.all_parts()):
            if part.session in spare:
                continue
            meta = part.meta()
            ended = meta.get("ended_at")
            try:
                when = float(ended) if ended else part.audio.stat().st_mtime
            except (OSError, TypeError, ValueError):
                continue
            if when < cutoff:
                _remove(part)
                n += 1
        return n


def _remove(part: Part) -> None:
    for path in (part.audio, part.sidecar):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _read_record(f: Any) -> bytes | None:
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_CHUNK:
        raise DecryptError(f"recording chunk of {n} bytes: not a sealed recording")
    blob = f.read(n)
    if len(blob) < n:
        return None  # a torn last write: the chunks before it are whole
    return bytes(blob)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
