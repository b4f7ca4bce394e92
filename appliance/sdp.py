"""Validation of the caller's WebRTC SDP offer before anything reaches Janus.

Janus parses SDP in C; the public API must not hand it arbitrary bytes. This module is a strict,
allow-list check of the offer's *shape* (RFC 8866 line grammar, WebRTC essentials), not a full SDP
model: a parser library (aiortc's, sdp-transform) accepts more than we want and would add a
dependency for a job of ~100 lines. Each failure raises :class:`SdpError` with a reason the caller sees
in the 400 response.

Checks: size and line limits; printable ASCII/UTF-8 only, lines ``<letter>=<value>``; ``v=0`` first then
``o=``, ``s=``, ``t=``; at most a few m-lines; at least one ``m=audio`` on ``UDP/TLS/RTP/SAVPF`` whose
format list includes Opus (``a=rtpmap:PT opus/48000/2``); ICE credentials, a DTLS fingerprint and
``a=setup`` (session or media level); the audio direction is ``sendrecv`` or ``sendonly`` (a
``recvonly``/``inactive`` caller is refused: the product is a conversation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_SDP_BYTES = 32 * 1024
MAX_LINES = 600
MAX_LINE_BYTES = 2048
MAX_MEDIA_SECTIONS = 8
WEBRTC_PROTO = "UDP/TLS/RTP/SAVPF"

_LINE = re.compile(r"^([a-z])=(.*)$")
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_RTPMAP = re.compile(r"^rtpmap:(\d{1,3}) ([A-Za-z0-9._-]+)/(\d+)(?:/(\d+))?$")
_FINGERPRINT = re.compile(
    r"^fingerprint:(sha-1|sha-224|sha-256|sha-384|sha-512) ([0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+)$"
)
_MLINE = re.compile(r"^(audio|video|application|text|message) (\d{1,5})(?:/\d+)? ([A-Za-z0-9/]+) (.+)$")
_ICE_CHAR = re.compile(r"^[A-Za-z0-9+/]+$")


class SdpError(ValueError):
    """The offer is not an acceptable WebRTC audio offer; the message is the reason for the caller."""


@dataclass
class MediaSection:
    kind: str
    port: int
    proto: str
    formats: list[str]
    attributes: list[str] = field(default_factory=list)

    def attr(self, name: str) -> list[str]:
        prefix = name + ":"
        return [a[len(prefix) :] for a in self.attributes if a.startswith(prefix)] + (
            [""] if name in self.attributes else []
        )


@dataclass(frozen=True)
class OfferInfo:
    """What the rest of the appliance needs to know about a valid offer."""

    audio_mid: str | None
    opus_payload_type: int
    opus_channels: int
    telephone_event_payload_type: int | None
    media_kinds: tuple[str, ...]
    direction: str


def validate_offer(sdp: object, max_bytes: int = MAX_SDP_BYTES) -> OfferInfo:
    """Check a caller's SDP offer; return :class:`OfferInfo` or raise :class:`SdpError`."""
    if not isinstance(sdp, str):
        raise SdpError("sdp must be a string")
    size = len(sdp.encode("utf-8", "surrogatepass"))
    if size == 0:
        raise SdpError("sdp is empty")
    if size > max_bytes:
        raise SdpError(f"sdp is {size} bytes, limit {max_bytes}")
    if _BAD_CHARS.search(sdp):
        raise SdpError("sdp contains control characters")
    lines = [ln for ln in sdp.replace("\r\n", "\n").split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) > MAX_LINES:
        raise SdpError(f"sdp has {len(lines)} lines, limit {MAX_LINES}")
    session: list[tuple[str, str]] = []
    media: list[MediaSection] = []
    for n, raw in enumerate(lines, 1):
        if "\r" in raw:
            raise SdpError(f"line {n}: stray carriage return")
        if len(raw) > MAX_LINE_BYTES:
            raise SdpError(f"line {n}: longer than {MAX_LINE_BYTES} characters")
        m = _LINE.match(raw)
        if not m:
            raise SdpError(f"line {n}: expected '<letter>=<value>', got {raw[:40]!r}")
        key, value = m.group(1), m.group(2)
        if key == "m":
            mm = _MLINE.match(value)
            if not mm:
                raise SdpError(f"line {n}: malformed m= line")
            if len(media) >= MAX_MEDIA_SECTIONS:
                raise SdpError(f"more than {MAX_MEDIA_SECTIONS} media sections")
            media.append(MediaSection(mm.group(1), int(mm.group(2)), mm.group(3), mm.group(4).split()))
        elif media:
            if key == "a":
                media[-1].attributes.append(value)
        else:
            session.append((key, value))
    _check_session(session)
    session_attrs = [v for k, v in session if k == "a"]
    _check_payload_types(session_attrs, media)
    audio = [s for s in media if s.kind == "audio" and s.port != 0]
    if not audio:
        raise SdpError("no active m=audio section")
    sec = audio[0]
    if sec.proto != WEBRTC_PROTO:
        raise SdpError(f"audio protocol {sec.proto!r} is not {WEBRTC_PROTO} (WebRTC DTLS-SRTP required)")
    opus_pt, channels, dtmf_pt = _codecs(sec)
    for name, what in (("ice-ufrag", "ICE username fragment"), ("ice-pwd", "ICE password")):
        values = sec.attr(name) or _attr(session_attrs, name)
        if not values or not values[0] or not _ICE_CHAR.match(values[0]) or len(values[0]) > 256:
            raise SdpError(f"missing or invalid a={name} ({what})")
    fps = sec.attr("fingerprint") or _attr(session_attrs, "fingerprint")
    if not fps:
        raise SdpError("missing a=fingerprint (DTLS)")
    for fp in fps:
        if not _FINGERPRINT.match("fingerprint:" + fp):
            raise SdpError("malformed a=fingerprint")
    setup = sec.attr("setup") or _attr(session_attrs, "setup")
    if not setup or setup[0] not in ("actpass", "active", "passive"):
        raise SdpError("missing or invalid a=setup (offer must be actpass, active or passive)")
    directions = ("sendrecv", "sendonly", "recvonly", "inactive")
    direction = next((d for d in directions if d in sec.attributes), None)
    direction = direction or next((d for d in directions if d in session_attrs), "sendrecv")
    if direction in ("recvonly", "inactive"):
        raise SdpError(f"audio is {direction}: the caller must send audio")
    mids = sec.attr("mid")
    return OfferInfo(
        audio_mid=mids[0] if mids else None,
        opus_payload_type=opus_pt,
        opus_channels=channels,
        telephone_event_payload_type=dtmf_pt,
        media_kinds=tuple(s.kind for s in media),
        direction=direction,
    )


