"""Call recordings at rest (appliance/compliance/recordings.py): sealed chunks that refuse tampering and
reordering, a cut-short file served as far as it goes, the admin API's download (decrypted on the fly,
audited in the real hash-chained trail), pause/resume, retention and GDPR erasure/export.

The recordings are made by the AI worker's real writer (workers/ai/recording.py, PyAV + libopus) from
synthetic tones; tests/ai/test_recording.py makes one through the whole worker and the emulator.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import psycopg
import pytest

from appliance.auth import JwtVerifier
from appliance.compliance import trail
from appliance.compliance.atrest import SpoolKeyStore
from appliance.compliance.envelope import DecryptError, Keyring, MasterKeys
from appliance.compliance.recordings import Part, RecordingStore, pause_path
from appliance.compliance.retention import Policy, purge
from appliance.records import store
from appliance.records.admin import create_admin_app
from appliance.records.spool import Spool
from appliance.records.usage import BUILTIN_PRICES
from appliance.records.writer import Database, RecordWriter
from appliance.token import generate_keys, mint
from tests.records.conftest import Db
from tests.records.test_admin import Box
from workers.ai.recording import _Writer

AUD = "voice-appliance"
DAY = 86400.0


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def make(root: Path, master: MasterKeys, session: str, seconds: float = 1.0) -> Part:
    """A real recording: a 440 Hz caller on the left, 1 kHz model audio on the right (first half)."""
    d = root / "shard-0"
    d.mkdir(parents=True, exist_ok=True)
    w = _Writer.create(d, Keyring(master, SpoolKeyStore(d / "keys.json")), session, "acme", 0)
    w.model(tone(1000, seconds / 2, 24000).tobytes())
    caller = tone(440, seconds, 16000)
    for i in range(0, len(caller), 320):
        w.caller(caller[i:i + 320].tobytes(), False, 0)
    w.close(ended=True)
    (part,) = RecordingStore(root, master).parts(session)
    return part


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


@pytest.fixture(scope="module")
def master() -> MasterKeys:
    return MasterKeys.parse(MasterKeys.new_line("m1"))


def test_sealed_chunks_refuse_tampering_and_reordering(tmp_path: Path, master: MasterKeys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.ai import recording

    monkeypatch.setattr(recording, "SEAL_BYTES", 16 * 1024)  # several chunks
    root = tmp_path / "recordings"
    part = make(root, master, "box.t1", seconds=12.0)
    rs = RecordingStore(root, master)
    ogg = b"".join(rs.open_part(part))
    with av.open(io.BytesIO(ogg)) as c:
        pcm = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    assert abs(peak_hz(pcm[0, 48000:96000], 48000) - 440) < 5  # left: the caller's tone
    assert abs(peak_hz(pcm[1, 4800:96000], 48000) - 1000) < 5  # right: the model's
    assert np.sqrt(np.mean(pcm[1, 7 * 48000: 11 * 48000] ** 2)) < 1e-3  # model silent after 6 s
    meta = part.meta()
    assert meta["encryption"]["chunks"] >= 3 and meta["ai_generated"]["segments"] == [
        {"start_ms": 0, "end_ms": 6000}]
    raw = part.audio.read_bytes()
    assert b"OggS" not in raw and b"Opus" not in raw
    # a flipped byte
    bad = bytearray(raw)
    bad[len(raw) // 2] ^= 1
    part.audio.write_bytes(bytes(bad))
    with pytest.raises(DecryptError):
        b"".join(rs.open_part(part))
    # chunks reordered
    recs, i = [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 4], "big")
        recs.append(raw[i:i + 4 + n])
        i += 4 + n
    part.audio.write_bytes(b"".join([recs[1], recs[0], *recs[2:]]))
    with pytest.raises(DecryptError):
        b"".join(rs.open_part(part))
    # cut short (the writer died): the whole chunks before the cut are served
    part.audio.write_bytes(b"".join(recs[:-1]) + recs[-1][:10])
    head = b"".join(rs.open_part(part))
    assert head and ogg.startswith(head) and len(head) < len(ogg)
    # a wrong master key
    other = MasterKeys.parse(MasterKeys.new_line("m1"))
    part.audio.write_bytes(raw)
    with pytest.raises(DecryptError):
        b"".join(RecordingStore(root, other).open_part(part))


@pytest.fixture(scope="module")
def jwt_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    priv, pub = generate_keys(tmp_path_factory.mktemp("keys"))
    return Path(priv).read_bytes(), Path(pub).read_bytes()


def _tok(jwt_keys: tuple[bytes, bytes], scope: str, sub: str = "ops") -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(jwt_keys[0], sub=sub, audience=AUD, scope=scope,
                                              ttl_seconds=300)}


async def test_download_is_decrypted_and_audited_pause_resume(pg_db: Db, tmp_path: Path, master: MasterKeys,
                                                              jwt_keys: tuple[bytes, bytes]) -> None:
    root = tmp_path / "recordings"
    part = make(root, master, "box.d1")
    make(root, master, "box.live1")
    rs = RecordingStore(root, master)
    spool_root = tmp_path / "spool"
    sup = Spool(spool_root / "supervisor")

    def audit(actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        sup.append("audit", subject, actor=actor, action=action, subject=subject, details=details)

    db = Database(pg_db.dsn, pg_db.password)
    app = create_admin_app(JwtVerifier(jwt_keys[1], audience=AUD, required_scope=""), Box(), db,
                           prices=BUILTIN_PRICES, audit=audit, recordings=rs)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        r = await c.get("/v1/admin/calls/box.d1/recording", headers=_tok(jwt_keys, "records:read", "ann"))
        assert r.status_code == 200 and r.headers["content-type"] == "audio/ogg"
        assert r.content == b"".join(rs.open_part(part)) and r.content.startswith(b"OggS")
        assert r.headers["x-recording-complete"] == "true"
        m = await c.get("/v1/admin/calls/box.d1/recording/metadata", headers=_tok(jwt_keys, "records:read"))
        assert m.json()["parts"][0]["channels"] == {"left": "caller", "right": "ai"}
        assert (await c.get("/v1/admin/calls/box.d1/recording",
                            headers=_tok(jwt_keys, "calls:read"))).status_code == 403
        nope = await c.get("/v1/admin/calls/box.none/recording", headers=_tok(jwt_keys, "records:read"))
        assert nope.status_code == 404 and nope.json()["error"] == "not_found"
        # pause / resume: only a live call on this box, with calls:write
        w = _tok(jwt_keys, "calls:write")
        assert (await c.post("/v1/admin/calls/box.d1/recording/pause", headers=w)).status_code == 404
        assert (await c.post("/v1/admin/calls/box.live1/recording/pause",
                             headers=_tok(jwt_keys, "records:read"))).status_code == 403
        r = await c.post("/v1/admin/calls/box.live1/recording/pause", headers=w)
        assert r.status_code == 200 and r.json()["recording"] == "paused"
        assert pause_path(root, "box.live1").exists()
        r = await c.post("/v1/admin/calls/box.live1/recording/resume", headers=w)
        assert r.status_code == 200 and not pause_path(root, "box.live1").exists()
        # a tampered file: a clear error naming the problem, no audio
        raw = bytearray(part.audio.read_bytes())
        raw[-20] ^= 1
        part.audio.write_bytes(bytes(raw))
        r = await c.get("/v1/admin/calls/box.d1/recording", headers=_tok(jwt_keys, "records:read"))
        assert r.status_code == 500 and r.json()["error"] == "recording_unreadable"
        assert "failed authentication" in r.json()["detail"]
    sup.close()
    writer = RecordWriter(db, spool_root)
    assert await writer.drain(20)
    async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password) as conn:
        entries = await trail.page(conn, after=0, limit=1000, subject=None)
    mine = [(e["actor"], e["action"], e["subject"], e["details"]["status"]) for e in entries
            if e["action"] in ("admin.get_recording", "admin.pause_recording", "admin.resume_recording")]
    assert ("admin:ann", "admin.get_recording", "box.d1", 200) in mine
    assert ("admin:ops", "admin.pause_recording", "box.live1", 200) in mine
    assert ("admin:ops", "admin.resume_recording", "box.live1", 200) in mine
    await db.close()


async def test_retention_and_gdpr_cover_recordings(aconn: psycopg.AsyncConnection, pg_db: Db, tmp_path: Path,
                                                   master: MasterKeys, jwt_keys: tuple[bytes, bytes]) -> None:
    await store.migrate(aconn)
    root = tmp_path / "recordings"
    now = time.time()
    for sid in ("b.old", "b.live", "b.recent"):
        part = make(root, master, sid)
        if sid != "b.recent":
            meta = part.meta()
            meta["ended_at"] = now - 100 * DAY
            part.sidecar.write_text(json.dumps(meta))
    rs = RecordingStore(root, master)
    key = trail.Signer(_signing_key())
    counts = await purge(aconn, Policy(1, 2, 5, recordings_days=30), live=["b.live"], now=now, signer=key,
                         recordings=rs)
    assert counts["recordings"] == 1
    assert rs.parts("b.old") == [] and rs.parts("b.live") and rs.parts("b.recent")
    cur = await aconn.execute("SELECT details FROM audit_log WHERE action = 'retention.purged'"
                              " ORDER BY seq DESC LIMIT 1")
    details = json.loads((await cur.fetchone())[0])  # type: ignore[index]
    assert details["deleted"]["recordings"] == 1 and "recordings" in details["cutoffs"]

    # GDPR: the subject's calls' recordings are exported (listed) and erased with the records
    async with aconn.transaction():
        await store.apply_items(aconn, [
            {"id": "g1", "kind": "call.created", "call": "b.recent", "at": now - 60, "box": "b",
             "sub": "carol", "mode": "direct"},
            {"id": "g2", "kind": "call.ended", "call": "b.recent", "at": now - 30, "reason": "hangup",
             "box": "b", "sub": "carol", "quality": {}}], webhooks=False)
    db = Database(pg_db.dsn, pg_db.password)
    app = create_admin_app(JwtVerifier(jwt_keys[1], audience=AUD, required_scope=""), Box(), db,
                           prices=BUILTIN_PRICES, recordings=rs)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        r = await c.get("/v1/admin/subjects/carol/export", headers=_tok(jwt_keys, "records:read"))
        assert r.status_code == 200
        (call,) = r.json()["calls"]
        assert call["recordings"]["download"] == "/v1/admin/calls/b.recent/recording"
        assert call["recordings"]["parts"][0]["session_id"] == "b.recent"
        r = await c.delete("/v1/admin/subjects/carol", headers=_tok(jwt_keys, "records:delete"))
        assert r.status_code == 200 and r.json()["deleted"]["recordings"] == 1
    assert rs.parts("b.recent") == [] and not list(root.rglob("b.recent*"))
    assert rs.parts("b.live")  # someone else's
    await db.close()


def _signing_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def test_recording_events_become_audit_entries() -> None:
    """The AI worker's recording events (workers/ai/recording.py → the record spool) are audited."""
    started = trail.from_item({"kind": "event", "call": "box.c", "at": 1.0, "type": "recording_started",
                               "offset_ms": 0, "data": {}})
    paused = trail.from_item({"kind": "event", "call": "box.c", "at": 2.0, "type": "recording_paused",
                              "offset_ms": 500, "data": {"reason": "secure_entry", "digits": "4111"}})
    assert started is not None and started.action == "recording.started" and started.subject == "box.c"
    assert paused is not None and paused.action == "recording.paused"
    assert paused.details is not None and paused.details["reason"] == "secure_entry"
    assert "digits" not in paused.details  # only the named fields pass
