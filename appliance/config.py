"""Typed appliance configuration: a TOML file plus ``VA_<SECTION>_<KEY>`` environment overrides.

Every section is a frozen dataclass; the loader checks each value against the field's type and
raises :class:`ConfigError` naming the key (``model.chunk_ms``) and the expected form, so an operator
sees exactly which line of ``/etc/voice-appliance/appliance.toml`` is wrong. Unknown keys are errors
too (a typo must not silently fall back to a default).

Environment overrides: ``VA_MODEL_API_KEY=…`` sets ``[model] api_key``. Section names are single
words, so the first ``_`` after ``VA_`` separates section and key. Values are parsed as TOML literals
when possible (``VA_SHARDS_COUNT=4``, ``VA_API_CORS=["a"]``) and taken as plain strings otherwise.
Secrets may also be given as ``*_file`` keys that name a file (systemd ``LoadCredential`` puts them in
``$CREDENTIALS_DIRECTORY``; a relative ``*_file`` path is resolved there first).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import socket
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.model_profiles import BEHAVIORS, SCHEDULINGS, model_profile, proactive_audio_always_on

DEFAULT_CONFIG_PATH = Path("/etc/voice-appliance/appliance.toml")
ENV_PREFIX = "VA_"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong form, or out of range. The message names the key."""


# Field metadata of secret-bearing keys: `config show` prints them as "***" (redacted_dict). A key whose
# name says secret/key/password/token but carries no marker fails tests/unit/test_config_redaction.py.
SECRET: dict[str, Any] = {"secret": "value"}
SECRET_IN_URL: dict[str, Any] = {"secret": "url"}  # a URL whose user:password part is a secret


@dataclass(frozen=True)
class ApiConfig:
    """The public HTTPS session API and demo page served by the supervisor."""

    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert_file: str = ""  # empty: plain HTTP (behind a TLS-terminating load balancer or for tests)
    tls_key_file: str = ""
    tls_reload_seconds: float = 10.0  # how often the certificate files are checked for a renewal
    public_host: str = ""  # host name/IP callers reach; used in ICE server URLs
    max_body_bytes: int = 65536
    demo_page: bool = True
    cors_origins: list[str] = field(default_factory=list)
    box_id: str = ""  # names this box in session ids ("<box_id>.<random>"); empty: from the hostname
    trusted_proxies: list[str] = field(default_factory=list)  # CIDRs allowed to set X-Forwarded-For
    private_host: str = "127.0.0.1"  # management address: agent check, /metrics (private network)
    metrics_host: str = ""  # /metrics; empty: private_host
    metrics_port: int = 9641  # 0: off
    agent_check_host: str = ""  # HAProxy agent-check responder ("up N%", "drain"); empty: private_host
    agent_check_port: int = 9642  # 0: off
    drain_timeout_seconds: int = 300  # drain: wait this long for live calls to end (then migrate/stop)
    migrate_grace_seconds: int = 30  # force-migrate: end a caller's old leg after this if it never resumes
    create_timeout_seconds: float = 15.0  # POST /v1/sessions: control-plane setup limit (then 504)
    # A session whose caller has not connected (no Janus webrtcup) this long after the 201 is torn down:
    # it would otherwise hold a slot, a Janus handle and a Live session for redis.active_ttl_seconds.
    connect_timeout_seconds: float = 20.0
    # Read deadlines (docs/security.md "Read deadlines"): a connection must deliver its request head
    # within header_timeout_seconds and its body within body_timeout_seconds, an idle keep-alive
    # connection is closed after keepalive_timeout_seconds; at most max_connections at once.
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0
    keepalive_timeout_seconds: float = 5.0
    max_connections: int = 2048
    # The operator's admin API and console (/v1/admin/…, /admin/): the management address only.
    admin_host: str = ""  # empty: private_host
    admin_port: int = 9643  # 0: off


@dataclass(frozen=True)
class AuthConfig:
    """RS256 JWT verification of callers' tokens."""

    jwt_public_key_file: str = ""
    jwt_private_key_file: str = ""  # only for `voice-appliance token` (development tokens)
    audience: str = "voice-appliance"
    issuer: str = ""
    required_scope: str = "voice:session"
    max_ttl_seconds: int = 900
    leeway_seconds: int = 30
    # HMAC key of the per-session tokens the create response carries (appliance/session_token.py); a
    # credential shared by the fleet so any box verifies them. Empty: a random key per process (one box).
    session_token_key_file: str = ""
    session_token_ttl_seconds: int = 600


