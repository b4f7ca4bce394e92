"""Card numbers and security codes spoken by a caller are masked; other numbers stay."""

from __future__ import annotations

import pytest

from appliance.compliance.pan import CVV_MASK, PAN_MASK, luhn_ok, mask


@pytest.mark.parametrize("said", [
    "my card is 4111 1111 1111 1111 thanks",
    "my card is 4111-1111-1111-1111 thanks",
    "my card is 4111111111111111 thanks",
    "my card is four one one one one one one one one one one one one one one one thanks",
    "my card is 4 1 1 1, 1 1 1 1, 1 1 1 1, 1 1 1 1 thanks",
    "my card is 378282246310005 thanks",  # Amex, 15 digits
    "my card is 6011 0009 9013 9424 thanks",
])
def test_luhn_valid_pans_are_masked_in_figures_and_words(said: str) -> None:
    out = mask(said)
    assert out.pans == 1
    assert out.text == f"my card is {PAN_MASK} thanks"


def test_numbers_that_are_not_cards_stay() -> None:
    for said in ("call me on 0176 1234 5678", "order 4111 1111 1111 1112", "it costs 1999 euros",
                 "the code is 123", "room 4 1 2"):
        out = mask(said)
        assert out.text == said and out.pans == 0 and out.codes == 0, said


def test_cued_security_codes_are_masked() -> None:
    out = mask("card 4111 1111 1111 1111, the CVV is 1 2 3 and expiry twelve")
    assert out.text == f"card {PAN_MASK}, the CVV is {CVV_MASK} and expiry twelve"
    assert (out.pans, out.codes) == (1, 1)
    out = mask("security code: seven three seven")
    assert out.text == f"security code: {CVV_MASK}" and out.codes == 1


def test_luhn() -> None:
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
