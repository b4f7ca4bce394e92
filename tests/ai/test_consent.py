"""Consent capture end to end (workers/ai/consent.py): the real AI worker on a real shm segment, the real
google-genai SDK against the Live emulator, the real (encrypted) record spool, prompts from espeak-ng.

What must hold: with ``opt_in`` nothing of the caller — speech, keypad — reaches the model (the
emulator's record of what it received stays empty) until the caller presses 1; the consent item (time,
text played, purposes, how) is in the call record before anything else of the call; a refusal (another
key, or the timeout) plays the goodbye, never reaches the model, and ends the call (the slot's model
state tells the supervisor: ``ended:consent_refused``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.config import ConfigError, load_config, replace, tenant
from appliance.records.spool import SpoolReader, spool_keyring_for, spool_root
from appliance.sessions import ended_reason
from tests.ai.audio import silence, speech16k
from tests.ai.live_worker import NO_DISCLOSURE, running, until
from tests.ai.test_worker_emulator import collect, speak
from tests.ai.test_worker_features import press
from tests.harness.emulator import start_emulator
from tests.harness.shm import activate_slot, shard_segment
from workers.ai.consent import ENDED, GIVEN, REFUSED, ConsentPolicy
from workers.ai.dtmf import dtmf_text

pytestmark = pytest.mark.timeout(120)

PROMPT = "Press 1 to agree that an AI assistant handles this call."
GOODBYE = "Goodbye then."


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with start_emulator(tmp_path_factory.mktemp("emu"), pacing="burst", reply="tone") as e:
        yield e


@pytest.fixture
def seg():
    with shard_segment(slots=2, uplink_bytes=64000, downlink_bytes=384000) as s:
        yield s


def consent_cfg(emu, tmp_path: Path, **compliance: Any):
    return replace(load_config(None, env={}),
                   model={"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file,
                          "greeting": "", "hold_prompt": ""},
                   paths={"state_dir": str(tmp_path)},
                   records={"dsn": "postgresql://records@127.0.0.1/records"},
                   compliance={**NO_DISCLOSURE, "consent": "opt_in", "consent_prompt": PROMPT,
                               "consent_refused_message": GOODBYE, "consent_purposes": ["support", "ai"],
                               **compliance})


def utterance() -> np.ndarray:
    """Speech then a second of quiet (the media worker writes a frame every 20 ms, speech or not)."""
    return np.concatenate([speech16k(), silence(1.0)])


def items(cfg) -> list[dict[str, Any]]:
    d = spool_root(cfg.paths.state_dir, cfg.records.spool_dir) / "shard-0"
    return SpoolReader(d, spool_keyring_for(cfg, "shard-0")).read_batch(max_items=10_000).items


def nothing_received(emu, sid: str) -> bool:
    s = emu.session(sid)
    return not s["texts"] and not s["tool_responses"] and not emu.audio(sid) and not s["history"]


async def live(w, slot) -> str:
    await until(lambda: slot.model_state == "live", what="model live")
    sid = w.calls[slot.index].live.server_session_id
    assert sid
    return sid


async def test_keypad_consent_comes_first_then_the_model_hears_the_caller(emu, seg, tmp_path) -> None:
    cfg = consent_cfg(emu, tmp_path)
    slot = seg.slot(0)
    heard = bytearray()
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live(w, slot)
        assert w.calls[0].consent is not None and w.calls[0].consent.waiting
        await speak(slot, utterance(), speed=2.0)  # the caller talks over the prompt
        await asyncio.sleep(0.3)
        assert nothing_received(emu, sid), emu.session(sid)
        assert collect(slot, heard) > 24000  # the prompt played (≥ 0.5 s of 24 kHz PCM16)
        assert not [it for it in items(cfg) if it.get("type") == "consent"]
        await press(slot, "1", gap=0)
        await until(lambda: slot.counters.get("consent") == GIVEN, what="consent given")
        (c,) = [it for it in items(cfg) if it.get("type") == "consent"]
        d = c["data"]
        assert (d["given"], d["how"], d["policy"], d["text"], d["purposes"]) == (
            True, "keypad", "opt_in", PROMPT, ["support", "ai"])
        assert abs(d["at"] - c["at"]) < 5
        assert nothing_received(emu, sid)  # the "1" itself is the consent, not the model's
        # from now on the caller reaches the model
        await speak(slot, utterance(), speed=2.0)
        await until(lambda: len(emu.audio(sid)) > 16000, what="caller audio at the model")
        await until(lambda: slot.transcript.startswith("model: tone reply"), what="model reply")
        order = [it.get("type") or it.get("kind") for it in items(cfg)]
        assert order.index("consent") < order.index("turn")  # recorded before any turn of the model
        assert slot.model_state == "live"


@pytest.mark.parametrize(("keys", "how", "compliance"), [
    ("2", "keypad", {}),
    ("", "timeout", {"consent_timeout_seconds": 3.0}),
])
async def test_no_consent_plays_the_goodbye_and_ends_the_call(emu, seg, tmp_path, keys, how,
                                                              compliance) -> None:
    cfg = consent_cfg(emu, tmp_path, **compliance)
    slot = seg.slot(0)
    heard = bytearray()
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live(w, slot)
        before = collect(slot, heard)  # the whole prompt: queued at once, the ring holds 8 s
        assert before > 24000
        await speak(slot, utterance(), speed=2.0)
        await press(slot, keys, gap=0)
        await until(lambda: slot.counters.get("consent") == REFUSED, what="refusal")

        def drained() -> bool:
            collect(slot, heard)
            return slot.model_state == ENDED

        await until(drained, what="call ended by the worker")
        assert len(heard) > before  # the goodbye played after the refusal
        assert w.calls[0].ended == ENDED and ended_reason(slot.model_state) == "consent_refused"
        await press(slot, "1", gap=0)  # too late: the answer stands
        await speak(slot, utterance(), speed=4.0)
        await asyncio.sleep(0.5)
        assert slot.counters.get("consent") == REFUSED and nothing_received(emu, sid)
        assert slot.model_state == ENDED  # Live state changes do not overwrite it
    (c,) = [it for it in items(cfg) if it.get("type") == "consent"]
    assert (c["data"]["given"], c["data"]["how"]) == (False, how)


def test_ended_reasons_are_a_bounded_label() -> None:
    assert ended_reason("ended:consent_refused") == "consent_refused"
    assert ended_reason("ended:whatever-a-worker-wrote") == "ai_ended"


def test_consent_policy_inherits_compliance_consent() -> None:
    cfg = replace(load_config(None, env={}), compliance={"consent": "opt_in"},
                  tenants={"a": {}, "b": {"consent": "none", "consent_prompt": "Drücken Sie 1.",
                                          "language": "de-DE"}})
    assert ConsentPolicy.of(cfg, tenant(cfg, None)).mode == "opt_in"
    assert ConsentPolicy.of(cfg, tenant(cfg, "a")).mode == "opt_in"
    b = ConsentPolicy.of(cfg, tenant(cfg, "b"))
    assert (b.mode, b.prompt, b.language) == ("none", "Drücken Sie 1.", "de-DE")
    with pytest.raises(ConfigError, match=r"compliance\.consent: expected one of none, announce, opt_in"):
        replace(cfg, compliance={"consent": "yes"})


async def test_a_restarted_worker_keeps_the_answer(emu, seg, tmp_path) -> None:
    """The decision lives in the slot: after a yes, a new AI worker does not ask again (or hold back)."""
    cfg = consent_cfg(emu, tmp_path)
    slot = seg.slot(0)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        await live(w, slot)
        await press(slot, "1", gap=0)
        await until(lambda: slot.counters.get("consent") == GIVEN, what="consent given")
    async with running(cfg, seg, emu, tmp_path) as w2:  # the same call, a new worker process
        def resumed() -> bool:
            call = w2.calls.get(0)
            return call is not None and call.live is not None and bool(call.live.server_session_id)

        await until(resumed, what="the new worker's Live session")
        sid = w2.calls[0].live.server_session_id
        assert w2.calls[0].consent is None or not w2.calls[0].consent.waiting
        await speak(slot, utterance(), speed=2.0)
        await until(lambda: len(emu.audio(sid)) > 16000, what="caller audio at the model")
    assert len([it for it in items(cfg) if it.get("type") == "consent"]) == 1  # asked once


async def test_announce_records_and_holds_nothing_back(emu, seg, tmp_path) -> None:
    cfg = consent_cfg(emu, tmp_path, consent="announce")
    slot = seg.slot(0)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live(w, slot)
        assert w.calls[0].consent is None
        (c,) = [it for it in items(cfg) if it.get("type") == "consent"]
        assert (c["data"]["given"], c["data"]["how"], c["data"]["text"]) == (True, "announced", PROMPT)
        await press(slot, "5", gap=0)
        await until(lambda: emu.session(sid)["texts"] == [dtmf_text("5")], what="keypad at the model")
