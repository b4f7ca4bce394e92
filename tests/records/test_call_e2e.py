"""A real call makes a record: aiortc caller → Janus (netns) → media/AI workers → the Live emulator
(real google-genai SDK), records through the spool and writer into a real PostgreSQL, read back through
the admin API, webhooks to a real local receiver — and the operator console in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest

from appliance.records import signing
from appliance.token import mint
from tests.harness.audio import speech
from tests.harness.emulator import start_emulator
from tests.harness.redis import free_port
from tests.records.conftest import Db
from tests.records.test_webhooks import Receiver
from tests.supervisor.conftest import (  # noqa: F401 - fixtures
    NODE_MODULES,
    janus,
    open_call,
    redis_srv,
    start_supervisor,
    stop_supervisor,
    sub,
    wait_until,
)
from tests.supervisor.rtc import RATE, caller
from tests.supervisor.test_voice_loop import say_and_hear, wait_quiet

pytestmark = [pytest.mark.janus, pytest.mark.slow]

KEY = b"e2e-webhook-key"
CONSOLE_JS = Path(__file__).with_name("console_check.js")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory):
    with start_emulator(tmp_path_factory.mktemp("emu"), reply="echo") as emu:
        yield emu


def admin_token(sp, *scopes: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(sp.private_key, sub="op", audience="voice-appliance",
                                              scope=" ".join(scopes), ttl_seconds=600)}


async def test_a_real_call_makes_a_record_webhooks_and_shows_in_the_console(
        tmp_path: Path, pg_db: Db, redis_srv, janus, emulator, sub: str) -> None:  # noqa: F811
    (tmp_path / "pgpass").write_text(pg_db.password)
    (tmp_path / "whkey").write_bytes(KEY)
    receiver = Receiver()
    admin_port = free_port()
    sp = start_supervisor(tmp_path, redis_srv.url, janus, slots=2, extra={
        "model": {"api_key": emulator.api_key, "base_url": emulator.base_url, "ca_file": emulator.ca_file,
                  "max_retries": 5},
        "api": {"admin_port": admin_port},
        "records": {"dsn": pg_db.dsn, "password_file": str(tmp_path / "pgpass"),
                    "webhook_url": receiver.url("ok"), "webhook_secret_file": str(tmp_path / "whkey")},
    })
    admin = f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {sp.token(sub)}"}
    pc, track, rec = await caller()
    try:
        async with httpx.AsyncClient(base_url=sp.api, timeout=30) as http, \
                httpx.AsyncClient(base_url=admin, timeout=30) as adm:
            sid = await open_call(http, auth, pc, sp)
            await wait_quiet(rec)
            for text in ("the quick brown fox jumps over the lazy dog",
                         "a red balloon floats over green hills"):
                # the echo's fidelity is test_voice_loop's business; here each turn must just be answered
                await say_and_hear(track, rec, speech(text, RATE), limit=30)
            # live on the admin API (real supervisor), with model state and quality
            live = (await adm.get("/v1/admin/calls?state=live", headers=admin_token(sp, "calls:read"))).json()
            (mine,) = [c for c in live["calls"] if c["id"] == sid]
            assert mine["model_state"] == "live" and mine["sub"] == sub
            assert mine["quality"]["rtp_received_packets"]
            # the transcript grows while the call is live (shipped within a fraction of a second)
            rd = admin_token(sp, "records:read")

            async def growing() -> bool:
                r = (await adm.get(f"/v1/admin/calls/{sid}", headers=rd)).json()
                return r["state"] == "live" and len(r["transcript"]) >= 4

            await wait_until(growing, limit=15, what="live transcript in the record")
            # the console shows it and hangs it up (headless Chromium)
            env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
            token = admin_token(sp, "calls:read", "calls:write", "records:read")["Authorization"][7:]
            proc = await asyncio.create_subprocess_exec(
                "node", str(CONSOLE_JS), admin + "/admin/", token, sid, sub, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 180)
            assert proc.returncode == 0, err.decode()[-3000:] + out.decode()[-2000:]
            seen = json.loads(out.decode().strip().splitlines()[-1])
            assert seen["transcript_lines"] >= 4 and seen["hung_up"] and seen["found_ended"]
            assert seen["first_speaker"] == "caller" and seen["drained"]

            async def ended() -> dict | None:
                r = (await adm.get(f"/v1/admin/calls/{sid}", headers=rd)).json()
                return r if r["state"] == "ended" and r.get("end_reason") else None

            record = await wait_until(ended, limit=20, what="record ended")

            def ended_webhook() -> bool:
                return any(b'"call.ended"' in b and sid.encode() in b for _, _, b in receiver.got)

            await wait_until(ended_webhook, limit=20, what="call.ended webhook")
    finally:
        await pc.close()
        stop_supervisor(sp)
        receiver.close()
    assert record["end_reason"] == "admin_hangup" and record["sub"] == sub
    speakers = [t["speaker"] for t in record["transcript"]]
    assert speakers[:4] == ["caller", "assistant", "caller", "assistant"], record["transcript"]
    offsets = [t["offset_ms"] for t in record["transcript"]]
    assert offsets == sorted(offsets) and offsets[0] > 0
    assert "echo reply" in record["transcript"][1]["text"]
    u = record["usage"]
    assert u["prompt_tokens"] > 0 and u["response_tokens"] > 0 and u["by_modality"]["input"].get("AUDIO")
    assert u["cost_usd"] and u["cost_usd"] > 0
    types = [e["type"] for e in record["events"]]
    assert {"connected", "turn", "model_live", "ended"} <= set(types) and types.count("turn") >= 2
    q = record["quality"]
    assert q["rtp_received_packets"] > 100 and 0 <= q["loss_ratio"] < 0.05 and "jitter_ms" in q
    assert q["response_ms"]["turns"] >= 2 and q["response_ms"]["p50"] > 0
    # webhooks: started, every transcript line, ended — each validly signed, each event id once
    got = [(h, b) for mode, h, b in receiver.got if mode == "ok"]
    for h, b in got:
        signing.verify(KEY, b, h["X-VA-Signature"])
    ids = [h["X-VA-Event-Id"] for h, _ in got]
    assert len(ids) == len(set(ids))
    evs = [json.loads(b) for _, b in got]
    mine_evs = [e for e in evs if e["data"].get("call_id", e["data"].get("id")) == sid]
    kinds = [e["type"] for e in mine_evs]
    assert kinds.count("call.started") == 1 and kinds.count("call.ended") == 1
    assert kinds.count("call.transcript") == len(record["transcript"])
    ended_ev = next(e for e in mine_evs if e["type"] == "call.ended")
    assert [t["text"] for t in ended_ev["data"]["transcript"]] == [t["text"] for t in record["transcript"]]