@dataclass(frozen=True)
class ModelConfig:
    """The Gemini Live model, or the built-in emulator when no API key is configured."""

    api_key: str = field(default="", metadata=SECRET)
    api_key_file: str = ""
    model: str = "gemini-2.5-flash-native-audio-preview-09-2025"
    voice: str = "Puck"
    language: str = "en-US"
    system_instruction: str = "You are a helpful voice assistant. Keep answers short."
    base_url: str = ""  # empty: Google's endpoint with an API key, else the local emulator
    api_version: str = "v1beta"
    ca_file: str = ""  # extra CA to trust (the emulator's test CA)
    chunk_ms: int = 40
    context_compression: bool = True
    transcription: bool = True
    max_retries: int = 5
    retry_base_seconds: float = 0.2
    retry_max_seconds: float = 5.0
    greeting: str = "Hello! You are talking with an AI assistant. How can I help?"  # "" = none
    hold_prompt: str = "Please hold on, I am reconnecting."  # played when the model is unreachable
    degraded_retry_seconds: float = 10.0  # re-open a degraded Live session this often
    # Keypad digits (RFC 4733 DTMF) go to the model as one text message per entry: sent at `#` (kept in
    # the text), at 32 digits, or after this long without a new digit (workers/ai/dtmf.py says why 1 s).
    dtmf_flush_ms: int = 1000
    # Function calling: declarations (a JSON list of FunctionDeclaration objects) go into the Live setup;
    # each call the model makes is POSTed as {session_id, name, args, call_id} to tools_url and the JSON
    # answer (or an error result) goes back as the tool_response (workers/ai/tools.py).
    tools_file: str = ""
    tools_url: str = ""  # http(s) endpoint; empty: every tool call is answered with an error result
    tools_timeout_seconds: float = 5.0
    # HMAC-SHA256 key for tool requests: each POST carries X-VA-Signature "t=<unix>,v1=<hex of
    # HMAC(key, "<t>.<body>")>" so the endpoint knows it came from this appliance (workers/ai/tools.py).
    tools_secret: str = field(default="", metadata=SECRET)
    tools_secret_file: str = ""
    # PCI secure keypad entry (workers/ai/secure_entry.py, docs/compliance.md): with payment_url set the
    # model gets the built-in tool collect_card_number; while an entry runs the keypad digits go only to
    # payment_url (a signed POST with the tools key), never to the model, logs, journal or record.
    payment_url: str = ""
    payment_timeout_seconds: float = 10.0
    secure_entry_at_start: bool = False  # every new call starts in secure entry (a payment line)
    secure_entry_max_digits: int = 19  # the longest PAN; the entry ends there (or at #)
    secure_entry_digit_timeout_seconds: float = 5.0  # quiet after the last digit ends the entry
    secure_entry_seconds: float = 60.0  # no digit at all this long: the entry times out
    # Model routing (docs/architecture.md "Tenants and model routing"): new calls go to fallback_model
    # while the primary's breaker is open, and fallback_weight (0..1) of the others too ("80 % to Flash").
    fallback_model: str = ""
    fallback_weight: float = 0.0
    # Where the model runs: the Gemini Developer API (API key) or Vertex AI (docs/operations.md,
    # "Vertex AI"): project + location (the region that processes the audio; pinned), with a
    # service-account key (credentials_file, best a systemd credential: relative names resolve in
    # $CREDENTIALS_DIRECTORY) or an express-mode API key. allowed_locations, when set, is the only
    # regions a location may name (e.g. EU residency: ["europe-west4", "europe-west1"]).
    platform: str = "developer"
    project: str = ""
    location: str = ""
    allowed_locations: list[str] = field(default_factory=list)
    credentials_file: str = ""
    # Vertex only: the server reports which client message a handle covers (lastConsumedClientMessageIndex)
    # and a reconnect replays exactly from there (the Developer API has no such index; see architecture.md).
    transparent_resumption: bool = True
    # Gemini's proactive audio (the model may stay silent when the caller did not address it): opt-in on
    # 2.5 native audio; always on for 3.8 models — unset means on for them, false is refused there.
    proactive_audio: bool = False


@dataclass(frozen=True)
class EmulatorConfig:
    """The built-in Live emulator that stands in for Gemini when no API key is configured."""

    host: str = "127.0.0.1"
    port: int = 9443
    api_key: str = field(default="emulator-key", metadata=SECRET)
    reply: str = "echo"  # echo | tone | silence


@dataclass(frozen=True)
class ShardsConfig:
    """How sessions are spread across CPU-pinned media/AI worker pairs."""

    count: int = 0  # 0: one shard per CPU not reserved for Janus/supervisor
    slots: int = 64  # sessions per shard (capacity)
    cpu_plan: str = "auto"  # auto, or explicit "media:ai" CPU lists per shard, e.g. "1:1,2:2"
    uplink_ring_ms: int = 5000  # covers an AI worker restart (~0.6 s) with margin; 160 KB per slot
    downlink_ring_ms: int = 8000
    heartbeat_timeout_seconds: float = 2.0
    # AI workers lower their own priority by this much (os.nice, no privilege) so the deadline-driven
    # media worker on the same core wins wakeups (bench pipeline: docs/benchmarks.md). 0 = equal.
    ai_nice: int = 10


@dataclass(frozen=True)
class MediaConfig:
    """RTP and Opus in the media worker."""

    rtp_host: str = "127.0.0.1"
    rtp_port_min: int = 40000
    rtp_port_max: int = 44999
    # Floor of the adaptive jitter buffer (it grows to 3x the measured jitter plus late bonuses): 20 ms
    # cut turn-end p50 59 → 46 ms and barge-in p50 89 → 59 ms on loopback NoSIP (docs/benchmarks.md).
    jitter_target_ms: int = 20
    jitter_max_ms: int = 120
    # 0: ~55 % of complexity 5's encode CPU with the same measured speech quality (SNR, correlation,
    # log-spectral distance within 0.1 dB / 0.002 at 28 kbit/s; docs/benchmarks.md "Pipeline").
    opus_complexity: int = 0
    opus_bitrate: int = 28000
    opus_expected_loss_percent: int = 5
    rtp_timeout_ms: int = 5000  # no caller RTP for this long → EventCode.RTP_TIMEOUT (repeated)
    # SCHED_RR priority (1-99) for the media worker when allowed (root, CAP_SYS_NICE, or LimitRTPRIO= with
    # RestrictRealtime=no under systemd); otherwise it warns and runs normally. 0 = off. Pacing p99 at 40
    # sessions 6.5 ms RR vs 12-64 ms normal on a shared 2-core box (docs/benchmarks.md).
    realtime_priority: int = 1
    # Provisional barge-in: a decoded caller frame with a 10 ms half at least this loud while model audio
    # plays pauses playback in the same tick (no AI round trip); the AI worker then flushes (speech) or
    # resumes (a cough) within vad.pause_confirm_ms. -40: the bench clip's first frame (-39 in its 2nd
    # half) triggers, room noise (≤ -70 decoded) is 30 dB below (docs/benchmarks.md "Pipeline").
    # 0 = off (Silero-only barge-in).
    pause_on_speech_dbfs: float = -40.0
    # Uplink processing before the uplink ring and the playback pause (workers/media/uplink_dsp.py):
    # "off", "ns" (WebRTC noise suppression, ~1 ms/call-s) or "aec_ns_agc" (echo cancellation against the
    # downlink we send + NS + AGC, ~8.6 ms/call-s: too costly for every call within the 12 ms budget, so
    # a per-call choice, slot option "uplink_processing"). docs/benchmarks.md "Audio quality".
    uplink_processing: str = "ns"
    # Answer RFC 2198 RED to callers that offer it (Chromium does; NoSIP passes it through both ways):
    # each packet repeats the previous frame, so an isolated loss is recovered whole (bench quality:
    # PESQ-WB at 10 % loss ~3.0 → ~4.0) for about twice the caller's upstream bitrate. Verified with
    # Chromium 156 end to end (tests/supervisor/test_red_call.py).
    red: bool = True
    # Adapt the downlink Opus encoder's FEC / expected loss / bitrate to the fraction lost in the caller
    # side's RTCP receiver reports (table in workers/media/loss_policy.py; docs/operations.md).
    downlink_loss_adaptation: bool = True


