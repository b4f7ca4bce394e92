"""`voice-appliance restart`: restart the supervisor in place without ending any call.

The supervisor stops its API and control plane, leaves the workers, shared-memory segments, Janus
sessions and Redis records running, and re-execs itself (same PID: systemd sees a reload, not a stop);
the new image adopts every worker and call (docs/architecture.md "Supervisor restart and adoption").
For a code upgrade that changes the shared-memory layout or the workers, drain instead
(`voice-appliance drain --wait --migrate`, docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from appliance.config import ConfigError, load_config
from appliance.control import request, socket_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config) if args.config else load_config()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        status = asyncio.run(request(socket_path(cfg), "restart"))
    except (OSError, TimeoutError, RuntimeError, ValueError) as exc:
        print(f"cannot reach the supervisor at {socket_path(cfg)}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in status.items() if k != "ok"}))
    return 0
