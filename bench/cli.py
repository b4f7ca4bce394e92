"""`voice-appliance bench NAME`: one dispatcher for every benchmark.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> dict``; ``--json`` prints the dict
as one JSON object (what CI's smoke and docs/benchmarks.md use), otherwise a small table. ``smoke`` runs
every benchmark in its short CI form (a module with a short form takes ``--smoke``); ``all`` runs each at
its full default size.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

BENCHMARKS: dict[str, str] = {
    "shm": "bench.shm_bench",
    "live": "bench.live_sessions",
    "media": "bench.media_bench",
    "vad": "bench.vad_bench",
    "api": "bench.api_bench",
    "pipeline": "bench.pipeline",
    "records": "bench.records_bench",
    "quality": "bench.quality",
    "box": "bench.box",
    "fuzz": "bench.fuzz",
    "loris": "bench.loris",
    "chaos": "bench.chaos",
}
# Benchmarks that need a running stack (--api …): not part of `smoke`/`all`; their CI smoke is a pytest
# that builds the stack (tests/bench/test_box.py). `fuzz` builds its own (supervisor + Janus in a netns)
# and its short form is tests/supervisor/test_security.py::test_short_fuzz_gives_no_5xx.
NEEDS_STACK = {"box", "fuzz"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module_name in BENCHMARKS.items():
        p = sub.add_parser(name, help=f"benchmark: {name}")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        try:
            importlib.import_module(module_name).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            p.set_defaults(unavailable=True)
    for name, text in (("smoke", "every benchmark, short (what CI runs)"), ("all", "every benchmark, full")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="print one JSON object")


def _table(result: dict[str, Any]) -> str:
    width = max((len(k) for k in result), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in result.items())


def _run_one(name: str, extra: list[str]) -> dict[str, Any]:
    module = importlib.import_module(BENCHMARKS[name])
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    known = {a for action in p._actions for a in action.option_strings}
    return module.run(p.parse_args([a for a in extra if a in known]))


def main(args: argparse.Namespace) -> int:
    if args.bench in ("smoke", "all"):
        results: dict[str, Any] = {}
        failed = False
        for name, module_name in BENCHMARKS.items():
            if name in NEEDS_STACK:
                continue
            try:
                importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                results[name] = {"skipped": "not built yet"}
                continue
            try:
                results[name] = _run_one(name, ["--smoke"] if args.bench == "smoke" else [])
            except Exception as exc:  # report every benchmark, then fail
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                failed = True
        print(json.dumps(results, indent=None if args.json else 2))
        return 1 if failed else 0
    if getattr(args, "unavailable", False):
        print(f"benchmark {args.bench} is not built yet", file=sys.stderr)
        return 2
    result = importlib.import_module(BENCHMARKS[args.bench]).run(args)
    print(json.dumps(result) if args.json else _table(result))
    return 0