@dataclass(frozen=True)
class VadConfig:
    """Silero VAD and turn-taking in the AI worker."""

    threshold: float = 0.5
    hangover_ms: int = 400
    min_speech_ms: int = 96
    energy_gate_dbfs: float = -55.0
    barge_in_ms: int = 32  # speech needed to interrupt model audio (one 32 ms VAD window)
    preroll_ms: int = 250  # audio before the detected onset sent with activity_start
    # A playback pause (media.pause_on_speech_dbfs) not confirmed as speech within this long resumes
    # where it stopped: Silero onset (20-88 ms after the first speech sample) + barge_in_ms + ticks.
    pause_confirm_ms: int = 200


@dataclass(frozen=True)
class JanusConfig:
    """The co-located Janus; its APIs never leave loopback."""

    url: str = "http://127.0.0.1:8088/janus"
    admin_url: str = "http://127.0.0.1:7088/admin"
    api_secret: str = field(default="", metadata=SECRET)
    api_secret_file: str = ""
    admin_secret: str = field(default="", metadata=SECRET)
    admin_secret_file: str = ""
    audiobridge_admin_key: str = field(default="", metadata=SECRET)
    audiobridge_admin_key_file: str = ""  # systemd credential (packaging); read with config.secret()
    keepalive_seconds: float = 25.0
    # Janus's sample event handler POSTs its RTCP media statistics here (appliance/quality.py); the
    # supervisor listens on events_host:events_port (loopback). 0: off (no caller-leg quality).
    events_host: str = "127.0.0.1"
    events_port: int = 7089
    stats_period_seconds: int = 5  # Janus events.stats_period: one media statistics event per handle


@dataclass(frozen=True)
class TurnConfig:
    """coturn with time-limited HMAC credentials (use-auth-secret)."""

    secret: str = field(default="", metadata=SECRET)
    secret_file: str = ""
    uris: list[str] = field(default_factory=list)
    ttl_seconds: int = 600  # at most 600 (refused above): how long a leaked credential works
    stun_uris: list[str] = field(default_factory=list)
    # "host:port" of the box's coturn (UDP), probed with a STUN Binding request for va_component_up
    # (appliance/probes.py); empty: not probed
    probe_address: str = ""


@dataclass(frozen=True)
class RedisConfig:
    """Session state, rate limits and breakers."""

    url: str = field(default="redis://127.0.0.1:6379/0", metadata=SECRET_IN_URL)  # when no sentinels
    sentinels: list[str] = field(default_factory=list)  # "host:port" of the Sentinels (fleet)
    sentinel_master: str = "va"  # the master name the Sentinels monitor
    sentinel_username: str = ""  # Sentinels' own ACL user, if they require AUTH
    sentinel_password_file: str = ""
    username: str = ""  # ACL user (limited to the "va:*" keys)
    password_file: str = ""  # credential file (systemd LoadCredential) with the ACL user's password
    tls: bool = False  # TLS to Redis and the Sentinels
    ca_file: str = ""  # CA that signed the Redis/Sentinel certificates (empty: system store)
    active_ttl_seconds: int = 3600
    disconnected_ttl_seconds: int = 300


@dataclass(frozen=True)
class LimitsConfig:
    """Abuse limits on the public API (appliance/ratelimit.py; docs/security.md "Limits after identity").

    Per token ``sub`` after authentication; per client IP only where there is no identity yet
    (unauthenticated paths) or the identity was refused (failed authentication)."""

    session_creates_per_minute: int = 10  # per sub
    signalling_per_minute: int = 300  # per sub: trickle, GET (the demo page polls 1/s), DELETE, refresh
    concurrent_sessions_per_sub: int = 10  # live sessions one sub may hold across the fleet; 0 = no cap
    unauthenticated_per_minute: int = 30  # per IP: /dev/token, /openapi.json
    auth_failures_per_minute: int = 30  # per IP: refused tokens; past it, 429 instead of 401


@dataclass(frozen=True)
class PathsConfig:
    """Where state, runtime files and logs live."""

    state_dir: str = "/var/lib/voice-appliance"
    run_dir: str = "/run/voice-appliance"
    instance_id: str = ""  # scopes shared-memory names; empty: derived from state_dir


@dataclass(frozen=True)
class RecordsConfig:
    """Call records in PostgreSQL, the local spool in front of it, and signed webhooks
    (appliance/records/, docs/operations.md "Call records")."""

    # libpq URI without the password (a password in it is refused at load), e.g.
    # postgresql://va@db1:5432/voice_appliance; "": off
    dsn: str = ""
    password_file: str = ""  # credential with the database password (relative: $CREDENTIALS_DIRECTORY)
    spool_dir: str = ""  # default: <paths.state_dir>/records-spool
    spool_max_bytes: int = 256 * 1024 * 1024  # per producer directory; beyond it items are dropped + counted
    spool_segment_bytes: int = 4 * 1024 * 1024
    spool_fsync_seconds: float = 1.0  # a power loss costs at most this much; a process crash nothing
    batch_items: int = 500  # items per transaction
    prices_file: str = ""  # JSON model → {"input": {MODALITY: USD per 1M tokens}, "output": {…}}
    webhook_url: str = ""  # the customer's endpoint for call.started / call.transcript / call.ended
    webhook_secret_file: str = ""  # HMAC-SHA256 key (also signs the tool-call POSTs)
    webhook_timeout_seconds: float = 5.0
    webhook_max_age_seconds: int = 86400  # retry with backoff this long, then dead-letter
    webhook_concurrency: int = 16


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"  # json | text
    frame_sample_ratio: float = 0.1  # share of per-frame debug lines written (appliance/logs.py FrameSampler)


