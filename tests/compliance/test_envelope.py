"""Envelope encryption: what it seals never appears in storage, and every way to open it wrongly fails."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from appliance.compliance.envelope import (
    DecryptError,
    FileKeyStore,
    KeyConfigError,
    Keyring,
    MasterKeys,
)

SECRET = b"my card is 4111 1111 1111 1111 and my name is Alice Example"


class Clock:
    def __init__(self, t: float = 1_780_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ring(tmp_path, text: str | None = None, clock=None) -> Keyring:
    text = text or MasterKeys.new_line("m1")
    return Keyring(MasterKeys.parse(text), FileKeyStore(tmp_path / "keys.json"), clock or Clock())


def test_round_trip_and_no_plaintext_at_rest(tmp_path) -> None:
    kr = ring(tmp_path)
    blob = kr.seal(SECRET, context=b"call:a:transcript", tenant="acme")
    assert SECRET not in blob and b"4111" not in blob
    assert kr.open(blob, context=b"call:a:transcript") == SECRET
    stored = (tmp_path / "keys.json").read_bytes()
    assert SECRET not in stored
    assert stat.S_IMODE(os.stat(tmp_path / "keys.json").st_mode) == 0o600
    # the data key itself is never stored unwrapped
    dek = kr._plain[Keyring.key_id_of(blob)]
    assert base64.b64encode(dek) not in stored and dek not in stored


def test_wrong_context_tampering_and_garbage_are_clear_errors(tmp_path) -> None:
    kr = ring(tmp_path)
    blob = kr.seal(SECRET, context=b"call:a:transcript")
    with pytest.raises(DecryptError, match="authentication"):
        kr.open(blob, context=b"call:b:transcript")  # moved to another record
    for i in (0, 1, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(DecryptError):
            kr.open(bytes(bad), context=b"call:a:transcript")
    with pytest.raises(DecryptError, match="not a sealed value"):
        kr.open(b"hello", context=b"")


def test_wrong_master_key_never_yields_plaintext(tmp_path) -> None:
    kr = ring(tmp_path)
    blob = kr.seal(SECRET, context=b"c")
    store = FileKeyStore(tmp_path / "keys.json")
    other = Keyring(MasterKeys.parse(MasterKeys.new_line("m1")), store, Clock())
    with pytest.raises(DecryptError, match="does not open under master key 'm1'"):
        other.open(blob, context=b"c")


def test_keys_per_tenant_and_month_rotation_keeps_old_data_readable(tmp_path) -> None:
    clock = Clock()
    kr = ring(tmp_path, clock=clock)
    a1 = kr.seal(b"one", context=b"c", tenant="acme")
    b1 = kr.seal(b"two", context=b"c", tenant="other")
    assert Keyring.key_id_of(a1) != Keyring.key_id_of(b1)
    assert Keyring.key_id_of(kr.seal(b"x", context=b"c", tenant="acme")) == Keyring.key_id_of(a1)
    retired = kr.rotate()
    assert Keyring.key_id_of(a1) in retired
    a2 = kr.seal(b"three", context=b"c", tenant="acme")
    assert Keyring.key_id_of(a2) != Keyring.key_id_of(a1)
    clock.t += 40 * 86400  # next month: a new key without any rotation
    a3 = kr.seal(b"four", context=b"c", tenant="acme")
    assert Keyring.key_id_of(a3) not in (Keyring.key_id_of(a1), Keyring.key_id_of(a2))
    fresh = Keyring(kr.master, FileKeyStore(tmp_path / "keys.json"), clock)  # a restarted process
    assert [fresh.open(b, context=b"c") for b in (a1, b1, a2, a3)] == [b"one", b"two", b"three", b"four"]


def test_master_rotation_rewraps_without_touching_data(tmp_path) -> None:
    old_line = MasterKeys.new_line("m1")
    kr = ring(tmp_path, old_line)
    blob = kr.seal(SECRET, context=b"c")
    new_line = MasterKeys.new_line("m2")
    store = FileKeyStore(tmp_path / "keys.json")
    both = Keyring(MasterKeys.parse(old_line + "\n" + new_line), store, Clock())
    assert both.master.current_id == "m2"
    assert both.rewrap() == 1
    only_new = Keyring(MasterKeys.parse(new_line), FileKeyStore(tmp_path / "keys.json"), Clock())
    assert only_new.open(blob, context=b"c") == SECRET


def test_shredded_key_makes_data_unreadable(tmp_path) -> None:
    kr = ring(tmp_path)
    blob = kr.seal(SECRET, context=b"c", tenant="acme")
    kr.shred([Keyring.key_id_of(blob)])
    with pytest.raises(DecryptError, match="not found"):
        kr.open(blob, context=b"c")
    with pytest.raises(DecryptError, match="not found"):
        ring(tmp_path).open(blob, context=b"c")


@pytest.mark.parametrize(("text", "why"), [
    ("", "no master key"),
    ("m1 no-colon", "line 1"),
    ("m1:!!!", "not base64"),
    ("m1:" + base64.b64encode(b"short").decode(), "5 bytes"),
    ("bad id:" + base64.b64encode(bytes(32)).decode(), "line 1"),
])
def test_bad_master_key_material_names_the_line_not_the_key(text: str, why: str) -> None:
    with pytest.raises(KeyConfigError, match=why) as info:
        MasterKeys.parse(text)
    assert "!!!" not in str(info.value)
