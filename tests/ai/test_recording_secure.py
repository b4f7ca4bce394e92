"""Call recording pauses itself during a real PCI secure keypad entry (workers/ai/secure_entry.py): the
real AI worker, the real SDK against the Live emulator (which answers a keypad turn with a
``collect_card_number`` call), a real local payment endpoint; the caller's side plays a steady tone the
whole time (the media worker's one frame per 20 ms), so the gap shows as silence between tone.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from appliance.compliance.atrest import load_master
from appliance.compliance.recordings import RecordingStore, recordings_root
from appliance.config import replace
from tests.ai.live_worker import running, until
from tests.ai.test_recording import decode, rms
from tests.ai.test_secure_entry import PAN, pay_cfg, start_secure_entry
from tests.ai.test_worker_features import emu, press, seg, srv  # noqa: F401
from tests.harness.audio import tone

pytestmark = pytest.mark.timeout(120)


async def test_secure_entry_is_a_gap_in_the_recording(emu, seg, tmp_path, srv) -> None:  # noqa: F811
    cfg = pay_cfg(emu, tmp_path, srv.url("/accept"))
    cfg = replace(cfg, compliance={**cfg.compliance.__dict__, "recording": "audio"}, records={"dsn": ""})
    slot = seg.slot(0)
    hum = tone(450, 0.02, 16000, amplitude=0.1).astype("<i2").tobytes()  # 20 ms = 9 whole periods

    async def media_worker() -> None:
        loop = asyncio.get_running_loop()
        t = loop.time()
        while True:
            slot.uplink.write(hum)
            t += 0.02
            await asyncio.sleep(max(0.0, t - loop.time()))

    feed = asyncio.create_task(media_worker())
    try:
        async with running(cfg, seg, emu, tmp_path) as w:
            sid = await start_secure_entry(w, slot, emu)
            session = w.calls[0].session_id
            await press(slot, PAN + "#", gap=0.05)
            await until(lambda: len(emu.session(sid)["tool_responses"]) == 1, what="outcome at the model")
            await until(lambda: not w.calls[0].secure_entry_active, what="entry over")
            await asyncio.sleep(0.6)
            slot.free()
            await until(lambda: not w.calls, what="call detached")
            await asyncio.to_thread(w.recordings.close)
    finally:
        feed.cancel()
    store = RecordingStore(recordings_root(cfg), load_master(cfg))
    (part,) = store.parts(session)
    meta = part.meta()
    (gap,) = [g for g in meta["gaps"] if g["reason"] == "secure_entry"]
    assert gap["end_ms"] - gap["start_ms"] >= 16 * 50, gap  # at least the time the digits took
    pcm, rate, _ = decode(b"".join(store.open_part(part)))
    ms = rate // 1000
    left = pcm[0]
    # silent inside (Opus's overlap and lookahead smear the edges: the tone's decay into the first ms and
    # its return into the last ms of a gap reach -47 dBFS within 20 ms of the edge, so 60 ms are left out)
    inside = pcm[:, (gap["start_ms"] + 60) * ms: (gap["end_ms"] - 60) * ms]
    assert inside.shape[1] >= 600 * ms and np.max(np.abs(inside)) < 1e-3
    assert rms(left[(gap["start_ms"] - 300) * ms: (gap["start_ms"] - 50) * ms]) > 0.03  # the tone before
    assert rms(left[(gap["end_ms"] + 50) * ms: (gap["end_ms"] + 400) * ms]) > 0.03  # ... and after