@dataclass(frozen=True)
class ComplianceConfig:
    """Controls regulated operators rely on (docs/compliance.md)."""

    # The greeting is the AI disclosure (EU AI Act art. 50): it can only be turned off explicitly, with a
    # reason that is logged at every start, never by an empty `model.greeting`.
    ai_disclosure: bool = True
    ai_disclosure_off_reason: str = ""
    # Master key(s) for encryption at rest (appliance/compliance/atrest.py): a credential, one
    # "<id>:<base64 32 bytes>" per line, the last one current. "": <paths.state_dir>/secrets/master-key,
    # created on first start. Every box of a fleet needs the same file.
    master_key_file: str = ""
    # Audit trail checkpoints (appliance/compliance/trail.py): an Ed25519 key credential (raw 32 bytes,
    # base64). "": <paths.state_dir>/secrets/audit-signing-key, created on first start.
    audit_signing_key_file: str = ""
    audit_checkpoint_entries: int = 1000  # sign a checkpoint at least every this many entries
    audit_checkpoint_seconds: float = 300.0  # … and at least this often while entries arrive
    # Retention per data class, whole days (appliance/compliance/retention.py; `voice-appliance records
    # purge`, daily timer, and the supervisor every purge_interval_seconds; 0 there: the timer only)
    retention_days_audit: int = 2190  # six years (HIPAA)
    retention_days_transcripts: int = 90
    retention_days_call_metadata: int = 400
    retention_days_recordings: int = 90
    purge_interval_seconds: float = 3600.0
    # Call recording of the default tenant (a [tenants.<name>] table sets its own `recording`):
    # off | audio | transcript | audio_and_transcript; audio is recorded by workers/ai/recording.py
    recording: str = "off"
    # Consent capture (GDPR art. 6/7; workers/ai/consent.py): the default tenant's policy and every
    # tenant's without its own `consent`. opt_in: after the greeting the caller hears consent_prompt and
    # must press 1 before anything of the call reaches the model (any other key or the timeout: the
    # goodbye plays and the call ends); announce: the prompt plays, consent is recorded as announced.
    consent: str = "none"  # none | announce | opt_in
    consent_prompt: str = ("Before we continue: this call is answered by an AI assistant, and what you say "
                           "is processed to help you. Press 1 if you agree. Press any other key to end "
                           "the call.")
    consent_purposes: list[str] = field(default_factory=lambda: ["ai_assistant"])
    consent_refused_message: str = "Without your agreement we cannot continue. Thank you, goodbye."
    consent_timeout_seconds: float = 15.0  # for the answer, counted once the prompt has played


TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
DEFAULT_TENANT = "default"
RECORDING_POLICIES = ("off", "audio", "transcript", "audio_and_transcript")
CONSENT_POLICIES = ("none", "announce", "opt_in")


@dataclass(frozen=True)
class TenantConfig:
    """One ``[tenants.<name>]`` table: any ``[model]`` key (the tenant's own model, Vertex project/region,
    voice, language, system prompt, tools, greeting, routing), plus limits and policies.

    ``model`` is the top-level ``[model]`` with the tenant's keys applied (what every call of the
    tenant runs with); ``overrides`` are the keys as written (``replace``/``config show`` keep them).
    ``recording`` (audio: workers/ai/recording.py); ``consent`` (unset: ``compliance.consent``) and
    ``consent_prompt`` ("": ``compliance.consent_prompt``) are acted on by workers/ai/consent.py.
    """

    name: str
    model: ModelConfig
    overrides: dict[str, Any] = field(default_factory=dict)
    max_sessions: int = 0  # concurrent calls of this tenant on this box; 0 = no limit but the box's
    recording: str = "off"  # off | audio | transcript | audio_and_transcript (audio: recorded)
    consent: str = "none"  # none | announce | opt_in (unset in the table: compliance.consent)
    consent_prompt: str = ""  # in the tenant's language; "": compliance.consent_prompt


_TENANT_KEYS = {"max_sessions": int, "recording": str, "consent": str, "consent_prompt": str}
# Keys that say where the model runs: a tenant that sets one gets its own Live client settings.
ENDPOINT_KEYS = frozenset({"platform", "project", "location", "credentials_file", "api_key", "api_key_file",
                           "base_url", "ca_file", "api_version"})


@dataclass(frozen=True)
class OtelConfig:
    """OpenTelemetry traces (appliance/tracing.py): off unless an OTLP/HTTP endpoint is set."""

    endpoint: str = ""  # collector base URL, e.g. http://127.0.0.1:4318 (/v1/traces is appended)
    service_name: str = "voice-appliance"
    timeout_seconds: float = 5.0


@dataclass(frozen=True)
class BreakerConfig:
    """The model circuit breaker (appliance/breaker.py): shared by every AI worker of the box and, through
    Redis, of the fleet. ``enabled = false`` lets every call retry on its own (the old behaviour)."""

    enabled: bool = True
    failure_threshold: int = 3  # consecutive connect/setup failures that open it
    reset_seconds: float = 30.0  # open this long, then one half-open probe
    success_threshold: int = 2  # good probes that close it
    probe_timeout_seconds: float = 15.0  # a probe that never reports back frees the lease after this


@dataclass(frozen=True)
class DegradeConfig:
    """What a caller hears while the model is unreachable (workers/ai/degrade.py, workers/ai/ivr.py;
    docs/operations.md "When the model is down"). ``enabled = false``: the old "please hold" loop."""

    enabled: bool = True
    wait_seconds: float = 20.0  # tier 1: the spoken notice, then wait this long for the model
    menu_timeout_seconds: float = 8.0  # no key after the menu: repeat (twice), then wait again
    digit_timeout_seconds: float = 6.0  # a pause this long ends a callback-number entry
    max_hold_seconds: float = 300.0  # the whole episode, then goodbye and the call ends
    # option 3 of the menu: where a person takes over (a number or URL, sent in the transfer event and
    # webhook); "": no option 3 (the menu does not offer it)
    transfer_target: str = ""
    # per-language prompt texts: a TOML file of tables named by language ([de-DE] trouble = "…"); keys
    # as workers/ai/degrade.py PROMPTS_EN; a missing key falls back to the English text
    prompts_file: str = ""
    # operator-recorded prompts: <audio_dir>/<language>/<key>.wav (16-bit mono WAV; digit-0 … digit-9
    # for the read-back) replace the synthesised ones
    audio_dir: str = ""


