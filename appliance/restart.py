"""`voice-appliance restart`: restart the supervisor in place without ending any call.

The supervisor stops its API and control plane, leaves the workers, shared-memory segments, Janus
sessions and Redis records running, and re-execs itself (same PID: systemd sees a reload, not a stop);
the new image adopts every worker and call (docs/architecture.md "Supervisor restart and adoption").
For a code upgrade that changes the shared-memory layout or the workers, drain instead
(`voice-appliance drain --wait --migrate`, docs/operations.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from appliance.config import Config
from appliance.control import request, run_cli, socket_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")


async def _restart(cfg: Config) -> tuple[int, dict[str, Any]]:
    return 0, await request(socket_path(cfg), "restart")


def main(args: argparse.Namespace) -> int:
    return run_cli(args.config, _restart)
