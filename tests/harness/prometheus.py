"""A real Prometheus (Debian's) for tests: ephemeral port, own data dir, stopped by PID; and its HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.harness.procs import stop
from tests.harness.redis import free_port


def api(port: int, path: str, **params: str) -> Any:
    """GET ``path`` of the Prometheus API; its ``data``."""
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]


def query(port: int, q: str) -> list[dict[str, Any]]:
    return api(port, "/api/v1/query", query=q)["result"]


def wait_for(fn: Callable[[], Any], limit: float, what: str) -> Any:
    """Poll ``fn`` every 0.25 s until it returns something truthy (OSErrors count as not yet)."""
    deadline = time.monotonic() + limit
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"{what} not met within {limit} s (last: {last})")


@contextlib.contextmanager
def prometheus(workdir: Path, jobs: dict[str, list[str]], rule_files: list[str] | None = None,
               interval: str = "1s") -> Iterator[int]:
    """Prometheus scraping ``jobs`` (job name → ["host:port", …]) every ``interval``; yields its port."""
    exe = shutil.which("prometheus")
    if exe is None:
        raise RuntimeError("prometheus not installed (Debian package prometheus, APT_TEST)")
    port = free_port()
    cfg = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
           "rule_files": rule_files or [],
           "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                              for job, targets in jobs.items()]}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([exe, f"--config.file={workdir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: api(port, "/api/v1/status/runtimeinfo"), 20, "prometheus up")
        yield port
    finally:
        stop(proc, 10)
