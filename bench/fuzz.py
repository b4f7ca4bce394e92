"""`voice-appliance bench fuzz`: fuzzed requests at a real supervisor with a real Janus; 0 may be ≥ 500.

Two generators, both against the public API of a running supervisor (its own Redis, Janus in a network
namespace, media and AI workers; tests/harness):

- **schemathesis** cases from our ``/openapi.json`` (every operation, bodies/paths/headers generated from
  the schemas, half of them with a valid JWT);
- **mutated real SDP offers** (:func:`mutate_offer`: line drops, duplicates, swaps, numbers pushed to
  extremes, tokens replaced, attributes injected, lines truncated) POSTed to ``/v1/sessions``; a created
  session is deleted at once. Mutants that pass our own validator reach Janus, which must either take
  them (201) or refuse them as the caller's mistake (400 ``invalid_sdp`` with Janus's reason).

The result counts responses by status; ``ge_500`` must be 0 (docs/security.md "Bad SDP and fuzzing").
``--smoke`` runs 200 requests; the default is 10 000.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_NUM = re.compile(r"\d+")
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_EXTREMES = ("0", "1", "65535", "65536", "99999", "4294967295", "18446744073709551616", "127", "128", "255",
             "-1", "00", "9" * 30)
_INJECT = (
    "a=rtpmap:{pt} opus/48000/2", "a=rtpmap:{pt} telephone-event/8000",
    "a=fmtp:{pt} minptime=10;useinbandfec=1",
    "a=rtcp-fb:{pt} transport-cc", "a=extmap:{pt} urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=ssrc:{n} cname:{s}", "a=ssrc-group:FID {n} {n}", "a=candidate:{n} 1 udp {n} 192.0.2.{pt} {n} typ host",
    "a=candidate:{n} 1 tcp {n} ::1 {n} typ srflx raddr 0.0.0.0 rport 0", "a=mid:{s}", "a=msid:{s} {s}",
    "a=setup:{choice}", "a=ice-ufrag:{s}", "a=ice-pwd:{s}", "a=rtcp:{n} IN IP4 0.0.0.0",
    "a=group:BUNDLE {s} {s}", "a=sendonly", "a=recvonly", "a=inactive", "a=rtcp-mux", "a=rtcp-rsize",
    "a=ptime:{n}", "a=maxptime:{n}", "a=end-of-candidates", "a=ice-lite", "b=AS:{n}", "c=IN IP6 ::",
    "a=simulcast:send {s}", "a=rid:{s} send", "a=extmap-allow-mixed", "a=x-google-flag:conference",
    "m=video 9 UDP/TLS/RTP/SAVPF {pt}", "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
)


def _rand_text(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/=:;-_.,*#%@!~ "
    return "".join(rng.choice(alphabet) for _ in range(n))


def _mutate_line(rng: random.Random, line: str) -> str:
    match rng.randrange(5):
        case 0:  # a number to an extreme
            nums = list(_NUM.finditer(line))
            if nums:
                m = rng.choice(nums)
                return line[: m.start()] + rng.choice(_EXTREMES) + line[m.end():]
        case 1:  # a token to another word
            toks = list(_TOKEN.finditer(line[2:]))
            if toks:
                m = rng.choice(toks)
                word = rng.choice(("opus", "PCMU", "x", "", "UDP", "TCP", "actpass", "active", "passive",
                                   "holdconn", "sha-1", "telephone-event",
                                   _rand_text(rng, rng.randrange(1, 40))))
                return line[: 2 + m.start()] + word + line[2 + m.end():]
        case 2:  # truncated
            return line[: rng.randrange(2, max(3, len(line)))]
        case 3:  # a field duplicated or dropped
            parts = line.split(" ")
            if len(parts) > 1:
                i = rng.randrange(len(parts))
                parts.insert(i, parts[i]) if rng.random() < 0.5 else parts.pop(i)
                return " ".join(parts)
        case _:  # random characters spliced in
            i = rng.randrange(2, max(3, len(line) + 1))
            return line[:i] + _rand_text(rng, rng.randrange(1, 12)) + line[i:]
    return line


def mutate_offer(rng: random.Random, base: str, max_ops: int = 4) -> str:
    """One mutant of ``base`` (CRLF lines): 1..``max_ops`` line-level mutations."""
    lines = base.strip("\r\n").split("\r\n")
    for _ in range(rng.randint(1, max_ops)):
        op = rng.randrange(6)
        i = rng.randrange(1, len(lines))  # keep v=0 most of the time: deeper mutants reach Janus
        if op == 0 and len(lines) > 4:
            lines.pop(i)
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = rng.randrange(1, len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            word = _rand_text(rng, rng.randrange(1, 24)).strip() or "x"
            pt = rng.choice((0, 8, 9, 63, 96, 101, 111, 126, 127, 128, 255))
            lines.insert(i, rng.choice(_INJECT).format(
                pt=pt, n=rng.choice(_EXTREMES), s=word, choice=rng.choice(("actpass", "active", "passive"))))
        else:
            lines[i] = _mutate_line(rng, lines[i])
    return "\r\n".join(lines) + "\r\n"


async def base_offers() -> list[str]:
    """Real offers: the Chrome-shaped fixture and a fresh aiortc offer."""
    from tests.api.sdp_fixtures import CHROME_OFFER, aiortc_offer

    return [CHROME_OFFER, await aiortc_offer()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", type=int, default=10000, help="total fuzzed requests (default 10 000)")
    parser.add_argument("--sdp-share", type=float, default=0.5, help="share of mutated-SDP requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="200 requests")


def _use_source_checkout() -> None:
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests" / "harness").is_dir():
        raise RuntimeError("bench fuzz needs a source checkout (it uses tests/harness)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


async def fuzz_sdp(api: str, token: Callable[[], str], n: int, seed: int) -> dict[str, Any]:
    """POST ``n`` mutated offers to ``api``; delete what gets created. Returns status counts etc."""
    import httpx

    rng = random.Random(seed)
    bases = await base_offers()
    statuses: Counter[int] = Counter()
    refused_by_janus = 0
    reached_janus = 0
    bad: list[dict[str, Any]] = []
    from appliance.sdp import SdpError, validate_offer
    from appliance.sessions import CLOSE_GRACE_SECONDS

    async with httpx.AsyncClient(base_url=api, timeout=30) as http:
        for i in range(n):
            if i % 500 == 0:  # JWTs live ≤ 15 min
                h = {"Authorization": f"Bearer {token()}"}
            sdp = mutate_offer(rng, rng.choice(bases))
            try:
                validate_offer(sdp)
                reached_janus += 1
            except SdpError:
                pass
            r = await http.post("/v1/sessions", json={"type": "offer", "sdp": sdp}, headers=h)
            statuses[r.status_code] += 1
            if r.status_code >= 500 and len(bad) < 5:
                bad.append({"status": r.status_code, "body": r.text[:300], "sdp": sdp})
            if r.status_code == 400 and "media gateway refused the offer" in r.text:
                refused_by_janus += 1
            if r.status_code == 201:
                body = r.json()
                await http.delete(f"/v1/sessions/{body['session_id']}",
                                  headers={"Authorization": "Bearer " + body["session_token"]})
                await asyncio.sleep(CLOSE_GRACE_SECONDS + 0.05)  # the slot is free again only then
    return {"sdp_requests": n, "sdp_reached_janus": reached_janus,
            "sdp_refused_by_janus_400": refused_by_janus, "sdp_statuses": dict(sorted(statuses.items())),
            "sdp_ge_500": sum(v for k, v in statuses.items() if k >= 500), "sdp_examples_ge_500": bad}


def fuzz_schema(api: str, token: Callable[[], str], n: int, seed: int) -> dict[str, Any]:
    """``n`` schemathesis cases spread over every operation of ``api``'s /openapi.json."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    schema = schemathesis.openapi.from_url(api + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    statuses: Counter[int] = Counter()
    bad: list[dict[str, Any]] = []
    rng = random.Random(seed)

    def case_runner(op: Any, count: int, case_seed: int) -> Callable[[], None]:
        @hseed(case_seed)
        @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate])
        @given(case=op.as_strategy())
        def one(case: Any) -> None:
            headers = dict(case.headers or {})
            if rng.random() < 0.5:
                headers["Authorization"] = f"Bearer {token()}"
            case.headers = headers
            r = case.call(base_url=api, timeout=30)
            statuses[r.status_code] += 1
            if r.status_code >= 500 and len(bad) < 5:
                bad.append({"status": r.status_code, "op": op.label, "body": r.text[:300]})

        return one

    # Small operations (GET /healthz) run out of distinct cases quickly: go round until n are done.
    for rnd in range(100):
        remaining = n - sum(statuses.values())
        if remaining <= 0:
            break
        for k, op in enumerate(ops):
            case_runner(op, max(1, remaining // len(ops)), seed + 1000 * rnd + k)()
    return {"schema_requests": sum(statuses.values()), "schema_statuses": dict(sorted(statuses.items())),
            "schema_ge_500": sum(v for k, v in statuses.items() if k >= 500), "schema_examples_ge_500": bad}


def run(args: argparse.Namespace) -> dict[str, Any]:
    _use_source_checkout()
    from tests.harness.janus import janus_available, janus_in_netns
    from tests.harness.redis import redis_server
    from tests.supervisor.conftest import start_supervisor, stop_supervisor

    if not janus_available():
        raise RuntimeError("bench fuzz needs root, janus and ip (network namespaces)")
    n = 200 if args.smoke else args.n
    n_sdp = int(n * args.sdp_share)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="va-fuzz-") as d, redis_server(Path(d) / "redis") as srv, \
            janus_in_netns() as janus:
        sp = start_supervisor(Path(d), srv.url, janus, slots=4, extra={
            "limits": {"session_creates_per_minute": 100000, "signalling_per_minute": 100000,
                       "auth_failures_per_minute": 100000, "unauthenticated_per_minute": 100000}})
        try:
            def token() -> str:
                return sp.token("fuzzer")

            result = asyncio.run(fuzz_sdp(sp.api, token, n_sdp, args.seed))
            result.update(fuzz_schema(sp.api, token, n - n_sdp, args.seed))
            alive = sp.proc.poll() is None and janus.alive()
        finally:
            stop_supervisor(sp)
    result["requests"] = result["sdp_requests"] + result["schema_requests"]
    result["ge_500"] = result["sdp_ge_500"] + result["schema_ge_500"]
    result["supervisor_and_janus_alive"] = alive
    result["seconds"] = round(time.monotonic() - started, 1)
    return result