@dataclass(frozen=True)
class Config:
    """The whole appliance configuration."""

    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    janus: JanusConfig = field(default_factory=JanusConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    otel: OtelConfig = field(default_factory=OtelConfig)
    compliance: ComplianceConfig = field(default_factory=ComplianceConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)

    @property
    def uses_emulator(self) -> bool:
        """True when no Gemini API key is configured: the built-in emulator is the model."""
        return not secret(self.model.api_key, self.model.api_key_file)


_RANGES: dict[str, tuple[float, float]] = {
    "api.port": (1, 65535),
    "api.max_body_bytes": (1024, 16 * 1024 * 1024),
    "api.metrics_port": (0, 65535),
    "api.agent_check_port": (0, 65535),
    "janus.events_port": (0, 65535),
    "log.frame_sample_ratio": (0, 1),
    "otel.timeout_seconds": (0.1, 60),
    "janus.stats_period_seconds": (1, 60),
    "api.admin_port": (0, 65535),
    "records.spool_max_bytes": (1 << 16, 1 << 40),
    "records.spool_segment_bytes": (1 << 12, 1 << 30),
    "records.spool_fsync_seconds": (0.01, 60),
    "records.batch_items": (1, 10000),
    "records.webhook_timeout_seconds": (0.1, 60),
    "records.webhook_max_age_seconds": (60, 7 * 86400),
    "records.webhook_concurrency": (1, 256),
    "api.drain_timeout_seconds": (0, 86400),
    "api.migrate_grace_seconds": (1, 3600),
    "api.create_timeout_seconds": (1, 120),
    "api.connect_timeout_seconds": (1, 600),
    "api.header_timeout_seconds": (0.5, 300),
    "api.body_timeout_seconds": (0.5, 300),
    "api.keepalive_timeout_seconds": (0.5, 300),
    "api.max_connections": (16, 1000000),
    "auth.session_token_ttl_seconds": (60, 900),
    "auth.max_ttl_seconds": (60, 900),
    "auth.leeway_seconds": (0, 300),
    "model.chunk_ms": (20, 50),
    "model.max_retries": (0, 100),
    "breaker.failure_threshold": (1, 1000),
    "breaker.reset_seconds": (0.1, 3600),
    "breaker.success_threshold": (1, 100),
    "breaker.probe_timeout_seconds": (0.1, 600),
    "degrade.wait_seconds": (0.1, 3600),
    "degrade.menu_timeout_seconds": (1, 120),
    "degrade.digit_timeout_seconds": (1, 120),
    "degrade.max_hold_seconds": (1, 86400),
    "emulator.port": (1, 65535),
    "shards.count": (0, 256),
    "shards.slots": (1, 4096),
    "shards.uplink_ring_ms": (200, 60000),
    "shards.downlink_ring_ms": (200, 120000),
    "media.rtp_port_min": (1024, 65535),
    "media.rtp_port_max": (1024, 65535),
    "media.jitter_target_ms": (20, 60),
    "media.jitter_max_ms": (20, 1000),
    "media.opus_complexity": (0, 10),
    "media.opus_bitrate": (6000, 510000),
    "media.opus_expected_loss_percent": (0, 100),
    "media.rtp_timeout_ms": (200, 600000),
    "media.realtime_priority": (0, 99),
    "shards.ai_nice": (0, 19),
    "vad.threshold": (0.0, 1.0),
    "vad.hangover_ms": (0, 5000),
    "vad.min_speech_ms": (0, 2000),
    "vad.barge_in_ms": (0, 2000),
    "vad.preroll_ms": (0, 2000),
    "vad.pause_confirm_ms": (20, 1000),
    "media.pause_on_speech_dbfs": (-90, 0),
    "model.degraded_retry_seconds": (0.5, 3600),
    "model.dtmf_flush_ms": (100, 10000),
    "model.tools_timeout_seconds": (0.1, 300),
    "model.fallback_weight": (0.0, 1.0),
    "tenants.max_sessions": (0, 100000),
    "turn.ttl_seconds": (60, 600),
    "api.tls_reload_seconds": (0.1, 3600),
    "limits.session_creates_per_minute": (1, 100000),
    "limits.signalling_per_minute": (1, 100000),
    "limits.concurrent_sessions_per_sub": (0, 100000),
    "limits.unauthenticated_per_minute": (1, 100000),
    "limits.auth_failures_per_minute": (1, 100000),
    "model.secure_entry_max_digits": (1, 32),
    "model.payment_timeout_seconds": (0.1, 120),
    "model.secure_entry_digit_timeout_seconds": (0.5, 60),
    "model.secure_entry_seconds": (1, 600),
    "compliance.consent_timeout_seconds": (1, 600),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "emulator.reply": ("echo", "tone", "silence"),
    "log.format": ("json", "text"),
    "log.level": ("debug", "info", "warning", "error", "critical"),
    "model.api_version": ("v1alpha", "v1beta", "v1", "v1beta1"),
    "model.platform": ("developer", "vertex"),
    "media.uplink_processing": ("off", "ns", "aec_ns_agc"),
    "tenants.recording": RECORDING_POLICIES,
    "compliance.recording": RECORDING_POLICIES,
    "tenants.consent": CONSENT_POLICIES,
    "compliance.consent": CONSENT_POLICIES,
}


BOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


def box_id(cfg: Config) -> str:
    """This box's name in session ids: ``api.box_id``, else the hostname made to fit :data:`BOX_ID_RE`.

    The load balancer routes ``/v1/sessions/<box_id>.<random>…`` to the server named ``<box_id>``, so
    every box of a fleet needs a distinct one (hostnames are, on Hetzner and in the inventory).
    """
    if cfg.api.box_id:
        return cfg.api.box_id
    return derive_box_id(socket.gethostname())


def derive_box_id(hostname: str) -> str:
    """``box-1.example.com`` → ``box-1``; anything outside ``[a-z0-9-]`` becomes ``-``."""
    name = re.sub(r"[^a-z0-9-]", "-", hostname.split(".")[0].lower()).strip("-")[:31].rstrip("-")
    return name or "box"


def private_host(cfg: Config, explicit: str) -> str:
    """``explicit`` (``api.metrics_host`` / ``api.agent_check_host``), else ``api.private_host``."""
    return explicit or cfg.api.private_host


def credential_path(file_name: str) -> Path:
    """Where a ``*_file`` key points: a relative name resolves in $CREDENTIALS_DIRECTORY (systemd's
    ``LoadCredential=``) when it exists there, else as given."""
    path = Path(file_name)
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and cred_dir and (Path(cred_dir) / path).exists():
        return Path(cred_dir) / path
    return path


def secret(value: str, file_name: str) -> str:
    """Return a secret given inline or through a file (relative names resolve in $CREDENTIALS_DIRECTORY)."""
    if value:
        return value
    if not file_name:
        return ""
    path = credential_path(file_name)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {file_name!r}: {exc.strerror}") from exc


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if isinstance(tp, types.UnionType):
        raise ConfigError(f"{key}: unsupported type")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _section_types() -> dict[str, type]:
    """The single-table sections (``[tenants.<name>]`` is a table of tables, built by _build_tenants)."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "tenants"}


def _check_value(full: str, rule: str, tp: Any, value: Any) -> Any:
    value = _coerce(full, tp, value)
    if rule in _RANGES:
        lo, hi = _RANGES[rule]
        if not lo <= value <= hi:
            raise ConfigError(f"{full}: expected a value from {lo:g} to {hi:g}, got {value!r}")
    if rule in _CHOICES and value not in _CHOICES[rule]:
        raise ConfigError(f"{full}: expected one of {', '.join(_CHOICES[rule])}, got {value!r}")
    return value


def _build_section(name: str, cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    values = {key: _check_value(f"{name}.{key}", f"{name}.{key}", hints[key], value)
              for key, value in data.items()}
    return cls(**values)


def _build_tenants(data: Any, model: ModelConfig) -> dict[str, TenantConfig]:
    """``[tenants.<name>]`` tables → TenantConfig, each key checked like its ``[model]`` twin."""
    if not isinstance(data, dict):
        raise ConfigError("tenants: expected tables [tenants.<name>]")
    hints = typing.get_type_hints(ModelConfig)
    out: dict[str, TenantConfig] = {}
    for name, table in data.items():
        where = f"tenants.{name}"
        if not isinstance(name, str) or not TENANT_NAME_RE.match(name) or name == DEFAULT_TENANT:
            raise ConfigError(f"{where}: expected a name matching {TENANT_NAME_RE.pattern} other than "
                              f"{DEFAULT_TENANT!r} (the top-level [model] is the default tenant)")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table [tenants.{name}]")
        unknown = sorted(set(table) - set(hints) - set(_TENANT_KEYS))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: the [model] keys and "
                              f"{', '.join(sorted(_TENANT_KEYS))})")
        over = {k: _check_value(f"{where}.{k}", f"model.{k}", hints[k], v)
                for k, v in table.items() if k in hints}
        extra = {k: _check_value(f"{where}.{k}", f"tenants.{k}", _TENANT_KEYS[k], v)
                 for k, v in table.items() if k in _TENANT_KEYS}
        base = dataclasses.asdict(model)
        if "model" in over:  # a tenant's own model brings its own model-dependent defaults
            base["proactive_audio"] = proactive_audio_always_on(model_profile(str(over["model"])))
        if over.get("platform", model.platform) != model.platform:  # nothing of the other platform leaks in
            for k in ("project", "location", "credentials_file", "api_key", "api_key_file", "base_url"):
                base[k] = type(base[k])()
        out[name] = TenantConfig(name=name, model=ModelConfig(**{**base, **over}), overrides=dict(table),
                                 **extra)
    return out


def tenant(cfg: Config, name: str | None) -> TenantConfig:
    """The tenant a call runs as: ``name`` from the caller's token, or the default (top-level [model]).
    KeyError for a name the config does not define (the API answers 403 before this)."""
    if not name or name == DEFAULT_TENANT:
        return TenantConfig(name=DEFAULT_TENANT, model=cfg.model, recording=cfg.compliance.recording)
    return cfg.tenants[name]


def load_for_cli(path: str | None) -> Config | None:
    """The config for a command-line tool, or None after printing why it does not load (the tool then
    exits 2). ``path=None``: as :func:`load_config`."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: typing.Mapping[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Load the TOML file (if it exists or was named), apply ``VA_*`` environment overrides, validate.

    ``path=None`` uses ``$VA_CONFIG`` or /etc/voice-appliance/appliance.toml when present, else defaults.
    ``overrides`` (section → key → value) is applied last; tests and the CLI use it.
    """
    env = os.environ if env is None else env
    data: dict[str, dict[str, Any]] = {}
    explicit = path is not None or "VA_CONFIG" in env
    cfg_path = Path(path) if path is not None else Path(env.get("VA_CONFIG", str(DEFAULT_CONFIG_PATH)))
    if cfg_path.exists():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cfg_path}: not valid TOML: {exc}") from exc
    elif explicit:
        raise ConfigError(f"config file {cfg_path} does not exist")
    sections = _section_types()
    tenants_data = data.pop("tenants", {})
    for name, value in data.items():
        if name not in sections:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(sections)}, tenants)")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table [{name}]")
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var == "VA_CONFIG" or var.startswith("VA_LOG_"):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section in sections and key:
            data.setdefault(section, {})[key] = _parse_env_value(raw)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    _model_defaults(data.setdefault("model", {}), ModelConfig.model)
    built = {name: _build_section(name, cls, data.get(name, {})) for name, cls in sections.items()}
    cfg = Config(**built, tenants=_build_tenants(tenants_data, built["model"]))
    _check_cross_field(cfg)
    return cfg


def is_development(cfg: Config) -> bool:
    """A development config holds the JWT *private* key (`voice-appliance run` and tests mint their own
    tokens); a production box only ever has the public key of the callers' identity provider."""
    return bool(cfg.auth.jwt_private_key_file)


def production_problems(cfg: Config) -> list[str]:
    """What `config check` refuses in a production config (loading still works: tests and tools)."""
    problems = []
    if not is_development(cfg) and not cfg.auth.issuer:
        problems.append("auth.issuer: required in production — the iss claim your identity provider puts "
                        "in callers' tokens (without it a token from any issuer sharing the key would pass)")
    return problems


def _check_cross_field(cfg: Config) -> None:
    if cfg.media.rtp_port_min > cfg.media.rtp_port_max:
        raise ConfigError(
            f"media.rtp_port_min: expected ≤ media.rtp_port_max ({cfg.media.rtp_port_max}), "
            f"got {cfg.media.rtp_port_min}"
        )
    if cfg.api.box_id and not BOX_ID_RE.match(cfg.api.box_id):
        raise ConfigError(f"api.box_id: expected {BOX_ID_RE.pattern} (lowercase letters, digits, '-'; "
                          f"at most 31), got {cfg.api.box_id!r}")
    for i, net in enumerate(cfg.api.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ConfigError(f"api.trusted_proxies[{i}]: expected an address or CIDR, got {net!r}") from exc
    for i, addr in enumerate(cfg.redis.sentinels):
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"redis.sentinels[{i}]: expected \"host:port\", got {addr!r}")
    if cfg.turn.probe_address:
        from appliance.probes import parse_address

        try:
            parse_address(cfg.turn.probe_address)
        except ValueError as exc:
            raise ConfigError(f"turn.probe_address: {exc}") from None
    if cfg.redis.sentinels and not cfg.redis.sentinel_master:
        raise ConfigError("redis.sentinel_master: required when redis.sentinels is set")
    if bool(cfg.api.tls_cert_file) != bool(cfg.api.tls_key_file):
        raise ConfigError("api.tls_cert_file: expected both tls_cert_file and tls_key_file, or neither")
    c = cfg.compliance
    if not c.ai_disclosure and not c.ai_disclosure_off_reason.strip():
        raise ConfigError("compliance.ai_disclosure_off_reason: required when "
                          "compliance.ai_disclosure = false (it is logged at every start)")
    _check_model(cfg, cfg.model, "model")
    for t in cfg.tenants.values():
        try:
            _check_model(cfg, t.model, f"tenants.{t.name}")
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith("tenants.") else f"tenants.{t.name}: {msg}") from None
    if cfg.degrade.prompts_file:
        load_degrade_prompts(cfg.degrade.prompts_file)
    for key, u in (("records.webhook_url", cfg.records.webhook_url),):
        if u and not re.match(r"^https?://[^/\s?#]+(/\S*)?$", u):
            raise ConfigError(f"{key}: expected an http:// or https:// URL, got {u!r}")
    if cfg.records.prices_file:
        from appliance.records.usage import load_prices

        load_prices(cfg.records.prices_file)
    if cfg.records.dsn and not re.match(r"^postgres(ql)?://", cfg.records.dsn):
        raise ConfigError(f"records.dsn: expected a postgresql:// URI, got {cfg.records.dsn!r}")
    if cfg.records.dsn and re.match(r"^postgres(ql)?://[^/@]*:[^/@]*@", cfg.records.dsn):
        raise ConfigError("records.dsn: put the password in records.password_file, not in the URI")


