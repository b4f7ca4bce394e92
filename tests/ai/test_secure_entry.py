"""PCI secure keypad entry end to end (workers/ai/secure_entry.py): the real AI worker on a real shm
segment, the real google-genai SDK against the Live emulator (which calls the first declared function on
every turn: ``collect_card_number``, declared first when ``model.payment_url`` is set), a real local HTTP
payment endpoint (tests/harness/toolserver.py) and the real record spool (encrypted at rest).

The card number is typed like the keypad tests type (DTMF slot events, as the media worker pushes them).
What must hold: the endpoint got the digits in one POST with a valid signature; the emulator (what
Google would have received: realtime texts, tool responses, history), the crash journal, the record
spool and the logs hold none of them; the model got only the outcome; a broken endpoint gives the model a
retryable error and the call goes on.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from appliance.compliance import trail
from appliance.compliance.atrest import load_master
from appliance.config import ModelConfig, replace
from appliance.records import signing
from appliance.records.spool import SpoolReader, spool_keyring_for, spool_root
from appliance.records.writer import Database, RecordWriter
from tests.ai.audio import silence, speech16k
from tests.ai.live_worker import running, until
from tests.ai.test_worker_emulator import speak
from tests.ai.test_worker_features import emu, live_session, make_cfg, press, seg, srv  # noqa: F401
from tests.harness.shm import activate_slot
from tests.records.conftest import Db, pg_db, pg_server  # noqa: F401  (fixtures)
from workers.ai.dtmf import dtmf_text
from workers.ai.live.outbox import journal_path
from workers.ai.secure_entry import TOOL_NAME, declarations, outcome_text

pytestmark = pytest.mark.timeout(120)

PAN = "4242424242424242"  # Luhn-valid test card; the trigger key below is no digit of it
KEY = "pay-signing-key"


def pay_cfg(emu, tmp_path: Path, url: str, **model: Any):  # noqa: F811
    cfg = make_cfg(emu, tmp_path, payment_url=url, tools_secret=KEY, **model)
    return replace(cfg, records={"dsn": "postgresql://records@127.0.0.1/records"})


async def db_dump(db: Db) -> str:
    """Every row of every table of the records database, as JSON text."""
    async with await psycopg.AsyncConnection.connect(db.dsn, password=db.password) as conn:
        cur = await conn.execute("SELECT table_name FROM information_schema.tables "
                                 "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")
        out = []
        for (name,) in await cur.fetchall():
            rows = await conn.execute(f'SELECT row_to_json(t)::text FROM "{name}" t')
            out += [r[0] for r in await rows.fetchall()]
    return "\n".join(out)


def spool_items(cfg) -> list[dict[str, Any]]:
    d = spool_root(cfg.paths.state_dir, cfg.records.spool_dir) / "shard-0"
    return SpoolReader(d, spool_keyring_for(cfg, "shard-0")).read_batch(max_items=10_000).items


def spool_bytes(cfg) -> bytes:
    d = spool_root(cfg.paths.state_dir, cfg.records.spool_dir)
    return b"".join(p.read_bytes() for p in d.rglob("*") if p.is_file())


async def start_secure_entry(w, slot, emu) -> str:  # noqa: F811
    """A keypad turn ("7"); the emulator answers it with a collect_card_number call."""
    activate_slot(slot, options={"greeting": ""})
    sid = await live_session(w, slot, emu)
    await press(slot, "7", gap=0)
    await until(lambda: w.calls[slot.index].secure_entry_active, what="secure entry started by the tool")
    return sid


async def test_card_digits_go_only_to_the_payment_endpoint(emu, seg, tmp_path, srv, caplog,  # noqa: F811
                                                           pg_db: Db) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    cfg = replace(pay_cfg(emu, tmp_path, srv.url("/accept")), records={"dsn": pg_db.dsn})
    slot = seg.slot(0)
    async with running(cfg, seg, emu, tmp_path) as w:
        sid = await start_secure_entry(w, slot, emu)
        call = w.calls[0]
        journal = journal_path(tmp_path, seg.name, 0, call.generation)
        await press(slot, PAN + "#", gap=0.03)
        await until(lambda: len(emu.session(sid)["tool_responses"]) == 1, what="outcome at the model")
        (fr,) = emu.session(sid)["tool_responses"]
        assert fr["name"] == TOOL_NAME and fr["response"] == {"status": "ok", "result": "card accepted"}
        await until(lambda: slot.transcript.startswith(f"model: tool {TOOL_NAME} said"), what="reply")
        assert not call.secure_entry_active and call.secure is None
        # the payment endpoint: one signed POST carrying exactly the digits
        (req,) = srv.requests
        assert req["digits"] == PAN and req["kind"] == "card_number" and req["session_id"] == call.session_id
        headers, raw = srv.raw[0]
        assert signing.verify(KEY.encode(), raw, headers[signing.SIGNATURE_HEADER]) > 0
        assert headers[signing.EVENT_TYPE_HEADER] == "payment.card_number"
        with pytest.raises(signing.SignatureError):
            signing.verify(b"another key", raw, headers[signing.SIGNATURE_HEADER])
        # the model: only the trigger key as text, no card digit anywhere in what it received
        got = emu.session(sid)
        assert got["texts"] == [dtmf_text("7")]
        assert not set("42") & set(json.dumps([r["response"] for r in got["tool_responses"]]))
        assert PAN[:6] not in json.dumps(got)
        assert journal.exists() and PAN[:6].encode() not in journal.read_bytes()  # crash journal
        assert PAN[:4] not in call.caller.dtmf and call.caller.keypad.pending == ""
        assert slot.counters.get("dtmf_sent") == 1  # the trigger only
    # the record spool (decrypted and raw) and every log record: no digits; the audit-bound event is there
    items = spool_items(cfg)
    assert PAN[:6] not in json.dumps(items) and PAN[:6].encode() not in spool_bytes(cfg)
    done = [it for it in items if it.get("kind") == "event" and it.get("type") == "secure_entry"]
    assert [(d["data"]["via"], d["data"]["outcome"]) for d in done] == [("tool", "accepted")]
    assert [it["data"]["digits"] for it in items if it.get("type") == "keypad"] == [1]
    for r in caplog.records:
        assert PAN[:6] not in r.getMessage() and PAN[:6] not in repr(r.__dict__)
    # … and the records database after the real writer shipped that spool: no digits in any table, the
    # secure entry in the audit trail as that it happened and how it ended
    writer = RecordWriter(Database(pg_db.dsn, pg_db.password), spool_root(cfg.paths.state_dir, ""),
                          master=load_master(cfg), signer=trail.Signer(trail.load_signing_key(cfg)))
    assert await writer.drain(20)
    dump = await db_dump(pg_db)
    assert dump.count("keypad.secure_entry") == 2 and PAN[:6] not in dump  # started + finished


@pytest.mark.parametrize(("path", "model", "keys", "needle"), [
    ("/status/503", {}, PAN + "#", "answered HTTP 503"),
    ("/slow/5", {"payment_timeout_seconds": 0.5}, PAN + "#", "did not answer within 0.5 s"),
    ("down", {}, PAN, "unreachable"),  # ended by the digit timeout, not '#'
    ("/decline", {}, PAN + "#", "card declined"),
    ("/accept", {"secure_entry_seconds": 1.0}, "", "no card number was entered in time"),
])
async def test_failed_entry_is_a_retryable_error_and_the_call_goes_on(
        emu, seg, tmp_path, srv, path, model, keys, needle) -> None:  # noqa: F811
    url = srv.url(path)
    if path == "down":
        with socket.socket() as s:  # a port bound and closed again: connection refused
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/pay"
        model = {"secure_entry_digit_timeout_seconds": 0.5, **model}
    slot = seg.slot(0)
    async with running(pay_cfg(emu, tmp_path, url, **model), seg, emu, tmp_path) as w:
        sid = await start_secure_entry(w, slot, emu)
        await press(slot, keys, gap=0.02)
        await until(lambda: len(emu.session(sid)["tool_responses"]) == 1, what="error result at the model")
        res = emu.session(sid)["tool_responses"][0]["response"]
        assert res["status"] == "error" and needle in res["error"] and res["retryable"] is True, res
        assert not set("42") & set(json.dumps(res))
        # the call goes on: the model answers, the Live session stays up, the keypad is the model's again
        await until(lambda: slot.transcript.startswith(f"model: tool {TOOL_NAME} said"), what="reply")
        assert slot.model_state == "live" and not w.calls[0].secure_entry_active
        assert slot.counters.get("tool_errors") == 1
        assert emu.session(sid)["texts"] == [dtmf_text("7")]


async def test_config_started_entry_tells_the_model_only_the_outcome(emu, seg, tmp_path, srv) -> None:  # noqa: F811
    cfg = pay_cfg(emu, tmp_path, srv.url("/accept"), secure_entry_at_start=True)
    slot = seg.slot(0)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live_session(w, slot, emu)
        assert w.calls[0].secure_entry_active  # from the first moment of the call, no tool call needed
        await press(slot, PAN + "#", gap=0.03)
        said = outcome_text({"status": "ok", "result": "card accepted"})
        await until(lambda: emu.session(sid)["texts"] == [said], what="outcome text at the model")
        assert [r["digits"] for r in srv.requests] == [PAN]
        assert PAN[:6] not in json.dumps(emu.session(sid))


def test_collect_card_number_is_declared_first_with_the_configured_tools() -> None:
    other = {"name": "lookup_order", "description": "x"}
    m = ModelConfig(payment_url="http://127.0.0.1:9/pay")
    assert [d["name"] for d in declarations([other], m) or []] == [TOOL_NAME, "lookup_order"]
    assert declarations([other], ModelConfig()) == [other]  # no payment endpoint: not offered
    assert declarations(None, ModelConfig()) is None


async def test_caller_speech_during_entry_keeps_the_keypad_secure(emu, seg, tmp_path, srv) -> None:  # noqa: F811
    """A barge-in withdraws the model's tool call (``toolCallCancellation``): the entry goes on — the
    keypad must not fall back to the model mid-card — and answers the model's next call."""
    slot = seg.slot(0)
    async with running(pay_cfg(emu, tmp_path, srv.url("/accept")), seg, emu, tmp_path) as w:
        sid = await start_secure_entry(w, slot, emu)
        first = w.calls[0].secure.call_id
        await press(slot, PAN[:6], gap=0.03)  # half the number typed, then the caller says something
        await speak(slot, np.concatenate([speech16k(), silence(1.0)]), speed=2.0)

        def adopted() -> bool:
            entry = w.calls[0].secure
            return entry is not None and entry.call_id not in ("", first)

        await until(adopted, what="the model's next collect_card_number call takes the entry over")
        assert w.calls[0].secure_entry_active
        await press(slot, PAN[6:] + "#", gap=0.03)
        await until(lambda: len(emu.session(sid)["tool_responses"]) == 1, what="outcome at the model")
        (fr,) = emu.session(sid)["tool_responses"]
        assert fr["response"] == {"status": "ok", "result": "card accepted"} and fr["id"] != first
        assert [r["digits"] for r in srv.requests] == [PAN]
        got = emu.session(sid)
        assert got["texts"] == [dtmf_text("7")] and PAN[:6] not in json.dumps(got)


def test_collect_card_number_is_blocking_even_on_38() -> None:
    """3.8 declares tools NON_BLOCKING by default; the card entry must not be: the model waits for the
    outcome instead of talking on while the caller types (and its responses carry no scheduling)."""
    from workers.ai.live.tooling import tool_plan
    from workers.ai.secure_entry import TOOL_NAME, declarations

    m = ModelConfig(payment_url="https://pay.example.test/entry")
    decls = declarations([{"name": "lookup", "description": "x"}], m)
    plan = tool_plan(decls, "gemini-3.8-flash-native-audio")
    card = next(d for d in plan.declarations if d["name"] == TOOL_NAME)
    assert card["behavior"] == "BLOCKING"
    assert TOOL_NAME not in plan.scheduling and "lookup" in plan.scheduling
