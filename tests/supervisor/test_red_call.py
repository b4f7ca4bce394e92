"""RED end to end: Chromium (the demo page) → Janus NoSIP → media worker with `media.red` on.

Chromium offers red/48000/2; with `media.red` the supervisor answers it, so Chromium sends RFC 2198
packets (PT 63) that the media worker must unpack: the call is only heard back (the emulator echoes
what the model received) if it does, and the slot counters show RED packets accepted, not dropped.
"""

from __future__ import annotations

import numpy as np
import pytest

from shm.segment import ShardSegment, segment_name
from tests.harness.audio import speech, write_wav
from tests.harness.emulator import start_emulator
from tests.supervisor.conftest import NODE_MODULES, demo_page_call, start_supervisor, stop_supervisor
from tests.supervisor.rtc import RATE

pytestmark = [pytest.mark.janus, pytest.mark.slow]


@pytest.fixture(scope="module")
def sup(tmp_path_factory, redis_srv, janus):  # type: ignore[no-untyped-def]
    with start_emulator(tmp_path_factory.mktemp("emu"), reply="echo") as emu:
        sp = start_supervisor(tmp_path_factory.mktemp("sup"), redis_srv.url, janus, slots=1, extra={
            "model": {"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file,
                      "max_retries": 5},
            "media": {"red": True},
        })
        yield sp
        stop_supervisor(sp)


@pytest.mark.skipif(not (NODE_MODULES / "playwright-core").exists(), reason="npm install in tests/e2e first")
async def test_chromium_red_call_is_unpacked_by_the_media_worker(sup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wav = tmp_path / "speech.wav"
    write_wav(wav, np.concatenate([speech("hello appliance, can you hear me", RATE),
                                   np.zeros(2 * RATE, np.int16)]), RATE)
    await demo_page_call(sup.api + "/", 3000, wav, sup.log_tail)  # asserts the answer was heard
    seg = ShardSegment.attach(segment_name(sup.instance, 0))
    try:
        c = seg.slot(0).counters.snapshot()
    finally:
        seg.close()
    print(f"media counters after the RED call: {c}")
    opened = [line for line in sup.log.read_text(errors="replace").splitlines() if '"session open"' in line]
    assert opened and all('"red_pt": 63' in line for line in opened), opened  # RED was negotiated
    assert c["rx_packets"] > 100 and c["rx_invalid"] == 0, c
    assert c["rx_dropped"] < c["rx_packets"] // 10, c  # RED packets were taken, not dropped as unknown PT
    # Chromium really sent RED: each packet carries the previous frame too (~143 bytes per packet measured;
    # ~76 with plain Opus when RED was listed after Opus in the answer and Chromium kept sending Opus)
    assert c["rx_bytes"] / c["rx_packets"] > 110, c
