"""Media worker cost: CPU µs per 20 ms frame of decode+jitter buffer and of encode+pacing.

Runs the real :class:`workers.media.worker.MediaSession` code on a real shard segment (sockets on
loopback), driving it directly (no sleeping), so the numbers are pure CPU:

* ``uplink_us_per_frame``: ``on_rtp`` (address/RTP/SSRC/Opus-TOC validation, RFC 3550 stats, jitter
  buffer put) + ``tick_uplink`` (jitter buffer pop, Opus decode to 16 kHz, uplink ring write) for a
  browser-like stream (48 kHz Opus, 32 kbps, FEC; 10 % of the frames lost → FEC/PLC path exercised).
* ``downlink_speech_us_per_frame``: ``tick_downlink`` with model audio queued (ring read, Opus encode at
  24 kHz, RTP build, ``sendto``), for each ``--complexity``; ``downlink_silence_us_per_frame`` when the
  model is silent (the cached silence packet).
* ``binding``: encode/decode µs of the same 20 ms frames through our ctypes binding (bundled libopus
  1.6 and Debian's 1.3.1) and through PyAV, the numbers behind docs/opus.md.
* ``resampler``: soxr stream per quality for the only rate changes we have (G.711 rooms: 8→16 kHz up,
  24→8 kHz down): µs per 20 ms frame, worst output lag behind real time (burstiness → latency) and
  SINAD on a 1 kHz tone; the reason ``workers/media/g711.py`` uses QQ.
* ``scale``: the real ``voice-appliance media-worker`` process carrying ``--sessions`` calls in real time
  (a load-generator process sends each call's Opus RTP every 20 ms and receives the worker's packets;
  this process plays the AI worker: consumes every uplink frame and speaks on the downlink 50 % of the
  time): worker CPU per call-second from /proc, packets each call received per second (50 = none
  missing) and the downlink's pacing and per-tick send spread at the receiver from kernel receive
  timestamps (``_pacing``). ``--scale-only`` runs just this part.
* ``latency``: with the worker running in real time (a thread here), the time from a tone onset's RTP
  packet leaving the peer to the onset appearing in the uplink ring (jitter buffer + tick phase +
  decode), and from a frame written into an idle downlink ring to its RTP packet arriving at the peer
  (tick phase + encode + send): p50/p99/max in ms over ``--latency-trials``.
* ``sessions_per_core_media``: 20 ms / (uplink + downlink at the default complexity), i.e. the media
  worker's share of one core, assuming a call is ~50 % model speech.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import secrets
import socket
import struct
import time
from typing import Any

import numpy as np

from appliance.config import MediaConfig
from shm.segment import ShardSegment, ring_bytes
from workers.media import opus
from workers.media.rtp import build_rtp
from workers.media.worker import DOWN_FRAME, MediaSession


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=3000, help="frames per measurement (default 3000)")
    parser.add_argument("--sessions", type=int, default=64, help="calls for the real-time scale run")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds of the scale run")
    parser.add_argument("--latency-trials", type=int, default=100, help="onsets per direction")
    parser.add_argument("--complexity", default="0,3,5,8,10", help="Opus complexities to measure")
    parser.add_argument("--smoke", action="store_true", help="short CI form")
    parser.add_argument("--scale-only", action="store_true",
                        help="only the real-time scale run (CPU, packets and downlink pacing at --sessions)")


def _speechlike(seconds: float, rate: int) -> np.ndarray:
    """A voiced, modulated harmonic signal (closer to speech for the codec than a pure tone)."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    sig = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 2.5 * t))
    rng = np.random.default_rng(1)
    x = sig * env * 0.25 + rng.normal(0, 0.01, len(t))
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def free_port_pair() -> int:
    """An even UDP port P on loopback with P and P+1 (RTCP) free."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1] & ~1
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _cpu() -> float:
    return time.thread_time()


def _session(seg: ShardSegment, index: int, sink: socket.socket, cfg: MediaConfig) -> MediaSession:
    slot = seg.slot(index)
    slot.activate(session_id=f"bench{index}", local_rtp_port=free_port_pair(), remote_rtp_ip="127.0.0.1",
                  remote_rtp_port=sink.getsockname()[1], payload_type=111, channels=2, dtmf_payload_type=101,
                  mode="direct")
    info = slot.snapshot()
    assert info is not None
    return MediaSession(slot, info, cfg, "127.0.0.1")


def _uplink(seg: ShardSegment, sink: socket.socket, frames: int) -> dict[str, float]:
    cfg = MediaConfig()
    sess = _session(seg, 0, sink, cfg)
    enc = opus.Encoder(48000, bitrate=32000, complexity=9, fec=True, expected_loss_percent=10,
                       application=opus.OPUS_APPLICATION_VOIP)
    pcm = _speechlike(frames / 50 + 1, 48000)
    rng = np.random.default_rng(2)
    pkts = []
    for i in range(frames):
        payload = enc.encode(pcm[i * 960 : (i + 1) * 960].tobytes())
        pkts.append(build_rtp(111, (1000 + i) & 0xFFFF, i * 960, 0x1234, payload))
    lost = rng.random(frames) < 0.10
    addr = ("127.0.0.1", sink.getsockname()[1])
    ring = seg.slot(0).uplink
    now = time.monotonic_ns()
    t0 = _cpu()
    for i, p in enumerate(pkts):
        if not lost[i]:
            sess.on_rtp(memoryview(p), addr, now + i * 20_000_000)
        sess.tick_uplink()
        if ring.available() > 64000:
            ring.skip(ring.available())
    spent = _cpu() - t0
    c = seg.slot(0).counters.snapshot()
    sess.close()
    return {"uplink_us_per_frame": round(spent / frames * 1e6, 1), "uplink_fec_recovered": c["fec_recovered"],
            "uplink_concealed": c["concealed"], "uplink_frames": c["frames_up"]}


def _downlink(seg: ShardSegment, sink: socket.socket, frames: int, complexity: int) -> tuple[float, float]:
    cfg = MediaConfig(opus_complexity=complexity)
    sess = _session(seg, 1 + complexity % 3, sink, cfg)
    speech = _speechlike(frames / 50 + 1, 24000).tobytes()
    ring = sess.slot.downlink
    spent = 0.0
    done = 0
    chunk = 200
    while done < frames:
        n = min(chunk, frames - done)
        ring.write(speech[done * DOWN_FRAME : (done + n) * DOWN_FRAME])
        t0 = _cpu()
        for k in range(n):
            sess.tick_downlink(done + k)
        spent += _cpu() - t0
        done += n
        _drain(sink)
    t0 = _cpu()
    for k in range(frames):
        sess.tick_downlink(frames + k)
        if k % 200 == 0:
            _drain(sink)
    silent = _cpu() - t0
    _drain(sink)
    sess.close()
    sess.slot.begin_close()
    sess.slot.free()
    return spent / frames * 1e6, silent / frames * 1e6


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(2048)
        except BlockingIOError:
            return


def _binding(frames: int) -> dict[str, Any]:
    """Encode (24 kHz, complexity 5, 28 kbps, FEC) / decode (to 16 kHz) µs per frame by binding."""
    pcm24 = _speechlike(frames / 50 + 1, 24000)
    out: dict[str, Any] = {}
    libs = {"ctypes_bundled": opus.library_path(), "ctypes_system": "libopus.so.0"}
    for name, path in libs.items():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        opus._declare(lib)
        saved = opus._lib
        opus._lib = lib
        try:
            enc = opus.Encoder(24000, bitrate=28000, complexity=5, fec=True, expected_loss_percent=5)
            dec = opus.Decoder(16000)
            frames_b = [pcm24[i * 480 : (i + 1) * 480].tobytes() for i in range(frames)]
            t0 = _cpu()
            pkts = [enc.encode(f) for f in frames_b]
            te = _cpu() - t0
            t0 = _cpu()
            for p in pkts:
                dec.decode(p)
            td = _cpu() - t0
            out[name] = {"version": lib.opus_get_version_string().decode(),
                         "encode_us": round(te / frames * 1e6, 1),
                         "decode16k_us": round(td / frames * 1e6, 1)}
            enc.close()
            dec.close()
        finally:
            opus._lib = saved
    out["pyav"] = _pyav(pcm24, frames)
    return out


def _pyav(pcm24: np.ndarray, frames: int) -> dict[str, Any]:
    import av

    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate = 24000
    enc.format = "s16"
    enc.layout = "mono"
    enc.bit_rate = 28000
    enc.options = {"application": "voip", "compression_level": "5", "fec": "1", "packet_loss": "5",
                   "frame_duration": "20"}
    enc.open()
    dec = av.CodecContext.create("libopus", "r")
    dec.sample_rate = 48000
    dec.layout = "mono"
    dec.format = "s16"
    import fractions

    frames_av = []
    for i in range(frames):
        chunk = pcm24[i * 480 : (i + 1) * 480].reshape(1, -1)
        f = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        f.sample_rate = 24000
        f.pts = i * 480
        f.time_base = fractions.Fraction(1, 24000)
        frames_av.append(f)
    t0 = _cpu()
    pkts = []
    for f in frames_av:
        pkts += enc.encode(f)
    te = _cpu() - t0
    raw = [bytes(p) for p in pkts]
    t0 = _cpu()
    for r in raw:
        dec.decode(av.Packet(r))
    td = _cpu() - t0
    return {"encode_us": round(te / frames * 1e6, 1), "decode48k_us": round(td / max(1, len(raw)) * 1e6, 1),
            "note": "decoder output is 48 kHz only: +soxr 48->16 kHz per frame on top"}


def _resampler(frames: int) -> dict[str, Any]:
    import soxr

    out: dict[str, Any] = {}
    for fin, fout in ((8000, 16000), (24000, 8000)):
        n = fin // 50
        t = np.arange(n * frames) / fin
        x = (np.sin(2 * np.pi * 1000 * t) * 12000).astype(np.int16)
        for q in ("QQ", "LQ", "MQ", "HQ", "VHQ"):
            rs = soxr.ResampleStream(fin, fout, 1, dtype="int16", quality=q)
            chunks = []
            lag = 0.0
            produced = 0
            t0 = _cpu()
            for i in range(frames):
                y = rs.resample_chunk(x[i * n : (i + 1) * n])
                chunks.append(y)
                produced += len(y)
                lag = max(lag, ((i + 1) * fout // 50 - produced) / fout * 1000)
            spent = _cpu() - t0
            y = np.concatenate(chunks)[fout // 10 :].astype(np.float64)
            spec = np.abs(np.fft.rfft(y * np.hanning(len(y)))) ** 2
            k = round(1000 * len(y) / fout)
            sig = spec[max(0, k - 4) : k + 5].sum()
            sinad = 10 * np.log10(sig / max(spec.sum() - sig, 1e-12))
            out[f"{fin // 1000}k_to_{fout // 1000}k_{q}"] = {
                "us_per_frame": round(spent / frames * 1e6, 1), "max_lag_ms": round(lag, 1),
                "sinad_db": round(float(sinad), 1)}
    return out


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; not exported by Python's socket module
TIMESPEC = struct.Struct("@qq")


def _loadgen(n: int, packets: list[bytes], seconds: float, conn: Any) -> None:
    """Child process: one UDP socket per call, paced sends, counts received packets per 20 ms period."""
    import selectors as _sel

    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # kernel receive time: not this loop's lag
        socks.append(s)
    arrivals: list[tuple[int, int, int]] = []  # (call, RTP timestamp, kernel receive ns)
    sel = _sel.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, _sel.EVENT_READ, i)
    conn.send([s.getsockname()[1] for s in socks])
    ports: list[int] = conn.recv()
    t0 = time.monotonic()
    n_periods = int(seconds * 50)
    got = np.zeros((len(socks), n_periods + 50), np.int32)
    tick = 0
    seq = [random.getrandbits(16) for _ in socks]
    while tick < n_periods:
        deadline = t0 + tick * 0.02
        for i, s in enumerate(socks):
            payload = packets[tick % len(packets)]
            with contextlib.suppress(OSError):
                s.sendto(build_rtp(111, seq[i], tick * 960, 1000 + i, payload), ("127.0.0.1", ports[i]))
            seq[i] = (seq[i] + 1) & 0xFFFF
        tick += 1
        while True:
            wait = t0 + tick * 0.02 - time.monotonic()
            if wait <= 0:
                break
            for key, _ in sel.select(wait):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data, anc, _flags, _addr = sock.recvmsg(2048, 64)
                    except BlockingIOError:
                        break
                    period = int((time.monotonic() - t0) / 0.02)
                    got[key.data, min(period, got.shape[1] - 1)] += 1
                    kernel_ns = next((sec * 1_000_000_000 + nsec for lvl, typ, c in anc
                                      if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS
                                      for sec, nsec in [TIMESPEC.unpack_from(c)]), time.time_ns())
                    if len(data) >= 12:
                        arrivals.append((key.data, int.from_bytes(data[4:8], "big"), kernel_ns))
        del deadline
    conn.send((got[:, : n_periods].tolist(), arrivals))
    for s in socks:
        s.close()


def _scale(sessions: int, seconds: float) -> dict[str, Any]:
    import multiprocessing as mp
    import subprocess
    import sys

    from bench.procstat import cpu_seconds

    iid = "ms" + secrets.token_hex(4)
    up, down = ring_bytes(2000, 8000)
    seg = ShardSegment.create(f"/va-{iid}-s0", slots=sessions, uplink_bytes=up, downlink_bytes=down,
                              instance_id=iid)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    warm = 1.0
    enc = opus.Encoder(48000, bitrate=32000, complexity=9, fec=True, expected_loss_percent=5)
    pcm48 = _speechlike(2.0, 48000)
    packets = [enc.encode(pcm48[i * 960 : (i + 1) * 960].tobytes()) for i in range(100)]
    gen = ctx.Process(target=_loadgen, args=(sessions, packets, seconds + warm, child), daemon=True)
    gen.start()
    if not parent.poll(30):
        gen.kill()
        raise RuntimeError("load generator did not start")
    peers: list[int] = parent.recv()
    ports: list[int] = []
    while len(ports) < sessions:
        p = free_port_pair()
        if p not in ports and p + 1 not in peers and p not in peers:
            ports.append(p)
    for i in range(sessions):
        seg.slot(i).activate(session_id=f"scale{i}", local_rtp_port=ports[i], remote_rtp_ip="127.0.0.1",
                             remote_rtp_port=peers[i], payload_type=111, channels=2, dtmf_payload_type=101,
                             mode="direct")
    speech = _speechlike(2.0, 24000).tobytes()
    # no playback pauses: nothing here plays the AI worker's part of a hold, and the callers talk throughout
    env = {**os.environ, "VA_MEDIA_RTP_HOST": "127.0.0.1", "VA_LOG_LEVEL": "warning",
           "VA_MEDIA_PAUSE_ON_SPEECH_DBFS": "0.0"}
    cpus = sorted(os.sched_getaffinity(0))
    argv = [sys.executable, "-m", "appliance.cli", "media-worker", "--shard", "0", "--segment", seg.name,
            "--cpu", str(cpus[-1]), "--config", os.devnull]
    worker = subprocess.Popen(argv, env=env)
    try:
        time.sleep(0.5)
        parent.send(ports)
        t0 = time.monotonic()
        c0 = None
        k = 0
        while time.monotonic() - t0 < seconds + warm:
            if c0 is None and time.monotonic() - t0 >= warm:
                c0, w0 = cpu_seconds(worker.pid), time.monotonic()
            talking = (k // 100) % 2 == 0  # 2 s speaking, 2 s silent
            for i in range(sessions):
                slot = seg.slot(i)
                ring = slot.uplink
                ring.skip(ring.available())
                if talking:
                    off = (k % 100) * DOWN_FRAME
                    slot.downlink.write(speech[off : off + DOWN_FRAME])
            k += 1
            time.sleep(max(0.0, t0 + k * 0.02 - time.monotonic()))
        c1, w1 = cpu_seconds(worker.pid), time.monotonic()
        if not parent.poll(30):
            raise RuntimeError("load generator did not report")
        got_list, arrivals = parent.recv()
        got = np.array(got_list)
        gen.join(10)
    finally:
        worker.terminate()
        worker.wait(10)
        if gen.is_alive():
            gen.kill()
        seg.close()
        seg.unlink()
    if c0 is None or c1 is None:
        raise RuntimeError("media worker exited during the scale run")
    cpu = c1 - c0
    wall = w1 - w0
    steady = got[:, int(warm * 50) + 5 : -5]
    per_second = float(steady.sum() / steady.shape[0] / (steady.shape[1] / 50))
    return {"sessions": sessions, "seconds": round(wall, 1), "worker_cpu_percent": round(100 * cpu / wall, 1),
            "worker_cpu_ms_per_call_second": round(cpu * 1000 / (wall * sessions), 2),
            "packets_received_per_call_second": round(per_second, 1),
            **_pacing(arrivals, sessions, int(warm * 1e9) + 100_000_000)}


def _pacing(arrivals: list[tuple[int, int, int]], sessions: int, skip_ns: int) -> dict[str, Any]:
    """Downlink pacing at the receiver (kernel timestamps), after the first ``skip_ns``.

    ``pacing``: each packet's arrival minus the arrival its RTP timestamp promises, relative to the
    earliest of its stream (bench.loadgen's definition, no talkspurt resets here). ``tick_spread``: per
    worker tick, the last call's packet minus the first one's (ticks told apart by arrival phase): with
    serial encode-and-send it grows with the number of calls; with prepare-then-send it should not.
    """
    if not arrivals:
        return {}
    a = np.array(arrivals, dtype=np.int64)
    a = a[a[:, 2] >= a[:, 2].min() + skip_ns]
    if len(a) < 2:
        return {}
    offsets = []
    for i in range(sessions):
        s = a[a[:, 0] == i]
        if len(s) < 2:
            continue
        ts = (s[:, 1] - s[0, 1]) % (1 << 32)
        off = s[:, 2] / 1e6 - ts / 48.0
        offsets.append(off - off.min())
    pacing = np.concatenate(offsets) if offsets else np.zeros(1)
    t = a[:, 2]
    ang = (t % 20_000_000) / 20_000_000 * 2 * np.pi
    phase = (np.angle(np.mean(np.exp(1j * ang))) / (2 * np.pi) % 1.0) * 20_000_000
    tick = np.round((t - phase) / 20_000_000).astype(np.int64)
    order = np.argsort(tick, kind="stable")
    tick, t = tick[order], t[order]
    starts = np.flatnonzero(np.r_[True, tick[1:] != tick[:-1]])
    spread = (np.maximum.reduceat(t, starts) - np.minimum.reduceat(t, starts)) / 1e6
    return {"pacing_p50_ms": round(float(np.percentile(pacing, 50)), 3),
            "pacing_p99_ms": round(float(np.percentile(pacing, 99)), 3),
            "pacing_max_ms": round(float(pacing.max()), 3),
            "tick_spread_p50_ms": round(float(np.percentile(spread, 50)), 3),
            "tick_spread_p99_ms": round(float(np.percentile(spread, 99)), 3)}


def _latency(trials: int) -> dict[str, Any]:
    import threading

    from workers.media.worker import MediaWorker

    iid = "ml" + secrets.token_hex(4)
    up, down = ring_bytes(2000, 8000)
    seg = ShardSegment.create(f"/va-{iid}-s0", slots=1, uplink_bytes=up, downlink_bytes=down, instance_id=iid)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    port = free_port_pair()
    slot = seg.slot(0)
    slot.activate(session_id="lat", local_rtp_port=port, remote_rtp_ip="127.0.0.1",
                  remote_rtp_port=peer.getsockname()[1], payload_type=111, channels=1, dtmf_payload_type=-1,
                  mode="direct")
    cfg = MediaConfig(pause_on_speech_dbfs=0.0)  # no AI worker here to settle playback holds
    worker = MediaWorker(seg, cfg, host="127.0.0.1")
    stop = threading.Event()
    th = threading.Thread(target=worker.run, args=(stop.is_set,), daemon=True)
    th.start()
    enc = opus.Encoder(48000, bitrate=32000, complexity=5)
    loud = (np.sin(2 * np.pi * 440 * np.arange(960) / 48000) * 16000).astype(np.int16).tobytes()
    quiet = bytes(1920)
    up_ms: list[float] = []
    down_ms: list[float] = []
    seq = 0
    rng = random.Random(5)
    silence = None
    try:
        time.sleep(0.2)
        t_next = time.monotonic()
        for _trial in range(trials):
            # uplink: 10 quiet packets, then loud ones; time until loud samples reach the ring
            onset_sent = 0.0
            for k in range(16):
                pcm = loud if k >= 10 else quiet
                pkt = build_rtp(111, seq & 0xFFFF, seq * 960, 42, enc.encode(pcm))
                seq += 1
                t_next += 0.02
                while time.monotonic() < t_next:
                    ring = slot.uplink
                    while ring.available() >= 640:
                        f = np.frombuffer(ring.read(640) or b"", np.int16)
                        if onset_sent and np.abs(f).max() > 4000 and len(up_ms) < _trial + 1:
                            up_ms.append((time.monotonic() - onset_sent) * 1000)
                    time.sleep(0.0005)
                peer.sendto(pkt, ("127.0.0.1", port))
                if k == 10:
                    onset_sent = time.monotonic()
            # downlink: wait a random phase, write one frame, time its packet's arrival
            while True:
                try:
                    data = peer.recv(2048)
                    silence = silence or data[12:]
                except BlockingIOError:
                    break
            time.sleep(rng.uniform(0, 0.02))
            t_write = time.monotonic()
            slot.downlink.write(bytes(np.frombuffer(loud, np.int16)[::2].tobytes()))
            deadline = t_write + 0.2
            while time.monotonic() < deadline:
                try:
                    data = peer.recv(2048)
                except BlockingIOError:
                    time.sleep(0.0002)
                    continue
                if len(data) - 12 > 20:  # a speech packet, not the few-byte silence packet
                    down_ms.append((time.monotonic() - t_write) * 1000)
                    break
            t_next = time.monotonic()
    finally:
        stop.set()
        th.join(5)
        worker.close()
        peer.close()
        seg.close()
        seg.unlink()

    def stats(xs: list[float]) -> dict[str, float]:
        a = np.array(xs) if xs else np.array([float("nan")])
        return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1),
                "max": round(float(a.max()), 1), "n": len(xs)}

    return {"uplink_packet_to_ring_ms": stats(up_ms), "downlink_ring_to_packet_ms": stats(down_ms),
            "jitter_target_ms": cfg.jitter_target_ms}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.scale_only:
        return {"scale": _scale(args.sessions, args.seconds), "loadavg_1m": os.getloadavg()[0]}
    frames = 300 if args.smoke else args.frames
    complexities = [5] if args.smoke else [int(c) for c in str(args.complexity).split(",")]
    iid = "mb" + secrets.token_hex(4)
    up, down = ring_bytes(2000, 8000)
    seg = ShardSegment.create(f"/va-{iid}-s0", slots=4, uplink_bytes=up, downlink_bytes=down, instance_id=iid)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    try:
        result: dict[str, Any] = {"libopus": opus.version(), "frames": frames}
        result.update(_uplink(seg, sink, frames))
        speech: dict[str, float] = {}
        silence: dict[str, float] = {}
        for c in complexities:
            s, q = _downlink(seg, sink, frames, c)
            speech[str(c)] = round(s, 1)
            silence[str(c)] = round(q, 1)
        result["downlink_speech_us_per_frame"] = speech
        result["downlink_silence_us_per_frame"] = silence
        default_c = str(MediaConfig().opus_complexity)
        if default_c in speech:
            per_call_us = result["uplink_us_per_frame"] + 0.5 * (speech[default_c] + silence[default_c])
            result["media_us_per_call_frame"] = round(per_call_us, 1)
            result["media_cpu_ms_per_call_second"] = round(per_call_us * 50 / 1000, 2)
            result["sessions_per_core_media"] = int(20_000 / per_call_us)
        result["binding"] = _binding(frames)
        result["resampler"] = _resampler(min(frames, 500))
        result["latency"] = _latency(10 if args.smoke else args.latency_trials)
        result["scale"] = _scale(8 if args.smoke else args.sessions, 2.0 if args.smoke else args.seconds)
        result["loadavg_1m"] = os.getloadavg()[0]
        return result
    finally:
        sink.close()
        seg.close()
        seg.unlink()
