"""Real Janus 1.1.2 in its own network namespace, for tests of every area.

Why a namespace: Janus's ICE never gathers on loopback interfaces (FACTS), and tests must not touch
the machine's real interfaces. So each Janus gets a private netns ``va-j<tag>`` with a veth pair:

    root namespace                         netns (Janus)
    <host_ip> 10.213.x.y+1/30  ── veth ──  <ns_ip> 10.213.x.y+2/30  and  127.0.0.2/32

How other processes reach it (the decision): the veth pair is *routed*, so the test process and
anything it starts in the root namespace talk to Janus at ``ns_ip`` without entering the netns:
the HTTP API (``inst.url``), the admin API (``inst.admin_url``), and plain RTP (NoSIP/AudioBridge bind
their plain-RTP side to ``ns_ip``; a media worker in the root namespace binds ``host_ip``). ICE is
gathered on ``ns_ip`` and on ``127.0.0.2`` (``ice_enforce_list``): an aiortc caller in the root
namespace reaches Janus over ``ns_ip``; a caller started *inside* the netns (chromium with
``--allow-loopback-in-peer-connection``, via :meth:`JanusInstance.popen`) can use 127.0.0.2 as in
FACTS. Because every Janus has its own namespace, its ports inside (8088, 7088, RTP ranges) never
collide with other tests or engineers.

Use::

    with janus_in_netns() as j:            # sync context manager; fine inside async tests too
        async with JanusClient(j.url, api_secret=j.api_secret) as c:   # appliance.janus
            h = await (await c.create_session()).attach(NOSIP)
            janus_side = await h.nosip_generate(caller_offer_sdp)

:class:`WebRtcCaller` is a real aiortc caller that sends given PCM (int16 48 kHz), records what it hears
(``received()``) and can send RFC 4733 DTMF (``dtmf=True`` + ``send_dtmf("5#")``; aiortc has no DTMF
sender, so telephone-event packets replace audio packets in the same SRTP stream, as browsers do).
:meth:`JanusInstance.call` runs a function inside the netns (e.g. to create a socket there).

Teardown kills Janus by PID, checks it is gone, and deletes the namespace (which removes the veth).
Needs root (CI runs as root). :func:`janus_available` says whether a test should skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from appliance import janus_conf
from appliance.procs import pid_gone
from tests.harness.procs import stop

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_LOCK_FILE = "/tmp/va-test-netns.lock"
_SUBNET_PREFIX = "10.213."
_counter = itertools.count()


def janus_available() -> bool:
    """True when Janus and the namespace tools are usable here (root, janus, ip)."""
    return os.geteuid() == 0 and shutil.which("janus") is not None and shutil.which("ip") is not None


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _used_subnets() -> set[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = parts[parts.index("inet") + 1].split("/")[0]
            if addr.startswith(_SUBNET_PREFIX):
                a, b, c, d = (int(x) for x in addr.split("."))
                used.add(f"{a}.{b}.{c}.{d & ~3}")
    return used


@dataclass
class NetnsPair:
    """A network namespace joined to the root namespace by a routed veth pair."""

    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    loopback_ip: str = "127.0.0.2"


@contextlib.contextmanager
def netns_pair(prefix: str = "va-j") -> Iterator[NetnsPair]:
    """Create a netns with a veth pair (/30 routed subnet, plus 127.0.0.2/32 inside); delete it after."""
    tag = f"{os.getpid() % 10000:04d}{next(_counter) % 100:02d}{secrets.token_hex(1)}"
    name = f"{prefix}{tag}"
    host_if, ns_if = f"va{tag}h"[:15], f"va{tag}n"[:15]
    with open(_LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            used = _used_subnets()
            base = None
            for _ in range(2000):
                c, d = secrets.randbelow(256), secrets.randbelow(64) * 4
                if f"{_SUBNET_PREFIX}{c}.{d}" not in used:
                    base = (c, d)
                    break
            if base is None:
                raise RuntimeError("no free 10.213.x.y/30 test subnet")
            host_ip = f"{_SUBNET_PREFIX}{base[0]}.{base[1] + 1}"
            ns_ip = f"{_SUBNET_PREFIX}{base[0]}.{base[1] + 2}"
            _ip("netns", "add", name)
            try:
                _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
                _ip("link", "set", ns_if, "netns", name)
                _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
                _ip("link", "set", host_if, "up")
                _ip("link", "set", "lo", "up", netns=name)
                _ip("addr", "add", f"{ns_ip}/30", "dev", ns_if, netns=name)
                _ip("addr", "add", "127.0.0.2/32", "dev", ns_if, netns=name)
                _ip("link", "set", ns_if, "up", netns=name)
            except Exception:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                subprocess.run(["ip", "link", "del", host_if], capture_output=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    pair = NetnsPair(name=name, host_if=host_if, ns_if=ns_if, host_ip=host_ip, ns_ip=ns_ip)
    try:
        yield pair
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def run_in_netns(netns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a fresh thread that entered ``netns`` (setns affects only that thread).

    Sockets keep the namespace they were created in, so a socket made here can be used from any thread.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised in the caller
            error.append(exc)

    t = threading.Thread(target=target, name=f"netns-{netns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


@dataclass
class JanusInstance:
    """A running Janus: where to reach it, its secrets, and helpers to act inside its namespace."""

    netns: str
    host_ip: str  # root-namespace side of the veth (bind media-worker RTP sockets here)
    ns_ip: str  # Janus's address: HTTP/admin API, plain RTP, ICE
    loopback_ip: str  # 127.0.0.2 inside the netns (ICE too)
    url: str
    admin_url: str
    api_secret: str
    admin_secret: str
    audiobridge_admin_key: str
    pid: int
    conf_dir: Path
    log_path: Path
    settings: janus_conf.JanusSettings
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    _argv: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[Any] | None = None

    def kill(self) -> None:
        """SIGKILL Janus (a crash: every session and WebRTC leg is gone)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)

    def start(self, ready_timeout: float = 10.0) -> None:
        """Start Janus again in the same namespace with the same configuration (after ``kill``)."""
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self._proc.pid
        _wait_ready(self, self._proc, ready_timeout)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the namespace and wait for it (``subprocess.run`` keywords)."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], **kwargs)

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace; it is killed at teardown if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` in a thread inside the namespace (e.g. to create a socket there)."""
        return run_in_netns(self.netns, fn, *args, **kwargs)

    def log_text(self) -> str:
        """Janus's log so far (attach it to assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        """True while the Janus process runs (not a zombie)."""
        return _alive(self.pid)


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    return not pid_gone(pid)





@contextlib.contextmanager
def janus_in_netns(
    *,
    api_secret: str | None = None,
    admin_secret: str | None = None,
    audiobridge_admin_key: str | None = None,
    debug_level: int = 4,
    rooms: dict[str, dict[str, Any]] | None = None,
    ready_timeout: float = 10.0,
    events_port: int | None = None,
    **settings: Any,
) -> Iterator[JanusInstance]:
    """Start a real Janus in a fresh namespace; yield a :class:`JanusInstance`; tear it all down.

    Extra keyword arguments override :class:`appliance.janus_conf.JanusSettings` fields. With
    ``events_port``, Janus's sample event handler posts media statistics to
    ``http://<host_ip>:<events_port>/janus-events`` (a supervisor's receiver in the root namespace).
    """
    api_secret = secrets.token_hex(8) if api_secret is None else api_secret
    admin_secret = secrets.token_hex(8) if admin_secret is None else admin_secret
    ab_key = secrets.token_hex(8) if audiobridge_admin_key is None else audiobridge_admin_key
    tmp = Path(tempfile.mkdtemp(prefix="va-janus-"))
    with netns_pair() as pair:
        cfg = janus_conf.JanusSettings(
            **{
                "http_ip": pair.ns_ip,
                "admin_ip": pair.ns_ip,
                "api_secret": api_secret,
                "admin_secret": admin_secret,
                "public_ip": pair.ns_ip,
                "ice_enforce_list": f"{pair.ns_ip},{pair.loopback_ip}",
                "plain_rtp_ip": pair.ns_ip,
                "audiobridge_admin_key": ab_key,
                "debug_level": debug_level,
                "extra_rooms": rooms or {},
                **({"events_backend": f"http://{pair.host_ip}:{events_port}/janus-events"}
                   if events_port else {}),
                **settings,
            }
        )
        conf_dir = tmp / "conf"
        janus_conf.write(cfg, conf_dir)
        log_path = tmp / "janus.log"
        argv = ["ip", "netns", "exec", pair.name, *janus_conf.command(conf_dir, str(log_path)), "-N"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        inst = JanusInstance(
            netns=pair.name,
            host_ip=pair.host_ip,
            ns_ip=pair.ns_ip,
            loopback_ip=pair.loopback_ip,
            url=f"http://{pair.ns_ip}:{cfg.http_port}/janus",
            admin_url=f"http://{pair.ns_ip}:{cfg.admin_port}/admin",
            api_secret=api_secret,
            admin_secret=admin_secret,
            audiobridge_admin_key=ab_key,
            pid=proc.pid,
            conf_dir=conf_dir,
            log_path=log_path,
            settings=cfg,
            _argv=argv,
            _proc=proc,
        )
        try:
            _wait_ready(inst, proc, ready_timeout)
            yield inst
        finally:
            for p in inst._procs:
                stop(p)
            for p in {id(proc): proc, id(inst._proc): inst._proc}.values():
                if p is not None:
                    stop(p)
                    if _alive(p.pid):
                        raise RuntimeError(f"janus pid {p.pid} survived teardown")
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_ready(inst: JanusInstance, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"janus exited with {proc.returncode}:\n{inst.log_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{inst.url}/info", timeout=1) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"janus not ready after {timeout}s ({last}):\n{inst.log_text()[-4000:]}")


# ---- a real WebRTC caller (aiortc) -----------------------------------------
class WebRtcCaller:
    """A real WebRTC caller (aiortc): sends ``audio`` (int16 mono 48 kHz, then silence) and records
    what it receives (``received()``: int16 mono 48 kHz). ``offer()``/``accept(answer)`` do the JSEP."""

    def __init__(self, audio: Any | None = None, *, loop_audio: bool = False, dtmf: bool = False) -> None:
        import numpy as np
        from aiortc import RTCPeerConnection

        self._np = np
        self._te_codec: Any = None
        if dtmf:
            self._te_codec = _add_telephone_event_codec()
        self.pc = RTCPeerConnection()
        self.track = _PcmTrack(audio, loop_audio)
        self.sender = self.pc.addTrack(self.track)
        self._chunks: list[Any] = []
        self._first_rx: float | None = None
        self._rx_task: asyncio.Task[None] | None = None
        self._dtmf_queue: list[tuple[int, int]] = []  # (event, packets) still to send
        self._dtmf_state: dict[str, int] = {}

        @self.pc.on("track")
        def _on_track(track: Any) -> None:
            self._rx_task = asyncio.ensure_future(self._receive(track))

    async def _receive(self, track: Any) -> None:
        np = self._np
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                arr = frame.to_ndarray()
                channels = len(frame.layout.channels)
                mono = arr.reshape(-1, channels)[:, 0] if channels > 1 else arr.reshape(-1)
                if frame.sample_rate != 48000:
                    import soxr

                    mono = soxr.resample(mono, frame.sample_rate, 48000)
                if self._first_rx is None:
                    self._first_rx = time.monotonic()
                self._chunks.append(np.asarray(mono, dtype=np.int16))

    async def offer(self) -> dict[str, str]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return {"type": "offer", "sdp": self.pc.localDescription.sdp}

    async def accept(self, answer: dict[str, Any]) -> None:
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        if self._te_codec is not None:
            self._hook_dtmf(answer["sdp"])

    # -- RFC 4733 DTMF (aiortc has no RTCDTMFSender) -------------------------------------------------
    def send_dtmf(self, digits: str, duration_ms: int = 100) -> None:
        """Queue DTMF digits; each replaces ``duration_ms`` of outgoing audio packets with RFC 4733
        telephone-event packets in the same RTP stream (same SSRC and sequence space, as browsers do),
        followed by three end packets."""
        for d in digits:
            self._dtmf_queue.append(("0123456789*#ABCD".index(d.upper()), max(1, duration_ms // 20)))

    def _hook_dtmf(self, answer_sdp: str) -> None:
        import re

        m = re.search(r"a=rtpmap:(\d+) telephone-event/(\d+)", answer_sdp)
        if not m:
            raise RuntimeError("the answer did not accept telephone-event")
        te_pt, te_rate = int(m.group(1)), int(m.group(2))
        transport = self.sender.transport
        original = transport._send_rtp

        async def send_rtp(data: bytes) -> None:
            if self._dtmf_queue and len(data) >= 12 and data[1] & 0x7F != te_pt and not 192 <= data[1] <= 223:
                data = self._dtmf_packet(data, te_pt, te_rate)
            await original(data)

        transport._send_rtp = send_rtp

    def _dtmf_packet(self, data: bytes, te_pt: int, te_rate: int) -> bytes:
        import struct

        event, packets = self._dtmf_queue[0]
        st = self._dtmf_state
        if not st:
            st.update(sent=0, ts=struct.unpack_from("!I", data, 4)[0], end_sent=0)
        st["sent"] += 1
        end = st["sent"] >= packets
        duration = min(min(st["sent"], packets) * te_rate // 50, 0xFFFF)
        if end:
            st["end_sent"] += 1
        cc = data[0] & 0x0F
        hlen = 12 + 4 * cc
        if data[0] & 0x10:
            (ext_words,) = struct.unpack_from("!H", data, hlen + 2)
            hlen += 4 + 4 * ext_words
        marker = 0x80 if st["sent"] == 1 else 0
        header = bytearray(data[:hlen])
        header[0] &= ~0x20  # no padding
        header[1] = marker | te_pt
        struct.pack_into("!I", header, 4, st["ts"])
        payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)
        if end and st["end_sent"] >= 3:
            self._dtmf_queue.pop(0)
            st.clear()
        return bytes(header) + payload

    def received(self) -> Any:
        np = self._np
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def clear_received(self) -> None:
        self._chunks.clear()

    def play(self, audio: Any) -> None:
        """Start sending ``audio`` now (after what is queued)."""
        self.track.queue(audio)

    @property
    def sent_samples(self) -> int:
        return self.track.sent

    async def close(self) -> None:
        if self._rx_task:
            self._rx_task.cancel()
        await self.pc.close()
        if self._te_codec is not None:
            from aiortc.codecs import CODECS

            with contextlib.suppress(ValueError):
                CODECS["audio"].remove(self._te_codec)
            self._te_codec = None


def _add_telephone_event_codec() -> Any:
    """Let aiortc offer telephone-event/48000 (removed again by :meth:`WebRtcCaller.close`)."""
    from aiortc.codecs import CODECS
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    codec = RTCRtpCodecParameters(mimeType="audio/telephone-event", clockRate=48000, channels=1,
                                  payloadType=101)
    CODECS["audio"].append(codec)
    return codec


def _pcm_track_class() -> type:
    from aiortc.mediastreams import MediaStreamTrack

    class PcmTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self, audio: Any | None, loop_audio: bool) -> None:
            import numpy as np

            super().__init__()
            self._np = np
            self._queue: list[Any] = [] if audio is None else [np.asarray(audio, np.int16)]
            self._loop = loop_audio
            self._pos = 0
            self._n = 0
            self._t0: float | None = None
            self.sent = 0

        def queue(self, audio: Any) -> None:
            self._queue.append(self._np.asarray(audio, self._np.int16))

        async def recv(self) -> Any:
            import fractions

            import av

            np = self._np
            if self._t0 is None:
                self._t0 = time.monotonic()
            wait = self._t0 + self._n * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            out = np.zeros(960, np.int16)
            filled = 0
            while filled < 960 and self._queue:
                cur = self._queue[0]
                take = min(960 - filled, len(cur) - self._pos)
                out[filled : filled + take] = cur[self._pos : self._pos + take]
                filled += take
                self._pos += take
                self.sent += take
                if self._pos >= len(cur):
                    self._pos = 0
                    if not self._loop:
                        self._queue.pop(0)
            frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = 48000
            frame.pts = self._n * 960
            frame.time_base = fractions.Fraction(1, 48000)
            self._n += 1
            return frame

    return PcmTrack


def _PcmTrack(audio: Any | None, loop_audio: bool) -> Any:
    global _PCM_TRACK
    if _PCM_TRACK is None:
        _PCM_TRACK = _pcm_track_class()
    return _PCM_TRACK(audio, loop_audio)


_PCM_TRACK: type | None = None
