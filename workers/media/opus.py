"""Thin ctypes binding to libopus: exactly the calls the media worker needs, nothing more.

Why not a library (measured, see docs/opus.md):
- PyAV's decoder always outputs 48 kHz, so every uplink frame would need a 48→16 kHz resampler
  (soxr HQ is bursty, FACTS), and PyAV exposes neither in-band FEC decoding of the *previous* packet
  nor PLC with a NULL packet; its encoder path adds ~40 µs of frame/packet object overhead per frame.
- opuslib is unmaintained and its FEC/DTX setters are broken (FACTS).
- libopus itself decodes straight to 16 kHz mono (downmixing a stereo browser stream) and encodes
  straight from 24 kHz, so the worker needs no resampler in either direction.

Which libopus: the copy bundled in the PyAV wheel (libopus 1.6.x, ~35 % faster encode than Debian's
1.3.1) when present, else the system ``libopus.so.0``; ``$VA_OPUS_LIBRARY`` names a file explicitly.
Calls cost ~1 µs of ctypes overhead; buffers are preallocated per codec so the hot path allocates
only the returned ``bytes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from pathlib import Path

OPUS_OK = 0
OPUS_APPLICATION_VOIP = 2048
OPUS_APPLICATION_AUDIO = 2049
OPUS_SIGNAL_VOICE = 3001
OPUS_SET_BITRATE = 4002
OPUS_SET_MAX_BANDWIDTH = 4004
OPUS_SET_VBR = 4006
OPUS_SET_COMPLEXITY = 4010
OPUS_SET_INBAND_FEC = 4012
OPUS_SET_PACKET_LOSS_PERC = 4014
OPUS_SET_DTX = 4016
OPUS_SET_SIGNAL = 4024
OPUS_GET_LOOKAHEAD = 4027
OPUS_RESET_STATE = 4028
OPUS_BANDWIDTH_WIDEBAND = 1103
OPUS_BANDWIDTH_SUPERWIDEBAND = 1104
OPUS_BANDWIDTH_FULLBAND = 1105

MAX_PACKET = 1500
MAX_FRAME_MS = 120


class OpusError(RuntimeError):
    """libopus returned an error code (corrupt packet, bad argument)."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"{where}: {_strerror(code)} ({code})")
        self.code = code


def _candidates() -> list[str]:
    env = os.environ.get("VA_OPUS_LIBRARY")
    if env:
        return [env]
    out: list[str] = []
    try:
        import av

        libs = Path(av.__file__).resolve().parent.parent / "av.libs"
        out += sorted(glob.glob(str(libs / "libopus*.so*")))
    except ImportError:
        pass
    system = ctypes.util.find_library("opus")
    if system:
        out.append(system)
    out.append("libopus.so.0")
    return out


