"""Answering the model's tool calls (Live ``toolCall`` → ``tool_response``) for every call of a worker.

Why this exists: a Live model that calls a function stops and waits for a ``tool_response`` with the
call's id; without one the caller's turn hangs in silence. So every function call gets exactly one
answer unless the model cancels it (``toolCallCancellation``, e.g. on barge-in) or the call ends:

- ``model.tools_url`` set: the worker POSTs ``{"session_id", "name", "args", "call_id"}`` (JSON) there.
  A 2xx JSON object is the response as is (by the Gemini convention ``{"output": …}`` or
  ``{"error": …}``, but any object goes); another JSON value is wrapped as ``{"output": value}``.
- timeout (``model.tools_timeout_seconds``, the whole request including connect), connection failure,
  non-2xx, invalid JSON, an answer over ``MAX_RESPONSE_BYTES``, too many calls in flight for one session
  (``MAX_IN_FLIGHT``), no endpoint configured: ``{"error": "<what went wrong>"}``, so the model can tell
  the caller instead of waiting forever. Counted in the slot's ``tool_errors``.

Why one asyncio task per function call on the worker's own loop (and a shared ``httpx.AsyncClient``):
the 20 ms tick never waits for a tool, and a slow tool of one call delays nothing else — not the
other calls, not another function call of the same turn (each response is sent as soon as it is
ready, with its own id). The connection pool is unbounded (the per-session cap bounds it) so one call's
slow requests cannot starve another's of connections. ``trust_env=False``: the endpoint is an
operator's internal service; a ``HTTP(S)_PROXY`` meant for package downloads must not capture it.

Every response carries ``status`` (``"ok"`` or ``"error"``) and, for an error, ``retryable`` (would the
same call likely work a moment later: timeout, unreachable, HTTP 429/5xx, too many in flight — not a
missing endpoint, a 4xx or a bad answer): newer Live models run tools asynchronously and, without
these fields, call a failed tool again and again. An endpoint's own ``status`` is kept.

Signing key: ``records.webhook_secret_file`` (set by workers/ai/records.py), unless the tenant has its
own ``tools_secret(_file)`` (``[tenants.<name>]``, workers/ai/tenants.py: one runner per tenant, since
URL and key are the tenant's). Same header as the webhooks (appliance/records/signing.py).

A response is sent only on the Live session that asked: if the worker replaced the session in the
meantime (it re-opens failed ones) the answer is dropped, because the new session never made that call.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx

from appliance import tracing
from appliance.records import signing

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 8  # tool calls of one session at once; more are answered with an error at once
MAX_RESPONSE_BYTES = 64 * 1024  # a tool answer goes to the model as JSON; keep it a sane size

Key = tuple[int, int]  # (slot, generation) of a call
Respond = Callable[[dict[str, Any]], bool]  # sends one functionResponse; False if it could not be sent


class ToolError(Exception):
    """A tool call failed; the message is what the model is told, ``retryable`` whether to try again."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def error_result(message: str, *, retryable: bool) -> dict[str, Any]:
    return {"error": message, "status": "error", "retryable": retryable}


