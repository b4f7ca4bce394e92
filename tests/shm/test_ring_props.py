"""Hypothesis property tests of the ring against a plain-bytes model, and of slot generations.

Covers: sequence preserved byte for byte, no torn frames (exact-size reads of whole writes),
full-ring drop-newest accounting, underrun accounting, flush semantics (discard what was queued at
flush time, keep later writes; the consumer, not the producer, moves the read cursor), cursor
wraparound past 2**32 frames and past 2**64 bytes, and generation reuse of slots.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from shm import atomic
from shm.segment import ShardSegment, SlotState
from tests.harness.shm import activate_slot, shard_segment

FRAME = 640
# interesting cursor starts: 0, just before 2**32 frames of 640 bytes, just before 2**64 bytes
STARTS = st.sampled_from([0, (1 << 32) * FRAME - 3 * FRAME - 7, (1 << 64) - 5 * FRAME - 3, (1 << 64) - 1])


class RingMachine(RuleBasedStateMachine):
    """Producer and consumer views of one ring (two attachments), checked against a model."""

    def __init__(self) -> None:
        super().__init__()
        self._cm = shard_segment(slots=1, uplink_bytes=4096, downlink_bytes=4096)
        self.seg = self._cm.__enter__()
        activate_slot(self.seg.slot(0))
        self.other = ShardSegment.attach(self.seg.name)
        self.prod = self.seg.slot(0).downlink  # producer: AI worker
        self.cons = self.other.slot(0).downlink  # consumer: media worker (separate mapping)
        self.cap = self.prod.capacity
        self.model = bytearray()
        self.pending_flush: int | None = None  # bytes at the front to discard on the next consumer op
        self.counter = 0
        self.start = 0
        self._seen_requests = 0
        self.exp = {"written": 0, "dropped": 0, "overruns": 0, "read": 0, "underruns": 0, "flushes": 0,
                    "flushed": 0, "flush_requests": 0}

    @initialize(start=STARTS)
    def set_start(self, start: int) -> None:
        self.prod.reset(start)
        self.start = start
        assert self.prod.write_cursor == start and self.cons.read_cursor == start

    def teardown(self) -> None:
        self.other.close()
        self._cm.__exit__(None, None, None)

    def _payload(self, n: int) -> bytes:
        base = self.counter
        self.counter += n
        return (np.arange(base, base + n, dtype=np.uint64) * 2654435761 >> 7).astype(np.uint8).tobytes()

    def _consumer_sync(self) -> None:
        if self.pending_flush is not None:
            self.exp["flushes"] += self.exp["flush_requests"] - self._seen_requests
            self._seen_requests = self.exp["flush_requests"]
            self.exp["flushed"] += self.pending_flush
            del self.model[: self.pending_flush]
            self.pending_flush = None

    @rule(n=st.one_of(st.just(FRAME), st.just(960), st.integers(0, 5000)))
    def write(self, n: int) -> None:
        data = self._payload(n)
        ok = self.prod.write(data)
        fits = len(self.model) + n <= self.cap
        assert ok == fits
        if fits:
            self.model += data
            self.exp["written"] += n
        else:
            self.exp["overruns"] += 1
            self.exp["dropped"] += n

    @rule(n=st.one_of(st.just(FRAME), st.integers(1, 5000)))
    def read(self, n: int) -> None:
        self._consumer_sync()
        got = self.cons.read(n)
        if len(self.model) >= n:
            assert got == bytes(self.model[:n])
            del self.model[:n]
            self.exp["read"] += n
        else:
            assert got is None
            self.exp["underruns"] += 1

    @rule(frame=st.sampled_from([FRAME, 960, 7]), most=st.integers(-1, 4))
    def read_frames(self, frame: int, most: int) -> None:
        """Whole frames only, never an underrun; ``left`` is the fill after the read."""
        self._consumer_sync()
        got, left = self.cons.read_frames(frame, most)
        k = len(self.model) // frame if most < 0 else min(most, len(self.model) // frame)
        assert got == bytes(self.model[:k * frame])
        del self.model[:k * frame]
        self.exp["read"] += k * frame
        assert left == len(self.model)

    @rule(n=st.integers(1, 3000))
    def read_into(self, n: int) -> None:
        self._consumer_sync()
        buf = bytearray(n)
        ok = self.cons.read_into(memoryview(buf))
        assert ok == (len(self.model) >= n)
        if ok:
            assert buf == self.model[:n]
            del self.model[:n]
            self.exp["read"] += n
        else:
            self.exp["underruns"] += 1

    @rule(n=st.integers(0, 3000))
    def peek(self, n: int) -> None:
        self._consumer_sync()
        got = self.cons.peek(n)
        assert got == (bytes(self.model[:n]) if len(self.model) >= n else None)

    @rule(n=st.integers(0, 3000))
    def skip(self, n: int) -> None:
        """skip consumes from the current cursor first, then obeys a pending flush."""
        k = self.cons.skip(n)
        assert k == min(n, len(self.model))
        del self.model[:k]
        self.exp["read"] += k
        if self.pending_flush is not None:
            self.pending_flush = max(0, self.pending_flush - k)
        self._consumer_sync()

    @rule(n=st.sampled_from([FRAME, 960]))
    def peek_then_skip_across_flush(self, n: int) -> None:
        """The idempotent-consume pattern: what was peeked is what gets skipped, flush or not."""
        self._consumer_sync()
        got = self.cons.peek(n)
        if got is None:
            return
        self.flush()
        self.write(n)  # a frame written after the flush must survive
        assert self.cons.skip(n) == n
        assert got == bytes(self.model[:n])
        del self.model[:n]
        self.exp["read"] += n
        self.pending_flush = max(0, (self.pending_flush or 0) - n)
        self._consumer_sync()

    @rule()
    def available(self) -> None:
        self._consumer_sync()
        assert self.cons.available() == len(self.model)

    @rule()
    def free_space(self) -> None:
        assert self.prod.free_space() == self.cap - len(self.model)

    @rule()
    def flush(self) -> None:
        self.prod.request_flush()
        self.exp["flush_requests"] += 1
        self.pending_flush = len(self.model)  # everything queued now; later writes survive

    @rule()
    def reattach_consumer(self) -> None:
        """A restarted consumer maps the segment again and continues from the shared cursors."""
        self.other.close()
        self.other = ShardSegment.attach(self.seg.name)
        self.cons = self.other.slot(0).downlink

    @invariant()
    def counters_match(self) -> None:
        s = self.prod.stats()
        assert s["fill"] == len(self.model)
        for k, v in self.exp.items():
            assert s[k] == v, (k, s[k], v)
        mask = (1 << 64) - 1
        assert self.prod.write_cursor == (self.start + s["written"]) & mask
        assert self.cons.read_cursor == (self.start + s["read"] + s["flushed"]) & mask


TestRing = RingMachine.TestCase
TestRing.settings = settings(max_examples=60, stateful_step_count=60, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


class TestRingPatomic(RingMachine.TestCase):  # type: ignore[name-defined,misc]
    """The same properties with the cursors moved by patomic calls (what aarch64 runs; on x86-64 the
    default is plain TSO loads/stores, ``shm.atomic.PLAIN_ORDERED``)."""

    settings = settings(max_examples=30, stateful_step_count=60, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])

    def setUp(self) -> None:
        self._plain = atomic.PLAIN_ORDERED
        atomic.PLAIN_ORDERED = False

    def tearDown(self) -> None:
        atomic.PLAIN_ORDERED = self._plain


class GenerationMachine(RuleBasedStateMachine):
    """Supervisor transitions vs. a worker's (slot, generation) guard, against a model."""

    def __init__(self) -> None:
        super().__init__()
        self._cm = shard_segment(slots=2, uplink_bytes=4096, downlink_bytes=4096)
        self.seg = self._cm.__enter__()
        self.worker = ShardSegment.attach(self.seg.name)
        self.state = [SlotState.FREE, SlotState.FREE]
        self.gen = [0, 0]
        self.held: list[tuple[int, int, str]] = []  # (slot, generation, session_id) a worker adopted

    def teardown(self) -> None:
        self.worker.close()
        self._cm.__exit__(None, None, None)

    @rule(i=st.integers(0, 1))
    def activate(self, i: int) -> None:
        slot = self.seg.slot(i)
        if self.state[i] is not SlotState.FREE:
            try:
                activate_slot(slot)
            except Exception as exc:
                assert "cannot activate" in str(exc)
            else:
                raise AssertionError("activate on a non-FREE slot must fail")
            return
        sid = f"s{i}-{self.gen[i] + 1}"
        g = activate_slot(slot, session_id=sid)
        self.gen[i] += 1
        assert g == self.gen[i]
        self.state[i] = SlotState.ACTIVE

    @rule(i=st.integers(0, 1))
    def begin_close(self, i: int) -> None:
        self.seg.slot(i).begin_close()
        self.state[i] = SlotState.CLOSING

    @rule(i=st.integers(0, 1))
    def free(self, i: int) -> None:
        self.seg.slot(i).free()
        self.state[i] = SlotState.FREE

    @rule()
    def worker_scan(self) -> None:
        """Worker tick: adopt new ACTIVE slots, drop sessions whose generation no longer matches."""
        self.held = [h for h in self.held if self.worker.slot(h[0]).is_current(h[1])]
        for info in self.worker.active():
            if not any(h[0] == info.index and h[1] == info.generation for h in self.held):
                self.held.append((info.index, info.generation, info.session_id))

    @invariant()
    def consistent(self) -> None:
        for i in range(2):
            ws = self.worker.slot(i)
            assert ws.state is self.state[i] and ws.generation == self.gen[i]
        for i, g, sid in self.held:
            # a held session is either still current (same session id) or detectably stale
            if self.worker.slot(i).is_current(g):
                assert self.state[i] is SlotState.ACTIVE and self.gen[i] == g
                assert sid == f"s{i}-{g}"
            else:
                assert self.state[i] is not SlotState.ACTIVE or self.gen[i] != g


TestGenerations = GenerationMachine.TestCase
TestGenerations.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


def test_wraparound_past_2_64_with_frames() -> None:
    """20 ms frames straddling the 2**64 cursor wrap and the ring end keep their content."""
    with shard_segment(slots=1, uplink_bytes=4096, downlink_bytes=4096) as seg:
        ring = seg.slot(0).uplink
        ring.reset((1 << 64) - 10 * FRAME - 123)
        for i in range(200):
            frame = bytes([i & 0xFF]) * FRAME
            assert ring.write(frame)
            if i % 3 == 0:
                assert ring.write(bytes([(i + 100) & 0xFF]) * FRAME)
                assert ring.read(FRAME) == frame
                assert ring.read(FRAME) == bytes([(i + 100) & 0xFF]) * FRAME
            else:
                assert ring.read(FRAME) == frame
        assert ring.write_cursor < 1 << 20  # the cursor really wrapped
        assert ring.stats()["fill"] == 0 and ring.available() == 0
