"""Downlink Opus settings from the caller leg's measured loss (RTCP receiver reports).

The media worker's downlink encoder started with fixed settings (``media.opus_expected_loss_percent``).
Every RTCP SR/RR that reaches the worker (its RTCP port, or muxed on the RTP port) carries, per report
block, the *fraction lost* (RFC 3550 6.4.1: the receiver's loss since its previous report, /256) of a
stream the sender of the report receives — for the report blocks about our downlink, the caller side's
loss. :func:`fraction_lost` reads the worst block; :class:`LossPolicy` smooths it and picks a row of
``TABLE``; :class:`workers.media.worker.OpusDownlink` applies the row with ``opus_encoder_ctl``.

The table (docs/operations.md "Downlink loss adaptation"):

=================  ========  =====================  ============  ====
smoothed loss      FEC       expected loss (libopus) bitrate       DTX
=================  ========  =====================  ============  ====
< 2 %              on        configured (default 5)  configured    off
2 - 8 %            on        10                      +4 kbit/s     off
8 - 15 %           on        20                      +8 kbit/s     off
>= 15 %            on        30                      +8 kbit/s     off
=================  ========  =====================  ============  ====

Why these columns: libopus only spends bits on in-band FEC (LBRR) in proportion to the expected loss it
is told, and those bits come out of the primary encoding, so the bitrate rises with it to keep the
primary quality (measured in tests/media/test_loss_policy.py: a lost packet recovered from the next
one's FEC correlates far better with the original than PLC). DTX stays off in every row: the worker
deliberately keeps a continuous stream (cached silence packets cost nothing, and AudioBridge and the
browser's jitter buffer stay steady; workers/media/worker.py), and DTX would only hide loss.
Hysteresis: a higher row is taken at the first report that needs it, a lower one only after
``DOWN_AFTER`` consecutive reports below it (a loss burst is rarely alone).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTCP_SR = 200
RTCP_RR = 201
SMOOTHING = 0.5  # EMA weight of the newest report (reports come every ~1-5 s)
DOWN_AFTER = 3


@dataclass(frozen=True)
class OpusSettings:
    fec: bool
    expected_loss_percent: int
    bitrate: int
    dtx: bool = False


# (lower bound of the smoothed loss ratio, expected loss %, bitrate increase bit/s); expected loss None:
# the configured value
TABLE: tuple[tuple[float, int | None, int], ...] = (
    (0.0, None, 0),
    (0.02, 10, 4000),
    (0.08, 20, 8000),
    (0.15, 30, 8000),
)


def fraction_lost(data: bytes | memoryview) -> float | None:
    """The worst ``fraction lost`` (0..1) of the SR/RR report blocks in a compound RTCP packet; None when
    it has none (or is not RTCP)."""
    worst: float | None = None
    off, n = 0, len(data)
    while off + 4 <= n:
        b0, pt, length = struct.unpack_from("!BBH", data, off)
        if b0 >> 6 != 2:
            return worst
        end = off + 4 * (length + 1)
        if end > n:
            return worst
        count = b0 & 0x1F
        first = {RTCP_SR: off + 28, RTCP_RR: off + 8}.get(pt)
        if first is not None:
            for i in range(count):
                blk = first + 24 * i
                if blk + 24 > end:
                    break
                lost = data[blk + 4] / 256.0
                worst = lost if worst is None else max(worst, lost)
        off = end
    return worst


class LossPolicy:
    """One call's downlink settings; :meth:`report` returns new settings when they change."""

    def __init__(self, bitrate: int, expected_loss_percent: int) -> None:
        self.base_bitrate = bitrate
        self.base_loss = expected_loss_percent
        self.loss: float | None = None  # smoothed loss ratio
        self.row = 0
        self._below = 0

    def settings(self, row: int | None = None) -> OpusSettings:
        _, expected, extra = TABLE[self.row if row is None else row]
        return OpusSettings(True, self.base_loss if expected is None else max(expected, self.base_loss),
                            self.base_bitrate + extra)

    def report(self, fraction: float) -> OpusSettings | None:
        """A receiver report's fraction lost; the new settings if the row changes, else None."""
        self.loss = fraction if self.loss is None else self.loss + SMOOTHING * (fraction - self.loss)
        want = max(i for i, (lo, _, _) in enumerate(TABLE) if self.loss >= lo)
        if want > self.row:
            self.row, self._below = want, 0
            return self.settings()
        if want < self.row:
            self._below += 1
            if self._below >= DOWN_AFTER:
                self.row, self._below = want, 0
                return self.settings()
            return None
        self._below = 0
        return None
