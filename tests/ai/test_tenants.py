"""Two tenants on one AI worker in the same run: each call's Live setup (as the emulator received it),
tool requests (URL and HMAC signature) and greeting audio are its tenant's — real worker, real shm
segment, real google-genai SDK, the Live emulator subprocess and a real local tool endpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config, replace
from shm.segment import EventCode
from tests.ai.live_worker import running, until
from tests.harness.emulator import ServiceAccount, service_account, start_emulator
from tests.harness.shm import activate_slot, shard_segment
from tests.harness.toolserver import tool_server
from workers.ai.dtmf import DIGITS

pytestmark = pytest.mark.timeout(180)

PRIMARY = "gemini-2.5-flash-native-audio-preview-09-2025"
FALLBACK = "gemini-3.1-flash-live-preview"


@pytest.fixture(scope="module")
def sa() -> ServiceAccount:
    return service_account()


@pytest.fixture(scope="module")
def emu(tmp_path_factory, sa):
    d = tmp_path_factory.mktemp("emu")
    (d / "sa.pub").write_bytes(sa.public_pem)
    with start_emulator(d, pacing="burst", reply="tone", tool_calls=True,
                        vertex_sa_key=str(d / "sa.pub")) as e:
        yield e


@pytest.fixture
def seg():
    with shard_segment(slots=2, uplink_bytes=64000, downlink_bytes=960000) as s:
        yield s


def tenants_cfg(emu, tmp_path: Path, url_a: str, url_b: str) -> Any:
    for name, fn in (("a", "check_balance"), ("b", "book_table")):
        (tmp_path / f"tools-{name}.json").write_text(json.dumps(
            [{"name": fn, "description": f"{fn} for the caller",
              "parameters": {"type": "object", "properties": {"heard": {"type": "string"}}}}]))
    model = {"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file,
             "greeting": "Hello from the default tenant.", "hold_prompt": ""}
    tenants = {
        "bank": {"voice": "Kore", "language": "en-GB", "system_instruction": "You are the bank's agent.",
                 "greeting": "Welcome to the bank. You are talking with an AI assistant.",
                 "tools_file": str(tmp_path / "tools-a.json"), "tools_url": url_a, "tools_secret": "s-bank"},
        "diner": {"voice": "Charon", "language": "de-DE", "system_instruction": "Du bist der Kellner.",
                  "greeting": "Willkommen im Diner. Sie sprechen mit einer KI.",
                  "tools_file": str(tmp_path / "tools-b.json"), "tools_url": url_b,
                  "tools_secret": "s-diner", "model": PRIMARY, "fallback_model": FALLBACK},
    }
    return replace(load_config(None, env={}), model=model, paths={"state_dir": str(tmp_path)},
                   tenants=tenants)


def verify(secret: str, body: bytes, header: str) -> bool:
    fields = dict(p.split("=", 1) for p in header.split(","))
    mac = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, fields["v1"])


async def press(slot, keys: str) -> None:
    for k in keys:
        assert slot.push_event(EventCode.DTMF, DIGITS.index(k))
        assert slot.push_event(EventCode.DTMF_END, 120)
        await asyncio.sleep(0.05)


async def test_two_tenants_get_their_own_setup_tools_and_greeting(emu, seg, tmp_path) -> None:
    with tool_server() as srv:
        cfg = tenants_cfg(emu, tmp_path, srv.url("/bank"), srv.url("/diner"))
        s_bank, s_diner = seg.slot(0), seg.slot(1)
        async with running(cfg, seg, emu, tmp_path) as w:
            activate_slot(s_bank, options={"tenant": "bank", "model": cfg.model.model})
            activate_slot(s_diner, options={"tenant": "diner", "model": FALLBACK})
            await until(lambda: s_bank.model_state == "live" and s_diner.model_state == "live",
                        what="both calls live")
            sid = {n: w.calls[s.index].live.server_session_id for n, s in (("bank", s_bank),
                                                                             ("diner", s_diner))}
            setup = {n: emu.session(sid[n])["setup"] for n in sid}
            assert setup["bank"] == {"model": f"models/{cfg.model.model}", "voice": "Kore",
                                     "language": "en-GB", "system_instruction": "You are the bank's agent.",
                                     "functions": ["check_balance"], "behaviors": {},
                                     "proactive_audio": None}
            assert setup["diner"] == {"model": f"models/{FALLBACK}", "voice": "Charon", "language": "de-DE",
                                      "system_instruction": "Du bist der Kellner.",
                                      "functions": ["book_table"], "behaviors": {},
                                      "proactive_audio": None}
            # greeting: each call's downlink starts with its tenant's synthesised prompt
            for slot, t in ((s_bank, "bank"), (s_diner, "diner")):
                want = w.prompts.cached(cfg.tenants[t].model.greeting, cfg.tenants[t].model.language)
                assert want and len(want) > 24000
                n = len(want) // 960 * 960  # the ring takes whole 20 ms frames
                await until(lambda s=slot, n=n: s.downlink.available() >= n, what=f"{t} greeting")
                assert slot.downlink.read(n) == want[:n], f"{t}: downlink is not its greeting"
            assert w.tenants.default.greeting and w.tenants.default.greeting != want
            # tools: a keypad turn makes the model call the tenant's first function at the tenant's URL
            await press(s_bank, "1#")
            await press(s_diner, "2#")
            await until(lambda: all(len(emu.session(sid[n])["tool_responses"]) == 1 for n in sid),
                        what="tool responses at the model")
        by_path = {path: (body, h["X-VA-Signature"])
                   for path, (h, body) in zip(srv.paths, srv.raw, strict=True)}
        assert set(by_path) == {"/bank", "/diner"}
        for t, fn in (("bank", "check_balance"), ("diner", "book_table")):
            body, sig = by_path[f"/{t}"]
            assert json.loads(body)["name"] == fn
            assert verify(f"s-{t}", body, sig), f"{t}: signature does not verify with its secret"
            assert not verify("s-bank" if t == "diner" else "s-diner", body, sig)


async def test_unknown_routed_model_falls_back_to_the_primary(emu, seg, tmp_path) -> None:
    with tool_server() as srv:
        cfg = tenants_cfg(emu, tmp_path, srv.url("/bank"), srv.url("/diner"))
        slot = seg.slot(0)
        async with running(cfg, seg, emu, tmp_path) as w:
            activate_slot(slot, options={"tenant": "diner", "model": "gemini-forged-model"})
            await until(lambda: slot.model_state == "live", what="live")
            setup = emu.session(w.calls[0].live.server_session_id)["setup"]
            assert setup["model"] == f"models/{PRIMARY}" and setup["voice"] == "Charon"


async def test_a_vertex_tenant_in_its_region_next_to_a_developer_default(emu, seg, sa, tmp_path) -> None:
    key = sa.key_file(tmp_path / "sa.json", f"{emu.base_url}/token")
    cfg = replace(tenants_cfg(emu, tmp_path, "http://127.0.0.1:9/", "http://127.0.0.1:9/"), tenants={
        "eu": {"platform": "vertex", "project": "va-tenant-eu", "location": "europe-west4",
               "allowed_locations": ["europe-west4"], "credentials_file": str(key),
               "base_url": emu.base_url, "ca_file": emu.ca_file, "voice": "Aoede"}})
    s_default, s_eu = seg.slot(0), seg.slot(1)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(s_default, options={})
        activate_slot(s_eu, options={"tenant": "eu"})
        await until(lambda: s_default.model_state == "live" and s_eu.model_state == "live", what="both live")
        info = {n: emu.session(w.calls[s.index].live.server_session_id) for n, s in (("default", s_default),
                                                                                     ("eu", s_eu))}
    assert info["default"]["live"]["platform"] == "developer"
    assert info["eu"]["live"]["platform"] == "vertex"
    assert info["eu"]["live"]["model"] == {"project": "va-tenant-eu", "location": "europe-west4",
                                           "model": cfg.model.model}
    assert info["eu"]["setup"]["voice"] == "Aoede" and info["default"]["setup"]["voice"] == cfg.model.voice