def _load() -> ctypes.CDLL:
    errors = []
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        _declare(lib)
        lib._va_path = name  # type: ignore[attr-defined]
        return lib
    raise OSError("libopus not found (apt-get install libopus0): " + "; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    i_p = ctypes.POINTER(ctypes.c_int)
    lib.opus_get_version_string.restype = c
    lib.opus_strerror.restype = c
    lib.opus_strerror.argtypes = [i]
    lib.opus_encoder_create.restype = p
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, i, i, i_p]
    lib.opus_encoder_destroy.argtypes = [p]
    lib.opus_encode.restype = ctypes.c_int32
    lib.opus_encode.argtypes = [p, c, i, ctypes.c_void_p, ctypes.c_int32]
    lib.opus_decoder_create.restype = p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, i, i_p]
    lib.opus_decoder_destroy.argtypes = [p]
    lib.opus_decode.restype = i
    lib.opus_decode.argtypes = [p, c, ctypes.c_int32, ctypes.c_void_p, i, i]
    lib.opus_packet_get_nb_samples.restype = i
    lib.opus_packet_get_nb_samples.argtypes = [c, ctypes.c_int32, ctypes.c_int32]
    lib.opus_packet_get_nb_channels.restype = i
    lib.opus_packet_get_nb_channels.argtypes = [c]
    if hasattr(lib, "opus_packet_has_lbrr"):  # libopus >= 1.5
        lib.opus_packet_has_lbrr.restype = i
        lib.opus_packet_has_lbrr.argtypes = [c, ctypes.c_int32]
    # opus_*_ctl are variadic; every request we use takes one int (or int*), passed as c_int/pointer.
    lib.opus_encoder_ctl.restype = i
    lib.opus_decoder_ctl.restype = i


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded libopus (loaded on first use)."""
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def version() -> str:
    """libopus version string, e.g. ``libopus 1.6.1``."""
    return lib().opus_get_version_string().decode()


def library_path() -> str:
    return str(lib()._va_path)


def _strerror(code: int) -> str:
    try:
        return lib().opus_strerror(code).decode()
    except Exception:
        return "unknown error"


def packet_samples(packet: bytes, rate: int) -> int:
    """Samples per channel in ``packet`` at ``rate``; raises :class:`OpusError` if the TOC is invalid."""
    n = lib().opus_packet_get_nb_samples(packet, len(packet), rate)
    if n < 0:
        raise OpusError(n, "opus_packet_get_nb_samples")
    return n


def packet_has_fec(packet: bytes) -> bool:
    """True if ``packet`` carries in-band FEC (LBRR) data for the frame before it.

    Needs libopus >= 1.5; older versions report True (``decode_fec`` then degrades to concealment).
    """
    fn = getattr(lib(), "opus_packet_has_lbrr", None)
    if fn is None:
        return True
    return fn(packet, len(packet)) > 0


class Encoder:
    """A mono Opus encoder fed with 16-bit PCM at ``rate`` (8/12/16/24/48 kHz; 24 kHz downlink)."""

    def __init__(
        self,
        rate: int = 24000,
        *,
        bitrate: int = 28000,
        complexity: int = 5,
        fec: bool = True,
        expected_loss_percent: int = 5,
        dtx: bool = False,
        application: int = OPUS_APPLICATION_VOIP,
    ) -> None:
        self._lib = lib()
        err = ctypes.c_int(0)
        self.rate = rate
        # Keep the state as c_void_p: the variadic *_ctl calls have no argtypes and would truncate an int.
        self._st = ctypes.c_void_p(self._lib.opus_encoder_create(rate, 1, application, ctypes.byref(err)))
        if err.value != OPUS_OK or not self._st.value:
            raise OpusError(err.value, "opus_encoder_create")
        self._out = ctypes.create_string_buffer(MAX_PACKET)
        self.ctl(OPUS_SET_BITRATE, bitrate)
        self.ctl(OPUS_SET_COMPLEXITY, complexity)
        self.ctl(OPUS_SET_INBAND_FEC, int(fec))
        # In-band FEC only acts when the expected loss is > 0 (FACTS).
        self.ctl(OPUS_SET_PACKET_LOSS_PERC, expected_loss_percent)
        self.ctl(OPUS_SET_DTX, int(dtx))
        self.ctl(OPUS_SET_SIGNAL, OPUS_SIGNAL_VOICE)
        self.ctl(OPUS_SET_VBR, 1)

    def ctl(self, request: int, value: int) -> None:
        rc = self._lib.opus_encoder_ctl(self._st, ctypes.c_int(request), ctypes.c_int(value))
        if rc != OPUS_OK:
            raise OpusError(rc, f"opus_encoder_ctl({request})")

    def lookahead(self) -> int:
        v = ctypes.c_int(0)
        self._lib.opus_encoder_ctl(self._st, ctypes.c_int(OPUS_GET_LOOKAHEAD), ctypes.byref(v))
        return v.value

    def encode(self, pcm: bytes) -> bytes:
        """Encode one frame (2.5-60 ms of int16 mono samples) into one Opus packet."""
        n = len(pcm) // 2
        size = self._lib.opus_encode(self._st, pcm, n, self._out, MAX_PACKET)
        if size < 0:
            raise OpusError(size, "opus_encode")
        return self._out.raw[:size]

    def reset(self) -> None:
        self._lib.opus_encoder_ctl(self._st, ctypes.c_int(OPUS_RESET_STATE))

    def close(self) -> None:
        if getattr(self, "_st", None) and self._st.value:
            self._lib.opus_encoder_destroy(self._st)
            self._st = ctypes.c_void_p(None)

    def __del__(self) -> None:
        self.close()


class Decoder:
    """A mono Opus decoder producing 16-bit PCM at ``rate`` (stereo streams are downmixed by libopus)."""

    def __init__(self, rate: int = 16000) -> None:
        self._lib = lib()
        err = ctypes.c_int(0)
        self.rate = rate
        self._st = ctypes.c_void_p(self._lib.opus_decoder_create(rate, 1, ctypes.byref(err)))
        if err.value != OPUS_OK or not self._st.value:
            raise OpusError(err.value, "opus_decoder_create")
        self._max = rate * MAX_FRAME_MS // 1000
        self._pcm = ctypes.create_string_buffer(self._max * 2)
        self.last_samples = rate // 50  # duration used for PLC before any packet was decoded

    def decode(self, packet: bytes) -> bytes:
        """Decode one packet; raises :class:`OpusError` for a corrupt packet."""
        n = self._lib.opus_decode(self._st, packet, len(packet), self._pcm, self._max, 0)
        if n < 0:
            raise OpusError(n, "opus_decode")
        self.last_samples = n
        return self._pcm.raw[: n * 2]

    def decode_fec(self, next_packet: bytes, samples: int | None = None) -> bytes:
        """Recover a lost frame from the in-band FEC data of the packet that followed it.

        Without FEC data in ``next_packet`` libopus falls back to concealment, so this never fails
        for a valid packet.
        """
        n = samples or self.last_samples
        n = self._lib.opus_decode(self._st, next_packet, len(next_packet), self._pcm, n, 1)
        if n < 0:
            raise OpusError(n, "opus_decode(fec)")
        return self._pcm.raw[: n * 2]

    def conceal(self, samples: int | None = None) -> bytes:
        """Packet-loss concealment for one lost frame (NULL packet)."""
        n = samples or self.last_samples
        n = self._lib.opus_decode(self._st, None, 0, self._pcm, n, 0)
        if n < 0:
            raise OpusError(n, "opus_decode(plc)")
        return self._pcm.raw[: n * 2]

    def reset(self) -> None:
        self._lib.opus_decoder_ctl(self._st, ctypes.c_int(OPUS_RESET_STATE))

    def close(self) -> None:
        if getattr(self, "_st", None) and self._st.value:
            self._lib.opus_decoder_destroy(self._st)
            self._st = ctypes.c_void_p(None)

    def __del__(self) -> None:
        self.close()
