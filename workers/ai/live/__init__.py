"""The AI worker's Gemini Live layer (one session per call, many per process, one asyncio loop).

``events`` (what a session reports), ``outbox`` (the one record of what was sent: replay, handle
coverage, crash journal), ``wire`` (frames ↔ items and ``Inbound``: fast path and SDK), ``settings``
(endpoint, TLS, per-call options), ``client`` (the SDK client and setup), ``session`` (connect, resume,
watchdog, send, receive). Importing this package does not import the SDK.
"""
