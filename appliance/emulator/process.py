"""Run ``voice-appliance emulator`` as a child process and learn its address from its start-up line.

One launcher for everything that needs a private emulator (tests, benchmarks): it starts the real CLI on
port 0, reads the single ``emulator listening on wss://HOST:PORT ca=FILE`` line the CLI prints, keeps its
stderr for diagnostics, and stops it by PID (SIGTERM, then SIGKILL) until the process is really gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.procs import pid_gone

START_LINE = re.compile(r"emulator listening on wss://(\S+):(\d+) ca=(\S+)")


@dataclass
class EmulatorProcess:
    """A started emulator child: where it listens, the CA to trust, and its stderr lines so far."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    ca_file: str
    log_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"


def cli_command() -> list[str]:
    """The ``voice-appliance`` entry point of this interpreter's environment."""
    exe = Path(sys.executable).parent / "voice-appliance"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "appliance"]




@contextlib.contextmanager
def run_emulator(args: list[str], *, timeout: float = 20.0) -> Iterator[EmulatorProcess]:
    """Start ``voice-appliance emulator ARGS`` (pass ``--port 0``), yield it once listening, stop it after."""
    env = dict(os.environ)
    env.setdefault("VA_LOG_LEVEL", "warning")
    proc = subprocess.Popen([*cli_command(), "emulator", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    log_lines: list[str] = []
    found: dict[str, re.Match[str]] = {}

    def drain_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log_lines.append(line.rstrip())

    def read_start_line() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = START_LINE.search(line)
            if m:
                found["m"] = m
                return

    threading.Thread(target=drain_stderr, daemon=True).start()
    try:
        reader = threading.Thread(target=read_start_line, daemon=True)
        reader.start()
        reader.join(timeout)
        if "m" not in found:
            raise RuntimeError(f"emulator did not start: {' | '.join(log_lines[-10:])}")
        m = found["m"]
        yield EmulatorProcess(proc, m.group(1).strip("[]"), int(m.group(2)), m.group(3), log_lines)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        deadline = time.monotonic() + 5
        while not pid_gone(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not pid_gone(proc.pid):
            raise RuntimeError(f"emulator pid {proc.pid} did not exit")
