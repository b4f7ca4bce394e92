"""The SDK side of a Live connection: one shared google-genai client per endpoint, the ``setup``
(``LiveConnectConfig``) a call's options turn into, and opening/closing one websocket. The SDK is
imported lazily (0.5-2 s)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import Histogram
from websockets.exceptions import ConnectionClosed

from appliance.config import ModelConfig
from appliance.model_profiles import model_profile, proactive_audio_always_on
from workers.ai.live.settings import ClientSettings, LiveOptions
from workers.ai.live.tooling import tool_plan

if TYPE_CHECKING:
    from google.genai import Client
    from google.genai.live import AsyncSession
    from websockets.asyncio.client import ClientConnection

CONNECT_SECONDS = Histogram("va_live_connect_seconds", "Time to connect and set up a Live session",
                            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))

_CLIENTS: dict[tuple[object, ...], Client] = {}


def sdk_client(s: ClientSettings, api_version: str) -> Client:
    """One google-genai Client per (endpoint, key, TLS context), shared by all sessions."""
    version = s.api_version(api_version)
    k = (s.base_url, s.api_key, version, id(s.ssl_context), s.platform, s.project, s.location,
         id(s.credentials))
    client = _CLIENTS.get(k)
    if client is None:
        from google import genai
        from google.genai import types

        http = types.HttpOptions(base_url=s.base_url, api_version=version,
                                 async_client_args={"ssl": s.ssl_context, "compression": None, "proxy": None})
        if s.platform == "vertex" and s.credentials is not None:
            client = genai.Client(vertexai=True, project=s.project, location=s.location,
                                  credentials=s.credentials, http_options=http)
        elif s.platform == "vertex":  # express mode: an API key, no project
            client = genai.Client(vertexai=True, api_key=s.api_key, http_options=http)
        else:
            client = genai.Client(api_key=s.api_key, http_options=http)
        _CLIENTS[k] = client
    return client


def live_config(m: ModelConfig, o: LiveOptions, *, manual: bool) -> dict[str, Any]:
    """``LiveConnectConfig`` keyword arguments (without ``session_resumption``) for one call."""
    from google.genai import types

    kwargs: dict[str, Any] = {
        "response_modalities": ["AUDIO"],
        "speech_config": types.SpeechConfig(
            voice_config=types.VoiceConfig(prebuilt_voice_config=types.PrebuiltVoiceConfig(voice_name=o.voice)),
            language_code=o.language,
        ),
        "system_instruction": o.system_instruction or None,
    }
    if manual:
        kwargs["realtime_input_config"] = types.RealtimeInputConfig(
            automatic_activity_detection=types.AutomaticActivityDetection(disabled=True)
        )
    if m.transcription:
        kwargs["input_audio_transcription"] = types.AudioTranscriptionConfig()
        kwargs["output_audio_transcription"] = types.AudioTranscriptionConfig()
    if m.context_compression:
        kwargs["context_window_compression"] = types.ContextWindowCompressionConfig(
            sliding_window=types.SlidingWindow()
        )
    plan = tool_plan(o.tools, m.model)
    if plan.declarations:
        decls = [types.FunctionDeclaration(**cast(dict[str, Any], d)) for d in plan.declarations]
        kwargs["tools"] = [types.Tool(function_declarations=decls)]
    if m.proactive_audio or proactive_audio_always_on(model_profile(m.model)):
        kwargs["proactivity"] = types.ProactivityConfig(proactive_audio=True)
    return kwargs


# --- one connection ----------------------------------------------------------------------------------
class Retryable(Exception):
    """Worth another attempt (network, 5xx, a setup the server did not finish)."""


class Fatal(Exception):
    """Not worth retrying: wrong key (1008), a setup the model rejects (1007), TLS verification."""


class UnknownHandle(Exception):
    """The server does not know the resumption handle (1007 on a resume): start a fresh session."""


@dataclass
class Conn:
    """One websocket of a Live session (a session has a new one after every reconnect)."""

    stack: contextlib.AsyncExitStack
    session: AsyncSession | None
    ws: ClientConnection
    server_session_id: str | None = None
    recv_task: asyncio.Task[None] | None = None
    closing: bool = False
    opened: float = field(default_factory=time.monotonic)
    last_rx: float = field(default_factory=time.monotonic)
    index: int = 0  # client messages written on this connection (the setup is message 0)
    item_at: deque[tuple[int, int]] = field(default_factory=deque)  # (message index, outbox seq) written

    def wrote(self, seq: int | None) -> None:
        """One client message written: an outbox item (``seq``) or anything else (a tool response)."""
        self.index += 1
        if seq is not None:
            self.item_at.append((self.index, seq))

    def seq_through(self, index: int) -> int | None:
        """The last outbox item among the first ``index`` messages (what a transparent handle covers)."""
        seq = None
        while self.item_at and self.item_at[0][0] <= index:
            seq = self.item_at.popleft()[1]
        return seq


async def open_connection(s: ClientSettings, m: ModelConfig, setup: dict[str, Any],
                          handle: str | None, *, transparent: bool = False) -> Conn:
    """Connect and set up (resuming ``handle`` when given) through the SDK; errors sorted for the
    session's retry policy."""
    from google.genai import errors, types

    from workers.ai.live.settings import LiveUnavailable, refresh_token

    if s.credentials is not None and not s.credentials.valid:
        try:  # the SDK would refresh in a thread too, but with its own TLS trust: ours knows model.ca_file
            await asyncio.to_thread(refresh_token, s)
        except LiveUnavailable as exc:
            raise Retryable(str(exc)) from None
    resumption = types.SessionResumptionConfig(handle=handle, transparent=True if transparent else None)
    config = types.LiveConnectConfig(**setup, session_resumption=resumption)
    client = sdk_client(s, m.api_version)
    stack = contextlib.AsyncExitStack()
    t0 = time.monotonic()
    try:
        session = await stack.enter_async_context(client.aio.live.connect(model=m.model, config=config))
    except errors.APIError as exc:
        await stack.aclose()
        code = getattr(exc, "code", None)
        if code == 1008:
            raise Fatal(f"the model rejected the API key (1008): {exc.message or exc}") from None
        if code == 1007 and handle:
            raise UnknownHandle(str(exc)) from None
        if code == 1007:
            raise Fatal(f"the model rejected the setup (1007): {exc.message or exc}") from None
        raise Retryable(f"setup failed ({code}): {exc.message or exc}") from None
    except (OSError, ConnectionClosed, TimeoutError, ValueError) as exc:
        await stack.aclose()
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise Fatal(f"TLS verification failed for {s.base_url}: {exc}") from None
        raise Retryable(f"cannot connect to {s.base_url}: {exc}") from None
    except Exception as exc:  # the websockets handshake (InvalidStatus 503 …) and the like
        await stack.aclose()
        raise Retryable(f"cannot connect to {s.base_url}: {exc}") from None
    except asyncio.CancelledError:  # the owner gave up (call ended): do not leak the socket
        with contextlib.suppress(Exception):
            await asyncio.shield(stack.aclose())
        raise
    CONNECT_SECONDS.observe(time.monotonic() - t0)
    return Conn(stack=stack, session=session, ws=session._ws, server_session_id=session.session_id)


async def close_connection(conn: Conn | None, *, abort: bool = False) -> None:
    """Close one connection (``abort``: no close handshake, for a server that stopped reading)."""
    if conn is None:
        return
    conn.closing = True
    if abort:
        with contextlib.suppress(Exception):
            conn.ws.transport.abort()
    if conn.recv_task is not None and conn.recv_task is not asyncio.current_task():
        conn.recv_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await conn.recv_task
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.ws.close(), 2.0)
    with contextlib.suppress(Exception):
        await conn.stack.aclose()
