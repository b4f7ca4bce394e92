"""PCI-DSS secure keypad entry: while it is on, the caller's keypad digits go only to the payment endpoint."""

from __future__ import annotations


class SecureEntry:
    """One secure entry of one call."""

    def __init__(self) -> None:
        self.finished = False
