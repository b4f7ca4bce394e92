"""Masking of card numbers (PAN) and card security codes in transcript text before it is stored.

PCI-DSS forbids storing a CVV at all and a PAN in clear; callers say both out loud, and the Live
transcriptions write what they heard, as figures ("4111 1111 …") or as words ("four one one one …").
A PAN is a run of 13-19 digits (spaces, dashes, dots or "and" between groups) that passes the Luhn
check; a run that fails Luhn (a phone number, an order id) stays, so transcripts stay useful. A security
code is a 3-4 digit run within a few words after "CVV", "CVC", "security code" or "verification code".
What is masked becomes ``[card number]`` / ``[security code]``; the count goes to the record's events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORDS = {"zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3", "four": "4",
          "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}
_DIGIT = r"(?:\d|(?:zero|oh|one|two|three|four|five|six|seven|eight|nine)\b)"
_SEP = r"(?:[\s.,-]+|\s+and\s+)?"
# A run of digit tokens (figures or words), at least 3 long, separators allowed between them.
_RUN = re.compile(rf"(?<![\w]){_DIGIT}(?:{_SEP}{_DIGIT}){{2,}}(?![\w])", re.IGNORECASE)
_CVV_CUE = re.compile(r"\b(?:cvv2?|cvc2?|cid|security\s+code|verification\s+(?:code|number))\b",
                      re.IGNORECASE)
_CUE_WINDOW = 40  # characters after the cue in which the code is expected

PAN_MASK = "[card number]"
CVV_MASK = "[security code]"


def _digits(token_run: str) -> str:
    out = []
    for tok in re.findall(r"\d|[a-z]+", token_run.lower()):
        if tok.isdigit():
            out.append(tok)
        elif tok in _WORDS:
            out.append(_WORDS[tok])
    return "".join(out)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Masked:
    text: str
    pans: int
    codes: int


def mask(text: str) -> Masked:
    """``text`` with every Luhn-valid 13-19 digit PAN and every cued security code replaced."""
    pans = codes = 0
    pieces: list[str] = []
    last = 0
    cue_ends = [m.end() for m in _CVV_CUE.finditer(text)]
    for m in _RUN.finditer(text):
        digits = _digits(m.group(0))
        replacement = None
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            replacement, pans = PAN_MASK, pans + 1
        elif 3 <= len(digits) <= 4 and any(0 <= m.start() - end <= _CUE_WINDOW for end in cue_ends):
            replacement, codes = CVV_MASK, codes + 1
        if replacement is not None:
            pieces.append(text[last:m.start()])
            pieces.append(replacement)
            last = m.end()
    pieces.append(text[last:])
    return Masked("".join(pieces), pans, codes)
