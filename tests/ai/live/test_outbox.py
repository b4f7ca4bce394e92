"""The outbox: the one record of what was sent — coverage by handles, replay after a reconnect, and the
crash journal a replacement worker continues from (a torn tail is ignored; handles cover whole turns)."""

from __future__ import annotations

from pathlib import Path

from workers.ai.live.outbox import Kind, Outbox, journal_path, read_journal, remove_stale

CHUNK = 1280  # 40 ms
ME = object()  # the session that sends


def kinds(box: Outbox) -> list[Kind]:
    return [it.kind for it in box]


def send_all(box: Outbox, after: int = 0) -> int:
    while (item := box.next_after(after)) is not None:
        after = item.seq
        box.sent(ME, item, 0.0)
    return after


def test_audio_is_cut_into_chunks_and_marks_flush_the_partial() -> None:
    box = Outbox(CHUNK)
    box.attach(ME)
    assert not box.audio(b"\1\0" * 300)  # 600 bytes: no whole chunk yet
    assert box.audio(b"\1\0" * 1000)  # 2600 bytes: two chunks, 40 bytes left
    assert [len(it.data) for it in box] == [CHUNK, CHUNK]
    box.end()
    assert [len(it.data) for it in box] == [CHUNK, CHUNK, 40, 0] and kinds(box)[-1] is Kind.END


def test_a_handle_covers_the_answered_turns_only_and_replay_starts_after_it() -> None:
    box = Outbox(CHUNK)
    box.attach(ME)
    box.start(); box.audio(bytes(CHUNK)); box.end()  # noqa: E702
    box.start(); box.audio(bytes(CHUNK))  # noqa: E702 - the caller talks again before the answer
    sent = send_all(box)
    box.confirm(ME)  # a handle before any outcome covers nothing
    assert len(box.replay()) == 5
    box.outcome(ME, answered=True)  # the first turn is answered
    box.confirm(ME)
    assert kinds(box) == [Kind.START, Kind.AUDIO]
    assert box.reconnect(ME) == sent - 2  # a new connection re-sends the open turn
    assert box.next_after(box.reconnect(ME)).kind is Kind.START  # type: ignore[union-attr]


def test_an_interrupted_turn_is_not_covered() -> None:
    box = Outbox(CHUNK)
    box.attach(ME)
    box.start(); box.end()  # noqa: E702
    send_all(box)
    box.outcome(ME, answered=False)
    box.confirm(ME)
    assert len(box.replay()) == 2


def test_only_the_last_attached_session_changes_coverage() -> None:
    box = Outbox(CHUNK)
    old, new = object(), object()
    box.attach(old)
    box.start(); box.end()  # noqa: E702
    box.attach(new)  # the worker re-opened the call's session while the old one still closes
    send_all(box)
    box.outcome(old, answered=True)
    box.confirm(old)
    assert len(box.replay()) == 2


def test_uncovered_audio_is_bounded_oldest_first() -> None:
    box = Outbox(CHUNK, max_bytes=4 * CHUNK)
    for _ in range(10):
        box.audio(bytes(CHUNK))
    assert box.uncovered_audio_bytes == 4 * CHUNK and box.dropped_bytes == 6 * CHUNK
    assert box.replay()[0].seq == 7


def test_journal_survives_the_writer_and_follows_the_handles(tmp_path: Path) -> None:
    path = journal_path(tmp_path, "/va-x-s0", 3, 7)
    assert path.name == "va-x-s0-ai3-g7.journal"
    box = Outbox.open(path, CHUNK)
    box.attach(ME)
    box.start(); box.audio(b"\1\0" * 10); box.end()  # noqa: E702
    box.start(); box.text("keys: 9"); box.audio(b"\2\0" * 4)  # noqa: E702 - the next turn, unanswered
    send_all(box)
    box.outcome(ME, answered=True)
    box.confirm(ME)  # the handle covers the first turn: the file is rewritten to the rest
    assert box.records() == [(Kind.START, b""), (Kind.TEXT, b"keys: 9"), (Kind.AUDIO, b"\2\0" * 4)]
    box.audio(b"\3\0" * 2)
    # SIGKILL: a new process (the replacement worker) reads what the dead one wrote
    with path.open("ab") as f:  # ... including a record torn mid-write
        f.write(b"A\x10\0\0\0abc")
    again = Outbox.open(path, CHUNK)
    assert again.open_turn and kinds(again) == [Kind.START, Kind.TEXT]
    assert again.uncovered_audio_bytes == 12  # both audio records, in the partial chunk
    again.end()
    assert [it.data for it in again][-2:] == [b"\2\0" * 4 + b"\3\0" * 2, b""]
    again.close(remove=True)
    assert not path.exists()
    assert read_journal(b"S\0\0\0\0Z\0\0\0\0") == [(Kind.START, b"")]  # an unknown record ends it


def test_remove_stale_keeps_live_calls(tmp_path: Path) -> None:
    for slot, gen in ((0, 1), (0, 2), (1, 5)):
        Outbox.open(journal_path(tmp_path, "/va-x-s0", slot, gen), CHUNK).close()
    Outbox.open(journal_path(tmp_path, "/va-y-s0", 0, 1), CHUNK).close()  # another segment: untouched
    removed = remove_stale(tmp_path, "/va-x-s0", {(0, 2)})
    assert sorted(p.name for p in removed) == ["va-x-s0-ai0-g1.journal", "va-x-s0-ai1-g5.journal"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["va-x-s0-ai0-g2.journal", "va-y-s0-ai0-g1.journal"]
