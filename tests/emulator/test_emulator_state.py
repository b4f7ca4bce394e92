"""The emulator's bounded state (a long `make run` must not grow without limit), in process."""

from __future__ import annotations

import time

from appliance.emulator.server import EmulatorServer
from appliance.emulator.turns import TurnDetector
from tests.harness.emulator import silence, tone


def test_record_keeps_the_tail_and_snapshots_use_absolute_offsets() -> None:
    server = EmulatorServer("k", max_record_seconds=1.0)
    conv = server.new_conversation()
    conv.add_audio(bytes(range(256)) * 250, server.max_record_bytes)  # 64000 bytes = 2 s
    assert len(conv.record) == 32000 and conv.base == 32000 and conv.end == 64000
    handle = server.snapshot(conv, conv.end - 100)
    conv.add_audio(b"\x01\x00" * 10, server.max_record_bytes)
    restored = server.restore(server.handles[handle])
    assert restored.end == 64000 - 100 and restored.record == conv.record[: 64000 - 100 - conv.base]
    assert restored.resumes == 1


def test_idle_conversations_and_their_handles_expire() -> None:
    server = EmulatorServer("k", handle_ttl_s=10)
    conv = server.new_conversation()
    handle = server.snapshot(conv, 0)
    assert server.expire(time.monotonic() + 5) == 0 and handle in server.handles
    assert server.expire(time.monotonic() + 11) == 1
    assert conv.id not in server.conversations and handle not in server.handles


def test_automatic_turn_detection_trims_trailing_silence() -> None:
    d = TurnDetector(silence_ms=200)
    events = d.feed(silence(0.1) + tone(440, 0.5) + silence(0.3))
    assert [e.kind for e in events] == ["start", "end"]
    assert len(events[1].utterance) == 2 * int(0.04 * 16000) + 2 * int(0.5 * 16000)  # 40 ms prefix + tone
    assert d.feed(silence(1.0)) == []


def test_manual_turns_collect_only_between_marks() -> None:
    d = TurnDetector(manual=True)
    d.feed(tone(300, 0.1))
    assert [e.kind for e in d.activity_start()] == ["start"]
    d.feed(tone(300, 0.2))
    (end,) = d.activity_end()
    assert end.kind == "end" and len(end.utterance) == 2 * int(0.2 * 16000)
    assert d.activity_end() == [] and d.stream_end() == []
