"""Turn journal: records survive the writer, a torn tail is ignored, handles confirm whole turns only."""

from __future__ import annotations

from workers.ai.journal import AUDIO, END, START, TurnJournal, journal_path, remove_stale


def test_records_confirm_and_torn_tail(tmp_path) -> None:
    path = journal_path(tmp_path, "/va-x-s0", 3, 7)
    assert path.name == "va-x-s0-ai3-g7.journal"
    j = TurnJournal(path)
    j.start()
    j.audio(b"\1\0" * 10)
    j.end()
    j.start()
    j.audio(b"\2\0" * 4)  # the caller started the next turn before the model answered the first
    j.close()
    # a new process (the replacement worker) reads what the dead one wrote
    j2 = TurnJournal(path)
    assert [k for k, _ in j2.records()] == [START, AUDIO, END, START, AUDIO]
    j2.confirm(1)  # the handle covers the first turn only
    assert j2.records() == [(START, b""), (AUDIO, b"\2\0" * 4)]
    with path.open("ab") as f:  # a writer killed mid-record
        f.write(b"A\x10\0\0\0abc")
    j3 = TurnJournal(path)
    assert len(j3.records()) == 2
    j3.remove()
    assert not path.exists()


def test_remove_stale_keeps_live_calls(tmp_path) -> None:
    for slot, gen in ((0, 1), (0, 2), (1, 5)):
        TurnJournal(journal_path(tmp_path, "/va-x-s0", slot, gen)).close()
    TurnJournal(journal_path(tmp_path, "/va-y-s0", 0, 1)).close()  # another segment: untouched
    removed = remove_stale(tmp_path, "/va-x-s0", {(0, 2)})
    assert sorted(p.name for p in removed) == ["va-x-s0-ai0-g1.journal", "va-x-s0-ai1-g5.journal"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["va-x-s0-ai0-g2.journal", "va-y-s0-ai0-g1.journal"]


def test_text_records_round_trip_and_count_in_their_turn(tmp_path) -> None:
    from workers.ai.journal import TEXT

    j = TurnJournal(journal_path(tmp_path, "/va-x-s0", 0, 1))
    j.start()
    j.text("keys: 1234#")
    j.end()
    j.start()
    j.text("keys: 9")
    assert j.records() == [(START, b""), (TEXT, b"keys: 1234#"), (END, b""), (START, b""), (TEXT, b"keys: 9")]
    j.confirm(1)
    assert j.records() == [(START, b""), (TEXT, b"keys: 9")]
    j.remove()