def _check_model(cfg: Config, m: ModelConfig, where: str) -> None:
    """What a model section (top-level or a tenant's merged one) must satisfy beyond single keys."""
    if cfg.compliance.ai_disclosure and not m.greeting.strip():
        raise ConfigError(f"{where}.greeting: empty, but the greeting is the AI disclosure every caller "
                          "hears; give one, or set compliance.ai_disclosure = false with "
                          "compliance.ai_disclosure_off_reason")
    for key, url in (("tools_url", m.tools_url), ("payment_url", m.payment_url)):
        if url and not re.match(r"^https?://[^/\s?#]+(/\S*)?$", url):
            raise ConfigError(f"{where}.{key}: expected an http:// or https:// URL, got {url!r}")
    if m.secure_entry_at_start and not m.payment_url:
        raise ConfigError(f"{where}.secure_entry_at_start: needs {where}.payment_url (where the digits go)")
    if m.tools_file:
        load_tool_declarations(m.tools_file, f"{where}.tools_file")
    if m.fallback_weight > 0 and not m.fallback_model:
        raise ConfigError(f"{where}.fallback_weight: needs {where}.fallback_model")
    if m.fallback_model and m.fallback_model == m.model:
        raise ConfigError(f"{where}.fallback_model: the same as {where}.model ({m.model!r})")
    check_model_platform(m)
    if not m.proactive_audio and proactive_audio_always_on(model_profile(m.model)):
        raise ConfigError(f"{where}.proactive_audio: {m.model!r} always uses proactive audio; remove "
                          "proactive_audio = false (or choose a model where it is optional)")


