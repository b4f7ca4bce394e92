"""The SDK side of a Live connection: one shared google-genai client per endpoint, and the ``setup``
(``LiveConnectConfig``) a call's options turn into. The SDK is imported here lazily (0.5-2 s)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.config import ModelConfig
from workers.ai.live.settings import ClientSettings, LiveOptions

if TYPE_CHECKING:
    from google.genai import Client

_CLIENTS: dict[tuple[str, str, str, int], Client] = {}


def sdk_client(s: ClientSettings, api_version: str) -> Client:
    """One google-genai Client per (endpoint, key, TLS context), shared by all sessions."""
    k = (s.base_url, s.api_key, api_version, id(s.ssl_context))
    client = _CLIENTS.get(k)
    if client is None:
        from google import genai
        from google.genai import types

        client = genai.Client(
            api_key=s.api_key,
            http_options=types.HttpOptions(
                base_url=s.base_url,
                api_version=api_version,
                async_client_args={"ssl": s.ssl_context, "compression": None, "proxy": None},
            ),
        )
        _CLIENTS[k] = client
    return client


def live_config(m: ModelConfig, o: LiveOptions, *, manual: bool) -> dict[str, object]:
    """``LiveConnectConfig`` keyword arguments (without ``session_resumption``) for one call."""
    from google.genai import types

    kwargs: dict[str, object] = {
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
    if o.tools:
        kwargs["tools"] = [types.Tool(function_declarations=[types.FunctionDeclaration(**dict(d))
                                                             for d in o.tools])]
    return kwargs
