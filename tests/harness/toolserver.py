"""A real HTTP tool endpoint for tests (stdlib ``ThreadingHTTPServer`` on 127.0.0.1, its own port).

    with tool_server() as srv:
        srv.url("/ok")                      # answers {"output": {"echo": <args>, "name": <name>}}
        srv.delay["sess-1"] = 3.0           # requests of that session_id wait 3 s first
        srv.requests                        # every JSON body received, in order

Paths: ``/ok``; ``/status/<code>`` (that HTTP status, JSON body); ``/badjson`` (200, not JSON);
``/list`` (200, a JSON list); ``/big`` (200, 100 KB of JSON); ``/slow/<seconds>`` (sleeps first);
``/accept`` and ``/decline`` (a payment endpoint's ``{"accepted": true|false}``).
Each handler thread stops sleeping when the server shuts down.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ToolServer:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.requests: list[dict[str, Any]] = []
        self.raw: list[tuple[dict[str, str], bytes]] = []  # (headers, body bytes) of each request
        self.paths: list[str] = []  # the request path of each, in the same order
        self.delay: dict[str, float] = {}  # session_id -> seconds to wait before answering
        self.done: list[tuple[str, float]] = []  # (call_id, monotonic time the answer was written)
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str = "/ok") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(state: ToolServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n)
            try:
                req = json.loads(raw)
            except ValueError:
                req = {"raw": raw.decode(errors="replace")}
            with state.lock:
                state.requests.append(req)
                state.raw.append((dict(self.headers), raw))
                state.paths.append(self.path)
            wait = state.delay.get(str(req.get("session_id")), 0.0)
            if self.path.startswith("/slow/"):
                wait = max(wait, float(self.path.split("/")[2]))
            if wait:
                state.stopping.wait(wait)
            if self.path.startswith("/status/"):
                code = int(self.path.split("/")[2])
                self._send(code, json.dumps({"detail": "nope"}).encode())
            elif self.path == "/badjson":
                self._send(200, b"this is not json{", "text/plain")
            elif self.path == "/list":
                self._send(200, json.dumps([1, 2, 3]).encode())
            elif self.path == "/big":
                self._send(200, json.dumps({"blob": "x" * 100_000}).encode())
            elif self.path in ("/accept", "/decline"):  # a payment endpoint (workers/ai/secure_entry.py)
                self._send(200, json.dumps({"accepted": self.path == "/accept"}).encode())
            else:
                body = {"output": {"name": req.get("name"), "echo": req.get("args")}}
                self._send(200, json.dumps(body).encode())
            with state.lock:
                state.done.append((str(req.get("call_id")), time.monotonic()))

    return Handler


@contextlib.contextmanager
def tool_server() -> Iterator[ToolServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = ToolServer(httpd)
    httpd.RequestHandlerClass = _handler(state)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="tool-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
