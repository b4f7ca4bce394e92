"""Keypad entry batching (workers/ai/dtmf.py): ``#`` ends an entry, so does a pause or 32 digits."""

from workers.ai.dtmf import MAX_DIGITS, DtmfBuffer, digit_for, dtmf_text


def test_hash_ends_an_entry_and_is_kept() -> None:
    b = DtmfBuffer(1000)
    assert [b.push(d, 0.1 * i) for i, d in enumerate("1234")] == [None] * 4
    assert b.push("#", 0.5) == "1234#"
    assert b.pending == "" and b.due(10.0) is None


def test_pause_flushes_after_flush_ms_not_before() -> None:
    b = DtmfBuffer(1000)
    b.push("1", 0.0)
    b.push("*", 0.8)  # each key restarts the wait
    assert b.due(1.7) is None
    assert b.due(1.8) == "1*"
    assert b.due(5.0) is None


def test_long_entry_is_cut_at_max_digits() -> None:
    b = DtmfBuffer(1000)
    out = [b.push("7", 0.0) for _ in range(MAX_DIGITS + 3)]
    assert out[MAX_DIGITS - 1] == "7" * MAX_DIGITS
    assert [o for o in out if o] == ["7" * MAX_DIGITS]
    assert b.pending == "777"


def test_codes_and_text() -> None:
    assert [digit_for(c) for c in (0, 9, 10, 11, 12, 15)] == ["0", "9", "*", "#", "A", "D"]
    assert digit_for(16) is None and digit_for(-1) is None
    assert dtmf_text("42#").endswith(": 42#")
