"""RFC 2198 audio redundancy (RED) payloads: split one into its primary and redundant Opus frames.

Chromium offers ``red/48000/2`` with ``fmtp 111/111`` (Opus carrying the previous frame(s) again);
Janus NoSIP 1.1.2 passes it through both SDPs and relays the packets unchanged (docs/benchmarks.md
"Audio quality", loss resilience). A redundant copy of a frame lost in a burst is a whole frame, where
Opus in-band FEC only carries a low-bitrate version of the one frame before. Hand-written because the
format is four bytes per block and no maintained Python RTP library exposes it.

Layout: one 4-byte header per redundant block (F=1, block PT 7 bits, timestamp offset 14 bits, block
length 10 bits), then a 1-byte header for the primary (F=0, PT), then the block data in the same order.
"""

from __future__ import annotations


class RedError(ValueError):
    """A malformed RED payload."""


MAX_BLOCKS = 8


def split_red(payload: bytes | memoryview, inner_pt: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(primary, [(timestamp offset, redundant frame), ...]) of a RED payload; blocks of other
    payload types (or empty ones) are skipped. Raises :class:`RedError` for a malformed payload."""
    data = bytes(payload)
    pos, heads = 0, []
    while True:
        if pos >= len(data):
            raise RedError("RED payload ends inside its headers")
        b0 = data[pos]
        if not b0 & 0x80:  # the primary's 1-byte header ends the list
            heads.append((b0 & 0x7F, 0, -1))
            pos += 1
            break
        if pos + 4 > len(data) or len(heads) >= MAX_BLOCKS:
            raise RedError("RED header truncated or too many blocks")
        word = int.from_bytes(data[pos + 1: pos + 4], "big")
        heads.append((b0 & 0x7F, word >> 10, word & 0x3FF))
        pos += 4
    blocks: list[tuple[int, bytes]] = []
    primary = b""
    for pt, offset, length in heads:
        if length < 0:  # the primary: the rest
            chunk = data[pos:]
            if pt != inner_pt:
                raise RedError(f"RED primary has payload type {pt}, not {inner_pt}")
            primary = chunk
            break
        if pos + length > len(data):
            raise RedError("RED block runs past the payload")
        chunk = data[pos: pos + length]
        pos += length
        if pt == inner_pt and length and offset:
            blocks.append((offset, chunk))
    if not primary:
        raise RedError("RED payload without a primary frame")
    return primary, blocks


def build_red(primary: bytes, redundant: list[tuple[int, bytes]], inner_pt: int) -> bytes:
    """A RED payload (tests and the quality bench's caller): ``redundant`` = [(ts offset, frame)]."""
    out = bytearray()
    for offset, frame in redundant:
        if not 0 < offset < 1 << 14 or len(frame) >= 1 << 10:
            raise RedError("RED block offset or length out of range")
        out.append(0x80 | inner_pt)
        out += ((offset << 10) | len(frame)).to_bytes(3, "big")
    out.append(inner_pt)
    for _, frame in redundant:
        out += frame
    return bytes(out + primary)