def _attr(attrs: list[str], name: str) -> list[str]:
    prefix = name + ":"
    return [a[len(prefix) :] for a in attrs if a.startswith(prefix)]


def _check_session(session: list[tuple[str, str]]) -> None:
    if not session or session[0] != ("v", "0"):
        raise SdpError("sdp must start with v=0")
    keys = [k for k, _ in session]
    for required in ("o", "s", "t"):
        if required not in keys:
            raise SdpError(f"missing {required}= line")
    origin = dict(session)["o"].split()
    if len(origin) != 6 or origin[3] != "IN" or origin[4] not in ("IP4", "IP6"):
        raise SdpError("malformed o= line")


_PT_ATTRS = ("rtpmap:", "fmtp:", "rtcp-fb:")
_MAX_PT = 127  # RTP payload types are 7 bits (RFC 3550)


def _check_payload_types(session_attrs: list[str], media: list[MediaSection]) -> None:
    """Payload-type attributes only inside a media section and only for 0-127: Janus honours a stray
    session-level ``a=rtpmap:128 opus/48000/2`` or an unlisted ``a=rtpmap:255 telephone-event/…`` and
    would negotiate a payload type no RTP packet can carry (found by `voice-appliance bench fuzz`)."""
    for attr in session_attrs:
        if attr.startswith(_PT_ATTRS):
            raise SdpError(f"a={attr.split(':', 1)[0]} outside a media section")
    for sec in media:
        for attr in sec.attributes:
            if not attr.startswith(_PT_ATTRS):
                continue
            pt = attr.split(":", 1)[1].split(" ", 1)[0]
            if pt == "*" and attr.startswith("rtcp-fb:"):
                continue
            if not pt.isdigit() or int(pt) > _MAX_PT:
                raise SdpError(f"invalid payload type {pt[:10]!r} in a={attr.split(':', 1)[0]} "
                               f"(RTP payload types are 0-{_MAX_PT})")


def _codecs(sec: MediaSection) -> tuple[int, int, int | None]:
    opus: tuple[int, int] | None = None
    dtmf: int | None = None
    for fmt in sec.formats:
        if not fmt.isdigit() or int(fmt) > 127:
            raise SdpError(f"invalid payload type {fmt[:10]!r} in m=audio")
    for rtpmap in sec.attr("rtpmap"):
        m = _RTPMAP.match("rtpmap:" + rtpmap)
        if not m:
            raise SdpError("malformed a=rtpmap")
        pt, name, rate = int(m.group(1)), m.group(2).lower(), int(m.group(3))
        if m.group(1) not in sec.formats:
            continue
        if name == "opus" and rate == 48000 and opus is None:
            opus = (pt, int(m.group(4) or 1))
        elif name == "telephone-event" and rate == 48000 and dtmf is None:
            dtmf = pt
    if opus is None:
        raise SdpError("audio section does not offer opus/48000/2")
    return opus[0], opus[1], dtmf
