"""`voice-appliance` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported only when their subcommand runs, so `voice-appliance token` does not pay for
onnxruntime and a missing optional part never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from appliance import __version__
from appliance.config import ConfigError, load_config, production_problems, redacted_dict
from appliance.logs import setup_logging

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("appliance.runner", "run the whole stack in the foreground (supervisord; no systemd needed)"),
    "supervisor": ("appliance.supervisor", "run the control plane and session API (what systemd starts)"),
    "emulator": ("appliance.emulator.cli", "run the built-in Gemini Live emulator (TLS WebSocket)"),
    "token": ("appliance.token", "mint a development JWT for the session API"),
    "drain": ("appliance.control", "drain this box (and force-migrate its calls) through the supervisor"),
    "restart": ("appliance.restart", "restart the supervisor in place, keeping every live call"),
    "media-worker": ("workers.media.main", "run one shard's media worker (started by the supervisor)"),
    "ai-worker": ("workers.ai.main", "run one shard's AI worker (started by the supervisor)"),
    "keys": ("appliance.compliance.keys_cli", "rotate / re-wrap the data keys of encryption at rest"),
    "audit": ("appliance.compliance.audit_cli", "verify the tamper-evident audit trail"),
    "records": ("appliance.compliance.retention", "purge records past their retention"),
    "usage": ("appliance.records.usage_cli", "tokens and cost estimate per tenant and model (JSON)"),
    "bench": ("bench.cli", "run a benchmark and print its results (--json for one JSON object)"),
}


def _config_cmd(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    problems = production_problems(cfg)
    if args.action == "check" and problems:
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    if args.action == "show":
        print(json.dumps(redacted_dict(cfg), indent=2))
    else:
        print("config ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voice-appliance", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"voice-appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cfg = sub.add_parser("config", help="check or show the effective configuration")
    cfg.add_argument("action", choices=["check", "show"])
    cfg.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")
    cfg.set_defaults(func=_config_cmd)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not module_name.startswith(exc.name):
                raise
            p.set_defaults(func=lambda _a, n=name: _missing(n))
            continue
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    return parser


def _missing(name: str) -> int:
    print(f"voice-appliance {name}: not available in this build", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen subcommand's module: peek at the first positional argument.
    parser = build_parser_for(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(getattr(args, "log_level", None))
    return int(args.func(args) or 0)


def build_parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """A parser that imports only the module of the subcommand named in ``argv`` (all for --help)."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in SUBCOMMANDS:
        saved = dict(SUBCOMMANDS)
        try:
            SUBCOMMANDS.clear()
            SUBCOMMANDS[chosen] = saved[chosen]
            return build_parser()
        finally:
            SUBCOMMANDS.clear()
            SUBCOMMANDS.update(saved)
    return build_parser()


if __name__ == "__main__":
    sys.exit(main())