class ToolRunner:
    """Runs function calls against ``url`` and hands each answer to the call's ``respond``."""

    def __init__(self, url: str, timeout: float, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tasks: dict[Key, dict[str, asyncio.Task[None]]] = {}
        self.sign_key = b""  # records.webhook_secret_file: POSTs carry X-VA-Signature (records/signing.py)
        self.on_finished: Callable[[Key, str, float, str], None] | None = None  # key, name, s, outcome

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
                trust_env=False,
                transport=self._transport,
                headers={"user-agent": "voice-appliance-ai-worker"},
            )
        return self._client

    def in_flight(self, key: Key) -> int:
        return len(self._tasks.get(key, ()))

    def submit(self, key: Key, session_id: str, calls: list[dict[str, Any]], respond: Respond,
               on_done: Callable[[bool], None]) -> None:
        """Start one task per function call ``{"id", "name", "args"}``; ``on_done(ok)`` is called once
        per answered call (``ok`` False for an error result or an answer that could not be sent)."""
        loop = asyncio.get_running_loop()
        running = self._tasks.setdefault(key, {})
        for i, fc in enumerate(calls):
            call_id = str(fc.get("id") or f"anon-{i}")
            name = str(fc.get("name") or "")
            raw_args = fc.get("args")
            args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
            if len(running) >= MAX_IN_FLIGHT or call_id in running:
                why = "duplicate call id" if call_id in running else "too many tool calls in flight"
                respond({"id": call_id, "name": name,
                         "response": error_result(why, retryable=call_id not in running)})
                on_done(False)
                continue
            task = loop.create_task(self._run(key, session_id, call_id, name, args, respond, on_done),
                                    name=f"tool-{session_id}-{call_id}")
            running[call_id] = task

    def cancel(self, key: Key, ids: list[str]) -> int:
        """The model withdrew these calls: stop them, send nothing. Returns how many were running."""
        running = self._tasks.get(key, {})
        n = 0
        for call_id in ids:
            task = running.pop(str(call_id), None)
            if task is not None:
                task.cancel()
                n += 1
        return n

    def cancel_all(self, key: Key) -> None:
        """The call ended (or its Live session was replaced)."""
        for task in self._tasks.pop(key, {}).values():
            task.cancel()

    async def aclose(self) -> None:
        for key in list(self._tasks):
            self.cancel_all(key)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self, key: Key, session_id: str, call_id: str, name: str, args: dict[str, Any],
                   respond: Respond, on_done: Callable[[bool], None]) -> None:
        ok = False
        t0 = asyncio.get_running_loop().time()
        try:
            try:
                with tracing.child(session_id, "tool_call", tool=name, call_id=call_id):
                    log.info("tool call", extra={"session": session_id, "tool": name, "call_id": call_id})
                    response = await self.invoke(session_id, name, args, call_id)
                response.setdefault("status", "error" if "error" in response else "ok")
                ok = True
            except ToolError as exc:
                response = error_result(str(exc), retryable=exc.retryable)
                log.warning("tool call failed", extra={"session": session_id, "tool": name,
                                                       "call_id": call_id, "error": str(exc)})
            except Exception:  # a bug here must still answer the model
                response = error_result("tool call failed", retryable=False)
                log.exception("tool call crashed", extra={"session": session_id, "tool": name})
        except asyncio.CancelledError:
            log.info("tool call cancelled", extra={"session": session_id, "tool": name, "call_id": call_id})
            raise
        finally:
            running = self._tasks.get(key)
            if running is not None and running.get(call_id) is asyncio.current_task():
                del running[call_id]
                if not running:
                    self._tasks.pop(key, None)
        sent = False
        try:
            sent = respond({"id": call_id, "name": name, "response": response})
        except Exception:
            log.exception("sending the tool response failed", extra={"session": session_id, "tool": name})
        on_done(ok and sent)
        if self.on_finished is not None:
            self.on_finished(key, name, asyncio.get_running_loop().time() - t0,
                             "ok" if ok and sent else ("not_sent" if ok else "error"))

    async def invoke(self, session_id: str, name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
        """POST one call to the endpoint; the response object for the model, or :class:`ToolError`."""
        if not self.url:
            raise ToolError(f"no tool endpoint is configured for {name!r}")
        payload = {"session_id": session_id, "name": name, "args": args, "call_id": call_id}
        content = json.dumps(payload, separators=(",", ":")).encode()
        headers = signing.headers(self.sign_key, content, event_id=call_id, event_type="tool.call")
        try:
            async with asyncio.timeout(self.timeout):
                async with self._http().stream("POST", self.url, content=content, headers=headers) as resp:
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_RESPONSE_BYTES:
                            raise ToolError(f"tool answer larger than {MAX_RESPONSE_BYTES} bytes")
        except (TimeoutError, httpx.TimeoutException):
            raise ToolError(f"tool {name!r} did not answer within {self.timeout:g} s",
                            retryable=True) from None
        except httpx.HTTPError as exc:
            raise ToolError(f"tool endpoint unreachable: {type(exc).__name__}", retryable=True) from None
        if not 200 <= resp.status_code < 300:
            again = resp.status_code == 429 or resp.status_code >= 500
            raise ToolError(f"tool endpoint answered HTTP {resp.status_code}", retryable=again)
        try:
            value = json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ToolError("tool endpoint answered invalid JSON") from None
        return value if isinstance(value, dict) else {"output": value}
