"""OpenTelemetry traces: one trace per call, a span per caller turn, per tool call and per Live resume,
exported over OTLP/HTTP when ``[otel] endpoint`` is set (off by default: then every function here is a
cheap no-op and the SDK is never imported).

One trace across processes without propagating context: the trace id and the call span's id are
derived from the session id (:func:`call_ids`, SHA-256), so the supervisor (which owns the ``call``
span from admission to teardown) and the AI worker (``turn`` / ``tool_call`` / ``resume`` spans, children
of it) agree on them without a message between them, and a log line can name the trace id even when
tracing is off (appliance/logs.py). Why the SDK and not hand-written OTLP: batching, retries and the
protobuf encoding are the SDK's well-tested job; ~1 µs per span event is nothing at turn rate.

Turn spans come from the AI worker's ``TurnClock`` (workers/ai/turn_metrics.py): start at the caller's
speech onset, events ``activity_end``, ``model_first_audio``, ``playback`` (the media worker took the
answer's first audio from the downlink ring), ``barge_in`` / ``interrupted``, end at ``turnComplete`` /
``interrupted`` (or the next turn, or the call leaving the worker).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_tracer: Any = None  # an opentelemetry Tracer once configure() enabled tracing
_provider: Any = None
_forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("va_ids", default=None)


def call_ids(session_id: str) -> tuple[int, int]:
    """(trace id, call span id) of a session: the first 16 and next 8 bytes of SHA-256(session id)."""
    h = hashlib.sha256(session_id.encode()).digest()
    return int.from_bytes(h[:16], "big") or 1, int.from_bytes(h[16:24], "big") or 1


def trace_id_hex(session_id: str) -> str:
    return f"{call_ids(session_id)[0]:032x}"


def enabled() -> bool:
    return _tracer is not None


def configure(endpoint: str, service_name: str = "voice-appliance", role: str = "supervisor",
              timeout: float = 5.0) -> bool:
    """Enable OTLP/HTTP export to ``endpoint`` (the collector's base URL; ``/v1/traces`` is appended
    unless given). Empty: tracing stays off. Returns whether tracing is on."""
    global _tracer, _provider
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _Ids(RandomIdGenerator):
        """Random ids, except for the ``call`` span whose ids derive from the session id."""

        def generate_span_id(self) -> int:
            forced = _forced.get()
            return forced[1] if forced else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _forced.get()
            return forced[0] if forced else super().generate_trace_id()

    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    _provider = TracerProvider(resource=Resource.create({"service.name": service_name, "va.role": role}),
                               id_generator=_Ids())
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=timeout),
                                                    schedule_delay_millis=1000))
    _tracer = _provider.get_tracer("voice-appliance")
    log.info("tracing on", extra={"endpoint": url, "role": role})
    return True


def shutdown() -> None:
    """Flush and stop the exporter (end of process / tests)."""
    global _tracer, _provider
    if _provider is not None:
        with contextlib.suppress(Exception):
            _provider.force_flush(5000)
            _provider.shutdown()
    _tracer, _provider = None, None


def flush() -> None:
    if _provider is not None:
        _provider.force_flush(5000)


def _wall_ns(monotonic_s: float | None) -> int | None:
    """A ``time.monotonic()`` reading as Unix ns (span timestamps are wall clock)."""
    if monotonic_s is None:
        return None
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def _parent(session_id: str) -> Any:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    tid, sid = call_ids(session_id)
    ctx = SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def start_call(session_id: str, **attrs: Any) -> Any:
    """Supervisor: the call's root span (ids from :func:`call_ids`); None when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry.context import Context

    token = _forced.set(call_ids(session_id))
    try:
        span = _tracer.start_span("call", context=Context(),
                                  attributes={"va.session_id": session_id, **attrs})
    finally:
        _forced.reset(token)
    return span


def end(span: Any, at: float | None = None, **attrs: Any) -> None:
    """End ``span`` (None: nothing), optionally at a ``time.monotonic()`` reading, with attributes."""
    if span is None:
        return
    with contextlib.suppress(Exception):
        if attrs:
            span.set_attributes(attrs)
        span.end(end_time=_wall_ns(at))


def start_child(session_id: str, name: str, at: float | None = None, **attrs: Any) -> Any:
    """A span under the call's span, from any process (None when tracing is off)."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=_parent(session_id), start_time=_wall_ns(at),
                              attributes={"va.session_id": session_id, **attrs})


def event(span: Any, name: str, at: float | None = None, **attrs: Any) -> None:
    if span is None:
        return
    with contextlib.suppress(Exception):
        span.add_event(name, attributes=attrs, timestamp=_wall_ns(at))


@contextlib.contextmanager
def child(session_id: str, name: str, **attrs: Any) -> Iterator[Any]:
    """``with child(sid, "tool_call", name=...) as span:`` — a span around a block (errors recorded)."""
    span = start_child(session_id, name, **attrs)
    if span is None:
        yield None
        return
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) hex of the current span, if tracing is on and one is current."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