def _model_defaults(section: dict[str, Any], inherited_model: str) -> None:
    """Defaults that depend on the model chosen: proactive audio is on for a model that always has it."""
    if "proactive_audio" not in section:
        model = section.get("model", inherited_model)
        section["proactive_audio"] = proactive_audio_always_on(model_profile(str(model)))


_LOCATION = re.compile(r"^[a-z]+(-[a-z]+)*[0-9]*$|^global$")


def check_model_platform(m: ModelConfig) -> None:
    """Vertex needs a project and a region (inside ``allowed_locations`` when set) and credentials."""
    if m.platform != "vertex":
        if m.project or m.location or m.credentials_file:
            raise ConfigError("model.project: only used with model.platform = \"vertex\"")
        return
    if not m.location or not _LOCATION.match(m.location):
        raise ConfigError("model.location: expected a Vertex AI region such as europe-west4, "
                          f"got {m.location!r}")
    if m.allowed_locations and m.location not in m.allowed_locations:
        raise ConfigError(f"model.location: {m.location!r} is outside model.allowed_locations "
                          f"({', '.join(m.allowed_locations)}); audio would be processed in a region "
                          "this box may not use")
    express = bool(m.api_key or m.api_key_file)
    if express and m.credentials_file:
        raise ConfigError("model.credentials_file: give a service-account key or an express-mode API key, "
                          "not both")
    if not express and not m.credentials_file:
        raise ConfigError("model.credentials_file: Vertex AI needs a service-account key file "
                          "(or model.api_key for express mode)")
    if not express and not m.project:
        raise ConfigError("model.project: Vertex AI with a service account needs the project id")


_TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
# FunctionDeclaration fields of the Live API (either casing), see google.genai.types.FunctionDeclaration.
_TOOL_KEYS = {"name", "description", "parameters", "parametersJsonSchema", "parameters_json_schema",
              "response", "responseJsonSchema", "response_json_schema", "behavior",
              "scheduling"}  # ours, not a declaration field: FunctionResponse.scheduling (live/tooling.py)
def _read_file(path: str | os.PathLike[str], key: str, parse: typing.Callable[[str], Any],
               error: type[Exception], kind: str) -> Any:
    """A file a config key names, parsed; a :class:`ConfigError` naming ``key`` if unreadable or bad."""
    try:
        return parse(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {str(path)!r}: {exc.strerror}") from None
    except (UnicodeDecodeError, error) as exc:
        raise ConfigError(f"{key}: {str(path)!r} is not valid {kind}: {exc}") from None


MAX_TOOLS = 128


def load_tool_declarations(path: str | os.PathLike[str],
                           key: str = "model.tools_file") -> list[dict[str, Any]]:
    """Read ``model.tools_file``: a JSON list of function declarations (``{"name", "description",
    "parameters"}`` as in the Gemini API). Checked here, at config load, so a bad file fails the start
    with the key named instead of every call's Live setup failing later."""
    data = _read_file(path, key, json.loads, json.JSONDecodeError, "JSON")
    if isinstance(data, dict) and isinstance(data.get("functionDeclarations"), list):
        data = data["functionDeclarations"]  # a whole Tool object is accepted too
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{key}: expected a non-empty JSON list of function declarations")
    if len(data) > MAX_TOOLS:
        raise ConfigError(f"{key}: at most {MAX_TOOLS} function declarations, got {len(data)}")
    seen: set[str] = set()
    for i, d in enumerate(data):
        where = f"{key}[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected an object, got {d!r:.80}")
        unknown = sorted(set(d) - _TOOL_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(_TOOL_KEYS))})")
        name = d.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise ConfigError(f"{where}.name: expected a name of letters, digits, _ . : - (max 64, not "
                              f"starting with a digit), got {name!r}")
        if name in seen:
            raise ConfigError(f"{where}.name: duplicate function name {name!r}")
        seen.add(name)
        if not isinstance(d.get("description", ""), str):
            raise ConfigError(f"{where}.description: expected a string")
        for k, allowed in (("behavior", BEHAVIORS), ("scheduling", SCHEDULINGS)):
            if k in d and (not isinstance(d[k], str) or d[k].upper() not in allowed):
                raise ConfigError(f"{where}.{k}: expected one of {', '.join(allowed)}, got {d[k]!r}")
        for k in ("parameters", "parametersJsonSchema", "parameters_json_schema", "response",
                  "responseJsonSchema", "response_json_schema"):
            if k in d and not isinstance(d[k], dict):
                raise ConfigError(f"{where}.{k}: expected a JSON object (a schema)")
    return data


_LANG_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def load_degrade_prompts(path: str | os.PathLike[str],
                         key: str = "degrade.prompts_file") -> dict[str, dict[str, str]]:
    """Read ``degrade.prompts_file``: TOML tables named by language, each prompt key → text (keys of
    ``workers.ai.degrade.PROMPT_KEYS``). Checked at config load so a typo fails the start, not a caller."""
    from workers.ai.degrade import PROMPT_KEYS  # the prompt table's owner (a pure module)

    data = _read_file(path, key, tomllib.loads, tomllib.TOMLDecodeError, "TOML")
    out: dict[str, dict[str, str]] = {}
    for lang, table in data.items():
        if not _LANG_TAG.match(lang) or not isinstance(table, dict):
            raise ConfigError(f"{key}: expected tables named by language ([de-DE]), got {lang!r}")
        for k, text in table.items():
            if k not in PROMPT_KEYS:
                raise ConfigError(f"{key}: [{lang}].{k}: unknown prompt (known: {', '.join(PROMPT_KEYS)})")
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{key}: [{lang}].{k}: expected a non-empty string")
        out[lang] = dict(table)
    return out


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with some keys of some sections replaced (validated like a file)."""
    merged = {
        name: {**dataclasses.asdict(getattr(cfg, name)), **sections.get(name, {})}
        for name in _section_types()
    }
    if "model" in sections.get("model", {}) and "proactive_audio" not in sections["model"]:
        del merged["model"]["proactive_audio"]  # the new model's default
        _model_defaults(merged["model"], ModelConfig.model)
    built = {name: _build_section(name, cls, merged[name]) for name, cls in _section_types().items()}
    tables = {n: t.overrides for n, t in cfg.tenants.items()}
    tables.update(sections.get("tenants", {}))  # a tenant given here replaces its whole table
    out = Config(**built, tenants=_build_tenants(tables, built["model"]))
    _check_cross_field(out)
    return out


def to_toml_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as plain section dicts (secrets included: `run` writes its generated config with it)."""
    out: dict[str, Any] = {name: dataclasses.asdict(getattr(cfg, name)) for name in _section_types()}
    out["tenants"] = {n: dict(t.overrides) for n, t in cfg.tenants.items()}
    return out


REDACTED = "***"
_URL_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


def secret_fields() -> dict[str, str]:
    """``section.key`` → kind ("value" or "url") of every secret-bearing key, from the field metadata."""
    out: dict[str, str] = {}
    for name, cls in _section_types().items():
        for f in dataclasses.fields(cls):
            kind = f.metadata.get("secret")
            if kind:
                out[f"{name}.{f.name}"] = kind
    return out


def redacted_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """:func:`to_toml_dict` with every secret replaced by "***" (for `voice-appliance config show`)."""
    out = to_toml_dict(cfg)
    for full, kind in secret_fields().items():
        section, key = full.split(".", 1)
        value = out[section].get(key)
        if not value:
            continue
        if kind == "url":
            out[section][key] = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", value)
        else:
            out[section][key] = REDACTED
    model_secrets = {k.split(".", 1)[1]: kind for k, kind in secret_fields().items()
                     if k.startswith("model.")}
    for table in out["tenants"].values():  # a tenant's keys are [model] keys
        for key, kind in model_secrets.items():
            if table.get(key):
                table[key] = (_URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", table[key])
                              if kind == "url" else REDACTED)
    return out
