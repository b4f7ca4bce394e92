"""Degradation tiers: the caller is told, can wait, leave a number or be transferred; no number leaks."""

from __future__ import annotations

from workers.ai.degrade import (
    BackToModel,
    CallbackRequested,
    Degradation,
    DegradeSettings,
    End,
    Phase,
    Play,
    ReadBack,
    Transfer,
)

S = DegradeSettings(wait_seconds=20, menu_timeout_seconds=8, digit_timeout_seconds=6, max_hold_seconds=300)


def keys(d: Degradation, digits: str, now: float) -> list:
    out: list = []
    for ch in digits:
        out += d.digit(ch, now)
    return out


def test_tier1_then_menu_then_back_to_model_with_notice() -> None:
    d = Degradation(S, 0.0)
    assert d.begin() == [Play("trouble")]
    assert d.tick(19.9, False) == []
    assert d.tick(20.0, False) == [Play("menu")]
    assert d.tick(21.0, True) == [Play("back"), BackToModel()]
    assert d.phase is Phase.DONE and d.tick(22.0, True) == []


def test_keep_waiting_restarts_the_wait() -> None:
    d = Degradation(S, 0.0)
    d.tick(20.0, False)
    assert d.digit("1", 21.0) == [Play("keep_waiting")]
    assert d.tick(40.0, False) == []
    assert d.tick(41.0, False) == [Play("menu")]


def test_callback_number_collected_read_back_confirmed_and_never_in_repr() -> None:
    d = Degradation(S, 0.0)
    d.tick(20.0, False)
    assert d.digit("2", 21.0) == [Play("enter_number")]
    assert keys(d, "01761234567", 22.0) == []
    out = d.digit("#", 23.0)
    assert out == [Play("you_entered"), ReadBack("01761234567"), Play("confirm")]
    assert d.tick(24.0, True) == []  # the model came back, but the caller asked for a call back
    out = d.digit("1", 25.0)
    assert out == [CallbackRequested("01761234567"), Play("goodbye_callback"), End("callback")]
    assert "0176" not in repr(out) and "0176" not in repr(ReadBack("01761234567"))


def test_reenter_short_number_and_star_clears() -> None:
    d = Degradation(S, 0.0)
    d.tick(20.0, False)
    d.digit("2", 21.0)
    assert keys(d, "12#", 22.0) == [Play("no_input"), Play("enter_number")]  # too short
    keys(d, "999*", 23.0)
    assert keys(d, "5551234", 24.0) == []
    assert d.tick(30.0, False)[1] == ReadBack("5551234")  # a 6 s pause ends the entry
    assert d.digit("2", 31.0) == [Play("enter_number")]
    keys(d, "5559876#", 32.0)
    assert d.digit("1", 33.0)[0] == CallbackRequested("5559876")


def test_transfer_is_an_event_and_ends() -> None:
    d = Degradation(S, 0.0)
    d.tick(20.0, False)
    assert d.digit("3", 21.0) == [Play("transferring"), Transfer(), End("transferred")]
    off = Degradation(DegradeSettings(transfer_enabled=False), 0.0)
    off.tick(20.0, False)
    assert off.digit("3", 21.0) == [Play("no_input"), Play("menu_no_transfer")]  # no option 3 offered


def test_no_input_repeats_menu_twice_then_waits_again_and_max_hold_bounds_the_wait() -> None:
    d = Degradation(S, 0.0)
    d.tick(20.0, False)
    assert d.tick(28.0, False) == [Play("no_input"), Play("menu")]
    assert d.tick(36.0, False) == [Play("no_input"), Play("menu")]
    assert d.tick(44.0, False) == [Play("keep_waiting")]  # no keypad answer: hold on, not hang up
    assert d.phase is Phase.WAITING and d.tick(63.9, False) == []
    assert d.tick(64.0, False) == [Play("menu")]  # the menu again after another wait
    d = Degradation(S, 0.0)
    t = 20.0
    d.tick(t, False)
    while t + 19 < 300:  # a caller who keeps pressing 1
        d.digit("1", t)
        t += 19
        assert not any(isinstance(a, End) for a in d.tick(t, False))
    assert d.tick(300.0, False) == [Play("max_hold"), End("max_hold")]
