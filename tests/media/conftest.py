"""Fixtures of the media worker tests: a real Janus in a netns (module-scoped), a shard segment, a worker."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Iterator

import pytest

from appliance.config import MediaConfig
from shm.segment import ShardSegment, ring_bytes
from tests.harness.janus import JanusInstance, janus_available, janus_in_netns
from workers.media.worker import MediaWorker


@pytest.fixture(scope="module")
def janus() -> Iterator[JanusInstance]:
    if not janus_available():
        pytest.skip("needs root, janus and iproute2")
    with janus_in_netns() as inst:
        yield inst


def free_port_pair(host: str = "127.0.0.1") -> int:
    """An even port P with P and P+1 free for UDP on ``host``."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            p = s.getsockname()[1] & ~1
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                a.bind((host, p))
                b.bind((host, p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free UDP port pair")


@pytest.fixture
def segment() -> Iterator[ShardSegment]:
    iid = "mt" + secrets.token_hex(4)
    up, down = ring_bytes(2000, 8000)
    seg = ShardSegment.create(f"/va-{iid}-s0", slots=4, uplink_bytes=up, downlink_bytes=down, instance_id=iid)
    try:
        yield seg
    finally:
        seg.close()
        seg.unlink()


@contextlib.contextmanager
def running_worker(seg: ShardSegment, host: str = "127.0.0.1", **media: object) -> Iterator[MediaWorker]:
    """A MediaWorker on its own thread (stopped and joined at exit).

    Playback pauses are off unless a test asks for them (``pause_on_speech_dbfs``): no AI worker runs
    here to settle a hold, and most tests have the caller talk while the model audio plays.
    """
    cfg = MediaConfig(**{"rtp_host": host, "pause_on_speech_dbfs": 0.0, **media})  # type: ignore[arg-type]
    worker = MediaWorker(seg, cfg, host=host)
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop.is_set,), name="media-worker", daemon=True)
    t.start()
    try:
        yield worker
    finally:
        stop.set()
        t.join(10)
        assert not t.is_alive()
        worker.close()
