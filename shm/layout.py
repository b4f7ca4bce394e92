"""Byte layout of a shard segment (layout version 2). All integers little-endian.

Why a fixed hand-written layout instead of a serialisation library: the segment is mapped by
several processes at once and read/written field by field with atomics; every hot field sits at a
fixed, cache-line-aligned offset so the producer's and consumer's words never share a line.

Segment = header (4 KiB) + ``n_slots`` slots of ``slot_size`` bytes (multiple of 4 KiB).

Header::

    0   magic  b"VASHMSEG"          8   layout version u32     12  header size u32
    16  n_slots u32                 20  slot size u32          24  uplink ring bytes u64
    32  downlink ring bytes u64     40  total size u64         48  created (unix ns) u64
    56  creator pid u64             64  instance id (64 B, NUL padded)
    128 crc32 of bytes [0, 128) u32
    192 media heartbeat: pid u64, CLOCK_MONOTONIC ns u64
    256 ai heartbeat:    pid u64, CLOCK_MONOTONIC ns u64
    1024 media histograms (1 KiB, media worker)   2048 ai histograms (1 KiB, AI worker): shm/histograms.py

Slot = control block (8 KiB) + uplink ring data + downlink ring data. Control block offsets are
the ``CB_*`` constants below; ring headers (``RING_*``, relative to the ring header) live inside the
control block, ring data after it.
"""

from __future__ import annotations

MAGIC = b"VASHMSEG"
LAYOUT_VERSION = 2  # 2: playback hold words (CB_HOLD / CB_RELEASE)
PAGE = 4096
CACHE_LINE = 128  # aarch64 parts prefetch pairs of 64 B lines; keep hot words 128 B apart

HEADER_SIZE = PAGE
H_MAGIC = 0
H_VERSION = 8
H_HEADER_SIZE = 12
H_NSLOTS = 16
H_SLOT_SIZE = 20
H_UPLINK = 24
H_DOWNLINK = 32
H_TOTAL = 40
H_CREATED = 48
H_CREATOR_PID = 56
H_INSTANCE = 64
INSTANCE_MAX = 64
H_CRC = 128
H_CRC_COVERS = 128
H_HEARTBEAT = {"media": 256, "ai": 384}  # pid u64, monotonic ns u64
# per-shard latency histograms (shm/histograms.py), one writer each; zero in a new segment, so older
# readers/writers of layout 2 simply never touch them (no version bump needed)
H_HIST = {"media": 1024, "ai": 2048}
H_HIST_SIZE = 1024

# ---- control block -------------------------------------------------------------------------
CTRL_SIZE = 8192
CB_GEN_STATE = 0  # u64: generation << 8 | state; written only by the supervisor

CB_REMOTE_SEQ = 128  # seqlock over remote ip/port (settable after activation)
CB_REMOTE_PORT = 136  # u32
CB_REMOTE_IP_LEN = 140  # u32
CB_REMOTE_IP = 144  # 64 B
REMOTE_IP_MAX = 64

# written before ACTIVE is published; guarded by the generation
CB_LOCAL_PORT = 256  # u32
CB_PAYLOAD_TYPE = 260  # u32
CB_CHANNELS = 264  # u32
CB_DTMF_PT = 268  # i32 (-1: none)
CB_MODE = 272  # u32 index into MODES
CB_SESSION_LEN = 276  # u32
CB_OPTIONS_LEN = 280  # u32
CB_SESSION = 320  # 64 B
SESSION_MAX = 64
CB_OPTIONS = 512  # 2048 B JSON
OPTIONS_MAX = 2048

# seqlocked strings written by the AI worker: (seq u64, len u32, data)
CB_RESUME = 2560
RESUME_MAX = 1024
CB_MODEL_STATE = 3712
MODEL_STATE_MAX = 32
CB_TRANSCRIPT = 3840
TRANSCRIPT_MAX = 512
SEQ_DATA = 16  # data offset inside a seqlocked string block

# DTMF / event SPSC queue (media worker -> AI worker)
CB_EV_WRITE = 4480  # u64, producer line (+8: events dropped u64)
CB_EV_DROPPED = 4488
CB_EV_READ = 4608  # u64, consumer line
CB_EV_ENTRIES = 4736  # EVENTS_CAP x (code i64, value i64)
EVENTS_CAP = 64
EVENT_SIZE = 16

# named counters: media block and AI block on separate cache lines
CB_COUNTERS_MEDIA = 5888  # 32 x u64
CB_COUNTERS_AI = 6144  # 32 x u64
COUNTERS_PER_BLOCK = 32

CB_UPLINK_HDR = 6656  # ring header, 256 B
CB_DOWNLINK_HDR = 6912

# provisional barge-in (playback hold): one writer per line. The media worker bumps ``hold_seq`` when it
# pauses model audio on a loud caller frame; the AI worker answers with ``release_seq = hold_seq`` once it
# has flushed (speech confirmed) or decided to resume (a false alarm). Held while the two differ.
CB_HOLD = 7168  # u64 hold_seq (media worker)
CB_RELEASE = 7296  # u64 release_seq (AI worker)
CB_PROTECT = 7304  # u64 downlink cursor up to which audio is the uninterruptible greeting (AI worker)
# the current answer's clock readings (AI worker writes, media worker reads when the answer's first RTP
# packet goes out: va_turn_latency_seconds{stage="playout"} and va_turn_e2e_seconds; shm/histograms.py)
CB_ANSWER = 7424  # u64 caller's speech end (monotonic ns), u64 first model audio of the answer (ns)

# ---- ring header (relative) ----------------------------------------------------------------
RING_HDR_SIZE = 256
# producer-owned line
RING_WRITE = 0
RING_FLUSH_EPOCH = 8
RING_FLUSH_CURSOR = 16
RING_START = 24  # cursor value at the last reset (counters are derived from it)
RING_DROPPED = 32
RING_OVERRUNS = 40
# consumer-owned line
RING_READ = 128
RING_FLUSH_SEEN = 136
RING_UNDERRUNS = 152
RING_FLUSHES = 160
RING_FLUSHED = 168

MODES = ("direct", "room")
U64 = (1 << 64) - 1

assert CB_EV_ENTRIES + EVENTS_CAP * EVENT_SIZE <= CB_COUNTERS_MEDIA
assert CB_TRANSCRIPT + SEQ_DATA + TRANSCRIPT_MAX <= CB_EV_WRITE
assert CB_DOWNLINK_HDR + RING_HDR_SIZE <= CB_HOLD and CB_HOLD + CACHE_LINE <= CB_RELEASE
assert CB_PROTECT + 8 <= CB_ANSWER and CB_ANSWER + 16 <= CTRL_SIZE
assert H_HEARTBEAT["ai"] + 16 <= H_HIST["media"] and H_HIST["ai"] + H_HIST_SIZE <= HEADER_SIZE


def ring_capacity(requested: int) -> int:
    """Ring data size: ``requested`` rounded up to a power of two (>= 4 KiB).

    A power of two keeps ``cursor % capacity`` consistent when the u64 cursors wrap at 2**64.
    """
    if requested <= 0:
        raise ValueError(f"ring size must be positive, got {requested}")
    return max(PAGE, 1 << (requested - 1).bit_length())


def slot_size(uplink_cap: int, downlink_cap: int) -> int:
    """Bytes per slot (control block + both rings), a multiple of the page size."""
    size = CTRL_SIZE + uplink_cap + downlink_cap
    return (size + PAGE - 1) // PAGE * PAGE
