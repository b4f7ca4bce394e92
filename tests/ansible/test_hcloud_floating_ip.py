"""The keepalived notify_master hook for Hetzner (ansible/roles/loadbalancer/files/va-hcloud-floating-ip).

The real hcloud API cannot be reached from the test machine, so a local HTTP server stands in for it:
it implements the three calls the hook makes (GET /floating_ips/{id}, POST
/floating_ips/{id}/actions/assign, GET /actions/{id}) as the API documents them, checks the Bearer token,
and can fail on demand. The hook itself runs as the real script, in a subprocess, as keepalived runs it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "ansible/roles/loadbalancer/files/va-hcloud-floating-ip"
TOKEN = "hc-test-token-0123456789abcdef"


@dataclass
class FakeHcloud:
    """State of the fake API: which server the Floating IP 42 points at, requests seen, faults queued."""

    server: int | None = 7
    requests: list[tuple[str, str, dict[str, Any] | None, str]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # HTTP statuses for the next requests
    action_polls: int = 1  # "running" answers before "success"
    url: str = ""


@contextlib.contextmanager
def fake_hcloud() -> Iterator[FakeHcloud]:
    state = FakeHcloud()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            state.requests.append((method, self.path, body, self.headers.get("Authorization", "")))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._reply(401, {"error": {"code": "unauthorized",
                                                   "message": "unable to authenticate"}})
            if state.fail_next:
                return self._reply(state.fail_next.pop(0), {"error": {"code": "unavailable", "message": "x"}})
            if method == "GET" and self.path == "/v1/floating_ips/42":
                return self._reply(200, {"floating_ip": {"id": 42, "server": state.server}})
            if method == "POST" and self.path == "/v1/floating_ips/42/actions/assign":
                if not isinstance(body, dict) or not isinstance(body.get("server"), int):
                    return self._reply(400, {"error": {"code": "invalid_input", "message": "server"}})
                state.server = body["server"]
                return self._reply(201, {"action": {"id": 900, "command": "assign_floating_ip",
                                                    "status": "running"}})
            if method == "GET" and self.path == "/v1/actions/900":
                state.action_polls -= 1
                status = "success" if state.action_polls < 0 else "running"
                return self._reply(200, {"action": {"id": 900, "status": status}})
            return self._reply(404, {"error": {"code": "not_found", "message": "not found"}})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()


def run_hook(tmp_path: Path, api: str, token: str = TOKEN, server_id: int = 8,
             deadline: float = 10) -> subprocess.CompletedProcess[str]:
    (tmp_path / "token").write_text(token + "\n")
    cfg = {"api": api, "floating_ip_id": 42, "server_id": server_id, "token_file": str(tmp_path / "token")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(tmp_path / "cfg.json"),
                           "--deadline", str(deadline)], capture_output=True, text=True, timeout=60)


def test_assigns_the_floating_ip_and_waits_for_the_action(tmp_path: Path) -> None:
    with fake_hcloud() as api:
        proc = run_hook(tmp_path, api.url)
    assert proc.returncode == 0, proc.stderr
    assert api.server == 8
    posts = [r for r in api.requests if r[0] == "POST"]
    assert posts == [("POST", "/v1/floating_ips/42/actions/assign", {"server": 8}, f"Bearer {TOKEN}")]
    assert [r[1] for r in api.requests].count("/v1/actions/900") == 2  # polled until "success"
    assert "assigned (action 900)" in proc.stderr and TOKEN not in proc.stderr


def test_nothing_sent_when_already_here(tmp_path: Path) -> None:
    with fake_hcloud() as api:
        api.server = 8
        proc = run_hook(tmp_path, api.url)
    assert proc.returncode == 0, proc.stderr
    assert [r[0] for r in api.requests] == ["GET"] and "already assigned" in proc.stderr


def test_retries_rate_limit_and_server_errors(tmp_path: Path) -> None:
    with fake_hcloud() as api:
        api.fail_next = [503, 429]
        proc = run_hook(tmp_path, api.url)
    assert proc.returncode == 0, proc.stderr
    assert api.server == 8 and proc.stderr.count("retrying") == 2


def test_bad_token_fails_at_once_without_printing_it(tmp_path: Path) -> None:
    with fake_hcloud() as api:
        proc = run_hook(tmp_path, api.url, token="wrong-token-secret")
    assert proc.returncode == 1
    assert "HTTP 401 unauthorized" in proc.stderr and "wrong-token-secret" not in proc.stderr
    assert api.server == 7 and len(api.requests) == 1  # no retry on 401


def test_gives_up_at_the_deadline_when_the_api_is_unreachable(tmp_path: Path) -> None:
    proc = run_hook(tmp_path, "http://127.0.0.1:9/v1", deadline=2)  # port 9 (discard): refused
    assert proc.returncode == 1 and "gave up after 2 s" in proc.stderr


@pytest.mark.parametrize("broken", ["{}", "not json"])
def test_bad_config_is_a_clear_error(tmp_path: Path, broken: str) -> None:
    (tmp_path / "cfg.json").write_text(broken)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(tmp_path / "cfg.json")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "failed:" in proc.stderr and "Traceback" not in proc.stderr
