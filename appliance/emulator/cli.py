"""``voice-appliance emulator``: run the Live emulator (TLS WebSocket) in the foreground.

Defaults come from the ``[emulator]`` config section; flags override them. On start it prints exactly one
line to stdout naming the address and the CA certificate clients must trust, e.g.
``emulator listening on wss://127.0.0.1:9443 ca=/var/lib/voice-appliance/emulator/emulator-ca.pem``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from appliance.config import ConfigError, load_config

log = logging.getLogger("appliance.emulator")


PLATFORMS = {"both": ("developer", "vertex")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Gemini Live API emulator for tests and offline use (the real SDK connects to it)."
    p.add_argument("--config", help="config file (default: $VA_CONFIG or the system one)")
    p.add_argument("--host", help="address to listen on (default: [emulator] host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port; 0 picks a free one (default: [emulator] port, 9443)")
    p.add_argument("--api-key", help="the API key clients must send (default: [emulator] api_key)")
    p.add_argument("--state-dir", help="where the test CA and server certificate live "
                   "(default: <paths.state_dir>/emulator)")
    p.add_argument("--reply", choices=["echo", "tone", "silence"],
                   help="how the model answers: echo the caller's last utterance (default), a tone, silence")
    p.add_argument("--tone-hz", type=float, default=440.0, help="tone frequency for --reply tone")
    p.add_argument("--pacing", choices=["realtime", "burst"], default="realtime",
                   help="reply audio sent in real time (default) or as fast as possible")
    p.add_argument("--chunk-ms", type=int, default=40, help="reply audio chunk length in ms")
    faults = p.add_argument_group("faults (also settable at run time through the control channel)")
    faults.add_argument("--first-byte-delay-ms", type=int, default=0,
                        help="model latency before the first reply audio")
    faults.add_argument("--goaway-after-s", type=float, default=0.0,
                        help="send goAway this long after setup (0: never)")
    faults.add_argument("--goaway-time-left-s", type=float, default=1.0,
                        help="timeLeft announced in goAway before the server closes")
    faults.add_argument("--close-after-s", type=float, default=0.0,
                        help="abruptly close each connection after this long (0: never)")
    faults.add_argument("--close-code", type=int, default=1011,
                        help="close code for --close-after-s (1006: drop TCP without a close frame)")
    faults.add_argument("--refuse", action="store_true", help="refuse new connections (HTTP 503)")
    faults.add_argument("--stop-reading-after-s", type=float, default=0.0,
                        help="stop reading client frames after this long: a slow consumer (0: never)")
    faults.add_argument("--tool-calls", action="store_true",
                        help="when setup declares functions, each turn first calls the first one")
    p.add_argument("--threshold-dbfs", type=float, default=-45.0,
                   help="energy gate of automatic turn detection")
    p.add_argument("--session-limit-s", type=float, default=0.0,
                   help="models named *-3.8-*: hard close (1011) after this many seconds, their handles "
                        "refused afterwards (default 0: the documented 58 min)")
    p.add_argument("--silence-ms", type=int, default=500,
                   help="end-of-turn silence when setup gives no silenceDurationMs")
    p.add_argument("--max-frame-bytes", type=int, default=4 << 20,
                   help="larger client frames close with 1009")
    p.add_argument("--max-record-seconds", type=float, default=60.0,
                   help="caller audio kept per conversation for the /emulator/audio record")
    p.add_argument("--handle-ttl-s", type=float, default=7200.0,
                   help="resumption handles and idle conversations are forgotten after this long")
    p.add_argument("--platform", choices=["developer", "vertex", "both"], default="both",
                   help="which Live API to serve: the Developer API path, Vertex AI's (with an OAuth "
                        "/token endpoint), or both (default)")
    p.add_argument("--vertex-sa-key", action="append", default=[], metavar="PEM",
                   help="public key (PEM) of a service account whose JWT assertions /token accepts; "
                        "repeatable")
    p.add_argument("--no-control", action="store_true", help="disable the /emulator/ control channel")
    p.add_argument("--log-level", default=None, help="debug, info, warning, error")


def _default_state_dir(cfg_state_dir: str) -> Path:
    wanted = Path(cfg_state_dir) / "emulator"
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        if os.access(wanted, os.W_OK):
            return wanted
    except OSError:
        pass
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "voice-appliance" / "emulator"


def main(args: argparse.Namespace) -> int:
    from appliance.emulator.certs import ensure_certs
    from appliance.emulator.server import Behaviour, EmulatorServer, server_ssl_context

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    host = args.host or cfg.emulator.host
    port = cfg.emulator.port if args.port is None else args.port
    api_key = args.api_key or cfg.emulator.api_key
    state_dir = Path(args.state_dir) if args.state_dir else _default_state_dir(cfg.paths.state_dir)
    behaviour = Behaviour(
        reply=args.reply or cfg.emulator.reply,
        tone_hz=args.tone_hz,
        pacing=args.pacing,
        chunk_ms=args.chunk_ms,
        first_byte_delay_ms=args.first_byte_delay_ms,
        goaway_after_s=args.goaway_after_s,
        goaway_time_left_s=args.goaway_time_left_s,
        close_after_s=args.close_after_s,
        close_code=args.close_code,
        stop_reading_after_s=args.stop_reading_after_s,
        refuse=args.refuse,
        tool_calls=args.tool_calls,
        threshold_dbfs=args.threshold_dbfs,
        silence_ms=args.silence_ms,
        session_limit_s=args.session_limit_s,
    )
    if not 10 <= behaviour.chunk_ms <= 1000:
        print("--chunk-ms: expected 10 to 1000", file=sys.stderr)
        return 2
    try:
        certs = ensure_certs(state_dir, [host])
    except OSError as exc:
        print(f"cannot write certificates to {state_dir}: {exc}", file=sys.stderr)
        return 1
    try:
        keys = [Path(k).read_bytes() for k in args.vertex_sa_key]
    except OSError as exc:
        print(f"--vertex-sa-key: {exc}", file=sys.stderr)
        return 2
    server = EmulatorServer(api_key, behaviour, max_frame_bytes=args.max_frame_bytes,
                            control=not args.no_control, max_record_seconds=args.max_record_seconds,
                            handle_ttl_s=args.handle_ttl_s,
                            platforms=PLATFORMS.get(args.platform, (args.platform,)),
                            vertex_keys=keys)

    async def run() -> int:
        try:
            ctx = server_ssl_context(str(certs.cert_file), str(certs.key_file))
            bound = await server.start(host, port, ctx)
        except OSError as exc:
            print(f"cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 1
        shown = f"[{host}]" if ":" in host else host
        print(f"emulator listening on wss://{shown}:{bound} ca={certs.ca_file}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
        await server.stop()
        return 0

    return asyncio.run(run())
