"""Model profiles in the emulator and what the Live layer does about them: a 3.8 session closed at its
hard limit cannot be resumed (1007), so the layer opens a fresh session seeded with the conversation;
3.1 refuses client content after the first turn (the layer sends client content only to seed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.ai.live.test_session import Recorder, speak
from tests.harness.emulator import start_emulator, tone
from workers.ai.live import events as L
from workers.ai.live.session import LiveSession
from workers.ai.live.settings import LiveOptions

pytestmark = pytest.mark.timeout(90)


async def test_38_session_limit_then_fresh_session_seeded_with_the_conversation(tmp_path: Path) -> None:
    with start_emulator(tmp_path, pacing="burst", session_limit_s=3.0) as emu:
        m = emu.model_config(model="gemini-3.8-live-preview", retry_base_seconds=0.05, retry_max_seconds=0.2)
        rec = Recorder()
        live = LiveSession(m, "p38", LiveOptions("Puck", "en-US", "x"), rec)
        await live.start()
        try:
            first = live.server_session_id
            live.activity_start()
            await speak(live, tone(440, 0.3))
            live.activity_end()
            await rec.turns(1)
            said = [(t.role, t.text) for t in rec.of(L.Transcript) if t.final]
            assert said, "the emulator transcribes both sides"
            await rec.wait(lambda: live.stats.fresh_after_unknown_handle == 1, limit=15,
                           what="hard close, 1007 on resume, fresh session")
            await rec.wait(lambda: live.state == "live" and live.server_session_id != first,
                           what="live again")
            history = emu.session(live.server_session_id)["history"]
            assert [f"{r}: {t}" for r, t in said] == history[:len(said)]  # seeded, in order, with roles
            live.activity_start()  # and the conversation goes on
            await speak(live, tone(660, 0.3))
            live.activity_end()
            await rec.turns(2)
        finally:
            await live.close()


async def test_31_refuses_client_content_after_the_first_turn(tmp_path: Path) -> None:
    from google.genai import errors, types

    with start_emulator(tmp_path, pacing="burst", reply="tone") as emu:
        async with emu.genai_client().aio.live.connect(model="gemini-3.1-flash-live",
                                                        config=types.LiveConnectConfig()) as s:
            await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="seed")]),
                                        turn_complete=True)
            async for msg in s.receive():
                if msg.server_content and msg.server_content.turn_complete:
                    break
            await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="more")]),
                                        turn_complete=True)
            with pytest.raises(errors.APIError) as err:
                async for _msg in s.receive():
                    await asyncio.sleep(0)
            assert err.value.code == 1007 and "only before the first turn" in str(err.value)
