"""`voice-appliance supervisor`: the control plane in one asyncio process.

It owns, in start-up order:

1. the CPU plan (``appliance.cpuplan``) — the supervisor itself runs on Janus's cores;
2. one shared-memory segment per shard — adopted, with the workers and calls it carries, when a
   previous supervisor of this instance left them running (its crash, or ``voice-appliance restart``);
   otherwise stale ones are removed and fresh ones created (docs/architecture.md "Supervisor restart
   and adoption");
3. admission/placement (``appliance.placement``) and the session service (``appliance.sessions``:
   Janus, Redis state, slot activation);
4. the arbiter (``appliance.arbiter``): media + AI worker per shard, pinned, restarted, watched;
5. the public session API and demo page (``appliance.api.create_app`` on uvicorn), /metrics on a
   loopback port, the HAProxy agent check, and sd_notify READY/WATCHDOG/STATUS.

Signals: SIGTERM = graceful stop (drain: refuse new calls, wait up to ``api.drain_timeout_seconds`` for
live ones to end, then stop); SIGINT = stop now (live calls are torn down); SIGHUP = rolling restart
of the workers (calls survive it: workers re-attach from shared memory); SIGUSR1 / SIGUSR2 = start /
end draining without stopping (the agent check then says ``drain`` / ``up N%``). The control socket
(``appliance.control``: `voice-appliance drain --wait --migrate`) drains, reports and force-migrates;
its ``restart`` command (`voice-appliance restart`) re-execs the supervisor in place keeping every call.

One process and one event loop, because the API handlers, the Janus long-poll, Redis and the
arbiter all just wait on I/O; the heavy work lives in the pinned workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.config import Config, ConfigError, load_config, production_problems

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")


def instance_id(cfg: Config) -> str:
    """``paths.instance_id`` or a short stable hash of the state dir (scopes shared-memory names)."""
    if cfg.paths.instance_id:
        return cfg.paths.instance_id
    digest = hashlib.sha256(os.path.abspath(cfg.paths.state_dir).encode()).hexdigest()
    return digest[:12]


def demo_routes(cfg: Config, limiter: Any = None) -> list[Any]:
    """The demo page, its static files and the dev-only token endpoint.

    ``POST /dev/token`` exists only when ``api.demo_page`` is on AND the dev private key
    (``auth.jwt_private_key_file``) exists: `voice-appliance run` creates it, a production install has
    no private key, so there the endpoint is simply absent (404). Every token gets its own random
    ``sub`` (one demo user cannot read another's session or transcript), and with ``limiter`` (a
    :class:`appliance.ratelimit.RateLimiter`) the endpoint is limited per client IP
    (``limits.unauthenticated_per_minute``; `run --public-host` serves it to a whole network).
    """
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    if not cfg.api.demo_page:
        return []

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    routes: list[Any] = [
        Route("/", index, methods=["GET"], name="demo"),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    key_file = cfg.auth.jwt_private_key_file
    if key_file and Path(key_file).exists():
        from appliance.token import mint

        pem = Path(key_file).read_bytes()

        import ipaddress
        import secrets

        from appliance.api import client_ip, error_response
        from appliance.ratelimit import ANON

        trusted = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.api.trusted_proxies)

        async def dev_token(request: Request) -> Response:
            if limiter is not None:
                decision = await limiter.check(ANON, client_ip(request, trusted))
                if not decision.allowed:
                    return error_response(429, "rate_limited", "too many development tokens from this "
                                          f"address; retry in {decision.retry_after_header} s",
                                          {"Retry-After": decision.retry_after_header})
            sub = "demo-" + secrets.token_urlsafe(9)
            token = mint(pem, sub=sub, audience=cfg.auth.audience, issuer=cfg.auth.issuer,
                         scope=cfg.auth.required_scope, ttl_seconds=min(600, cfg.auth.max_ttl_seconds))
            return JSONResponse({"token": token, "sub": sub, "dev": True},
                                headers={"Cache-Control": "no-store"})

        routes.append(Route("/dev/token", dev_token, methods=["POST"], name="dev_token"))
        if not cfg.api.host.startswith("127.") and cfg.api.host not in ("localhost", "::1"):
            log.warning("dev token endpoint is reachable from the network: anyone who can open the demo "
                        "page can start calls (remove auth.jwt_private_key_file or set api.demo_page=false)",
                        extra={"host": cfg.api.host})
    return routes


class _Server:
    """uvicorn.Server without its own signal handling (the supervisor owns the signals)."""

    @staticmethod
    def wrap(config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            tls: Any = None  # the API server's CertReloader (make)

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        server = Server(config)
        server.tls = None  # make() sets the API server's CertReloader
        return server

    @staticmethod
    def make(app: Any, cfg: Config) -> Any:
        import uvicorn

        from appliance.httpguard import uvicorn_kwargs

        kwargs: dict[str, Any] = uvicorn_kwargs(cfg.api)
        tls = None
        if cfg.api.tls_cert_file:  # our TLS policy and in-place certificate reloads (appliance/tls.py)
            from appliance.tls import CertReloader, HstsMiddleware

            tls = CertReloader(cfg.api.tls_cert_file, cfg.api.tls_key_file)
            kwargs.update(ssl_certfile=cfg.api.tls_cert_file, ssl_context_factory=lambda *_: tls.context)
            app = HstsMiddleware(app)
        # proxy_headers off: appliance.api.client_ip alone decides whom to believe (api.trusted_proxies)
        config = uvicorn.Config(app, host=cfg.api.host, port=cfg.api.port, log_config=None,
                                access_log=False, lifespan="off", server_header=False,
                                proxy_headers=False, **kwargs)
        server = _Server.wrap(config)
        server.tls = tls
        return server


class _AdminControl:
    """The admin API's view of this box (appliance/records/admin.py ``AdminControl``)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    async def subject_sessions(self, sub: str) -> list[dict[str, Any]]:
        """GDPR export/erasure of the Redis session state (appliance/compliance/subjects.py)."""
        from appliance.compliance.subjects import redis_sessions

        store = self.sup.sessions.store if self.sup.sessions is not None else None
        if store is None:
            return []
        return await redis_sessions(store._redis, store._prefix, sub)  # the store's own client

    async def delete_subject_sessions(self, sub: str) -> int:
        from appliance.compliance.subjects import delete_redis_sessions

        store = self.sup.sessions.store if self.sup.sessions is not None else None
        if store is None:
            return 0
        return await delete_redis_sessions(store._redis, store._prefix, sub)

    def live_call(self, call_id: str) -> dict[str, Any] | None:
        from appliance.records.quality import from_counters

        live = self.sup.sessions.live.get(call_id) if self.sup.sessions is not None else None
        if live is None:
            return None
        out: dict[str, Any] = {
            "id": live.session_id, "sub": live.sub, "mode": live.mode, "box": self.sup.sessions.box,
            "state": "live", "webrtc": "up" if live.webrtc_up else "new",
            "created_at": _iso(live.created_at), "duration_seconds": round(time.time() - live.created_at, 1),
            "model_state": None, "quality": None, "last_transcript": None}
        with contextlib.suppress(Exception):
            slot = self.sup.segments[live.placed.shard].slot(live.placed.slot)
            if slot.is_current(live.generation):
                out["model_state"] = slot.model_state or "connecting"
                out["last_transcript"] = slot.transcript or None
                out["quality"] = from_counters(slot.counters.snapshot())
        return out

    def live_calls(self) -> list[dict[str, Any]]:
        sessions = self.sup.sessions
        if sessions is None:
            return []
        return [c for c in (self.live_call(sid) for sid in list(sessions.live)) if c is not None]

    async def hangup(self, call_id: str) -> bool:
        sessions = self.sup.sessions
        if sessions is None or call_id not in sessions.live:
            return False
        await sessions.hangup(call_id)
        return True

    def set_draining(self, on: bool) -> None:
        self.sup.set_draining(on)

    @property
    def draining(self) -> bool:
        return bool(self.sup.placement.draining)


def _read_key(path: str) -> bytes:
    """The dev private key if it exists (then the console gets a dev-token endpoint), else b""."""
    try:
        return Path(path).read_bytes() if path else b""
    except OSError:
        return b""


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class Supervisor:
    """Wires the pieces together and runs until stopped (see the module docstring)."""

    def __init__(self, cfg: Config, config_path: str | None = None, *, with_workers: bool = True) -> None:
        from appliance.cpuplan import make_plan
        from appliance.metrics import CounterAccumulator, Metrics
        from appliance.placement import Placement
        from appliance.sdnotify import Notifier

        self.cfg = cfg
        self.config_path = config_path
        self.with_workers = with_workers
        self.plan = make_plan(cfg.shards.cpu_plan, cfg.shards.count)
        self.instance = instance_id(cfg)
        self.placement = Placement.from_config(cfg, self.plan.shard_count)
        self.metrics = Metrics()
        self._counters = CounterAccumulator()
        self.notifier = Notifier()
        self.segments: dict[int, Any] = {}
        self.sessions: Any = None
        self.arbiter: Any = None
        self.server: Any = None
        self.agent: Any = None
        self.control: Any = None
        self._stop = asyncio.Event()
        self._graceful = False
        self._restart_in_place = False
        self.adopting = False  # segments of a previous supervisor were found: adopt workers and calls
        self._tasks: list[asyncio.Task[Any]] = []
        self.janus_events: Any = None  # appliance.quality.JanusEventReceiver when janus.events_port
        self._quality: Any = None
        self.admin_server: Any = None
        self.record_writer: Any = None
        self.webhooks: Any = None
        self.recordings: Any = None  # this box's call recordings (appliance/compliance/recordings.py)
        self._record_dbs: list[Any] = []
        self._probes: asyncio.Task[None] | None = None  # appliance/probes.py (stopped before the sessions)

    # -- start ----------------------------------------------------------------------------------
    def _create_segments(self) -> None:
        """Adopt this instance's segments if a previous supervisor left them (its crash or in-place
        restart: their calls are still running), else create them. A segment whose geometry no longer
        matches the config cannot be adopted; all are then removed and created afresh."""
        from shm import layout
        from shm.errors import ShmError
        from shm.segment import ShardSegment, cleanup_stale, ring_bytes, segment_name

        up, down = ring_bytes(self.cfg.shards.uplink_ring_ms, self.cfg.shards.downlink_ring_ms)
        found: dict[int, Any] = {}
        for s in self.plan.shards:
            name = segment_name(self.instance, s.shard)
            try:
                seg = ShardSegment.attach(name)
            except ShmError:
                continue
            if (seg.n_slots, seg.uplink_bytes, seg.downlink_bytes) != (
                    self.cfg.shards.slots, layout.ring_capacity(up), layout.ring_capacity(down)):
                log.warning("segment left by a previous supervisor does not match the config: not adopted",
                            extra={"segment": name})
                seg.close()
                continue
            found[s.shard] = seg
        if len(found) == len(self.plan.shards):
            self.segments = found
            self.adopting = True
            log.warning("adopting the shared-memory segments of a previous supervisor",
                        extra={"segments": [seg.name for seg in found.values()]})
            return
        for seg in found.values():
            seg.close()
        removed = cleanup_stale(self.instance)
        if removed:
            log.warning("removed stale shared-memory segments", extra={"segments": removed})
        for s in self.plan.shards:
            name = segment_name(self.instance, s.shard)
            self.segments[s.shard] = ShardSegment.create(
                name, slots=self.cfg.shards.slots, uplink_bytes=up, downlink_bytes=down,
                instance_id=self.instance)

    def _adopt_workers(self) -> None:
        """Hand the arbiter every worker of an adopted segment that still runs (PID from the header)."""
        from appliance.arbiter import worker_cmdline_matches
        from appliance.procs import pid_gone

        for w in self.arbiter.workers:
            seg = self.segments[w.spec.shard]
            pid, _age = seg.heartbeat_age(w.spec.role)
            if pid and not pid_gone(pid) and worker_cmdline_matches(pid, w.spec.role, seg.name):
                self.arbiter.adopt(w.spec.role, w.spec.shard, pid)

    def _heartbeat(self, role: str, shard: int) -> tuple[int, float] | None:
        seg = self.segments.get(shard)
        if seg is None:
            return None
        pid, age = seg.heartbeat_age(role)
        return None if pid is None or age is None else (pid, age)

    def _on_worker_event(self, event: str, worker: Any) -> None:
        role, shard = worker.spec.role, worker.spec.shard
        if event.startswith("exited:"):
            self.metrics.worker_restarts.labels(role=role, reason=event.split(":", 1)[1]).inc()
            self.metrics.worker_up.labels(role=role, shard=str(shard)).set(0)
        elif event == "started":
            self.metrics.worker_up.labels(role=role, shard=str(shard)).set(1)
        # A crash-looping media worker means its shard cannot carry calls: stop placing there.
        if role == "media":
            if event == "backoff":
                self.placement.set_up(shard, False)
            elif event == "ready":
                self.placement.set_up(shard, True)

    def harvest_counters(self, shard: int, slot: Any) -> None:
        """Fold one slot's counters into the shard totals (at scrapes, and before a slot is freed)."""
        acc = self._counters
        i = slot.index
        c = slot.counters.snapshot()
        acc.observe(shard, i, "uplink_dropped_frames", slot.uplink.overruns)
        acc.observe(shard, i, "downlink_dropped_frames", slot.downlink.overruns)
        acc.observe(shard, i, "rtp_received_packets", c.get("rx_packets", 0))
        acc.observe(shard, i, "rtp_sent_packets", c.get("tx_packets", 0))
        acc.observe(shard, i, "concealed_frames", c.get("concealed", 0))
        acc.observe(shard, i, "model_reconnects", c.get("reconnects", 0))
        acc.observe(shard, i, "model_tool_calls", c.get("tool_calls", 0))
        acc.observe(shard, i, "model_tool_errors", c.get("tool_errors", 0))
        acc.observe(shard, i, "dtmf_digits_sent", c.get("dtmf_sent", 0))
        acc.observe(shard, i, "playback_pauses", c.get("pauses", 0))
        acc.observe(shard, i, "playback_pauses_confirmed", c.get("pauses_confirmed", 0))
        acc.observe(shard, i, "playback_pauses_released", c.get("pauses_released", 0))
        acc.observe(shard, i, "playback_pause_timeouts", c.get("pause_timeouts", 0))

    def _shard_counters(self) -> dict[int, dict[str, float]]:
        """Monotonic per-shard totals of the workers' shared-memory counters (read at scrape time)."""
        from shm.segment import SlotState

        for shard, seg in list(self.segments.items()):
            for slot in seg.slots():
                with contextlib.suppress(Exception):  # a slot being reset or a closed segment
                    if slot.state != SlotState.FREE:
                        self.harvest_counters(shard, slot)
        return self._counters.totals

    def _worker_env(self) -> dict[str, str]:
        """Workers' environment: prometheus_client multiprocess mode into a fresh per-instance directory
        that /metrics reads (appliance.metrics.Metrics.add_worker_registry)."""
        d = Path(self.cfg.paths.run_dir) / f"prometheus-{self.instance}"
        with contextlib.suppress(OSError):
            shutil.rmtree(d)
        try:
            d.mkdir(parents=True, mode=0o700)
        except OSError as exc:
            log.warning("no worker metrics directory", extra={"dir": str(d), "error": str(exc)})
            return dict(os.environ)
        self.metrics.add_worker_registry(str(d))
        return {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d)}

    def _shard_histograms(self) -> dict[int, dict[str, tuple[list[int], float]]]:
        """Both workers' latency histogram blocks of every shard (scrape time; shm/histograms.py)."""
        out: dict[int, dict[str, tuple[list[int], float]]] = {}
        for shard, seg in list(self.segments.items()):
            with contextlib.suppress(Exception):  # a segment closing during shutdown
                out[shard] = {**seg.histograms("media").snapshot_all(), **seg.histograms("ai").snapshot_all()}
        return out

    async def start(self) -> None:
        from appliance.agentcheck import AgentCheckServer
        from appliance.api import create_app
        from appliance.arbiter import Arbiter, specs_for_plan
        from appliance.config import box_id, private_host
        from appliance.control import ControlServer, socket_path
        from appliance.cpuplan import pin
        from appliance.ratelimit import RateLimiter, SessionCap
        from appliance.sessions import Sessions
        from appliance.state import SessionStore, redis_client

        cfg = self.cfg
        with contextlib.suppress(OSError):
            pin(0, self.plan.janus_cpus)
        log.info("cpu plan", extra={"plan": self.plan.describe(), "instance": self.instance})
        self._create_segments()
        from appliance import tracing

        tracing.configure(cfg.otel.endpoint, cfg.otel.service_name, role="supervisor",
                          timeout=cfg.otel.timeout_seconds)
        store = SessionStore.from_config(cfg.redis)
        await store.start()
        self.sessions = Sessions(cfg, self.placement, self.segments, store, self.metrics, box=box_id(cfg),
                                 on_slot_freed=self.harvest_counters, redis=redis_client(cfg.redis))
        await self.sessions.start()
        if self.adopting:
            adopted = await self.sessions.adopt()
            log.warning("calls adopted from the previous supervisor", extra={"sessions": adopted})
        limits_redis = redis_client(cfg.redis)
        limiter = RateLimiter(limits_redis, cfg.limits)
        cap = SessionCap(limits_redis, cfg.limits)
        self.sessions.cap = cap
        app = create_app(cfg, self.sessions, limiter=limiter, cap=cap,
                         extra_routes=demo_routes(cfg, limiter))
        self.metrics.include_default_registry()
        p = self.placement
        self.metrics.sessions_active.set_function(lambda: p.active)  # read at scrape time
        self.metrics.sessions_capacity.set_function(lambda: p.capacity)
        self.metrics.draining.set_function(lambda: 1 if p.draining else 0)
        self.metrics.add_shard_counters(self._shard_counters)
        self.metrics.add_shard_histograms(self._shard_histograms)
        for role in ("media", "ai"):  # series exist from 0, so increase() sees the first restart
            for reason in ("signal", "exit", "heartbeat", "heartbeat_hard", "reload"):
                self.metrics.worker_restarts.labels(role=role, reason=reason)
            self.metrics.worker_overloaded_init(role)
        if cfg.api.metrics_port:
            self.metrics.serve(private_host(cfg, cfg.api.metrics_host), cfg.api.metrics_port)
        if cfg.janus.events_port:
            from appliance.quality import JanusEventReceiver, QualitySampler

            self.janus_events = JanusEventReceiver()
            try:
                self.janus_events.serve(cfg.janus.events_host, cfg.janus.events_port)
            except OSError as exc:  # quality then comes from the media workers' counters alone
                log.error("cannot listen for Janus events", extra={
                    "host": cfg.janus.events_host, "port": cfg.janus.events_port, "error": str(exc)})
            sampler = QualitySampler(self.janus_events, self.metrics.observe_quality)
            self._quality = sampler
        if self.with_workers:
            from shm.segment import segment_name

            specs = specs_for_plan(self.plan, lambda k: segment_name(self.instance, k), self.config_path)
            self.arbiter = Arbiter(specs, heartbeat=self._heartbeat, env=self._worker_env(),
                                   heartbeat_timeout=cfg.shards.heartbeat_timeout_seconds,
                                   on_event=self._on_worker_event)
            for s in self.plan.shards:  # a shard takes calls once its media worker beats
                self.placement.set_up(s.shard, False)
            if self.adopting:
                self._adopt_workers()
            await self.arbiter.start()
            media = [w.ready_event.wait() for w in self.arbiter.workers if w.spec.role == "media"]
            try:
                await asyncio.wait_for(asyncio.gather(*media), 30)
            except TimeoutError:
                log.error("media workers not up after 30 s; serving the shards that are")
        if cfg.api.agent_check_port:
            self.agent = AgentCheckServer(lambda: (self.placement.free_fraction(), self.placement.draining),
                                          private_host(cfg, cfg.api.agent_check_host),
                                          cfg.api.agent_check_port)
            await self.agent.start()
        self.control = ControlServer(socket_path(cfg), self._control)
        await self.control.start()
        await self._start_records()
        self.server = _Server.make(app, cfg)
        self._tasks.append(asyncio.create_task(self.server.serve(), name="uvicorn"))
        while not self.server.started:
            if self._tasks[0].done():
                self._tasks[0].result()  # raises the bind error
                raise RuntimeError("API server exited during start-up")
            await asyncio.sleep(0.02)
        if self.server.tls is not None:
            self._tasks.append(asyncio.create_task(self.server.tls.run(cfg.api.tls_reload_seconds),
                                                   name="tls-reload"))
        self.sessions.accepting = True
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        from appliance.probes import ComponentProbes  # Janus and coturn health for /metrics

        probes = ComponentProbes(self.sessions.janus.info, cfg.turn.probe_address)
        self._probes = asyncio.create_task(probes.run(), name="probes")
        if self._quality is not None:
            quality = self._quality.run(self.sessions.quality_refs, float(cfg.janus.stats_period_seconds))
            self._tasks.append(asyncio.create_task(quality, name="quality"))
        self.notifier.ready(self._status())
        log.info("supervisor ready", extra={"host": cfg.api.host, "port": cfg.api.port,
                                             "shards": self.plan.shard_count, "slots": cfg.shards.slots})
        from appliance.compliance import disclosure

        disclosure.announce(cfg, self.sessions.records.audit if cfg.records.dsn else None)  # logged + audited

    async def _start_records(self) -> None:
        """The record writer and webhook sender (``records.dsn``) and the admin API (``api.admin_port``)."""
        from appliance.config import private_host
        from appliance.records.usage import load_prices

        cfg = self.cfg
        prices = load_prices(cfg.records.prices_file)
        db = None
        keyring = None
        from appliance.compliance.recordings import RecordingStore

        self.recordings = RecordingStore.from_config(cfg)
        if cfg.records.dsn:
            from appliance.compliance import trail
            from appliance.compliance.atrest import db_keyring, load_master
            from appliance.records.spool import spool_root
            from appliance.records.writer import Database, RecordWriter

            root = spool_root(cfg.paths.state_dir, cfg.records.spool_dir)
            wdb = Database.from_config(cfg)
            master = load_master(cfg)  # encryption at rest (appliance/compliance/atrest.py)
            keyring = db_keyring(master)
            c = cfg.compliance
            signer = trail.Signer(trail.load_signing_key(cfg), c.audit_checkpoint_entries,
                                  c.audit_checkpoint_seconds)
            self.record_writer = RecordWriter(wdb, root, batch_items=cfg.records.batch_items,
                                              webhooks=bool(cfg.records.webhook_url), master=master,
                                              signer=signer)
            self._tasks.append(asyncio.create_task(self.record_writer.run(), name="record-writer"))
            if c.purge_interval_seconds > 0:
                pdb = Database.from_config(cfg)
                self._record_dbs.append(pdb)
                self._tasks.append(asyncio.create_task(self._purge_loop(pdb, signer), name="retention"))
            db = Database.from_config(cfg)
            self._record_dbs += [wdb, db]
            if cfg.records.webhook_url:
                from appliance.config import secret
                from appliance.records.webhooks import WebhookSender

                hdb = Database.from_config(cfg)
                self._record_dbs.append(hdb)
                r = cfg.records
                self.webhooks = WebhookSender(hdb, r.webhook_url, secret("", r.webhook_secret_file).encode(),
                                              prices=prices, timeout=r.webhook_timeout_seconds,
                                              max_age_seconds=r.webhook_max_age_seconds,
                                              concurrency=r.webhook_concurrency, keyring=db_keyring(master))
                self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))
        if cfg.api.admin_port:
            import uvicorn

            from appliance.auth import JwtVerifier
            from appliance.records.admin import SCOPES, create_admin_app

            verifier = JwtVerifier.from_config(cfg.auth)
            verifier.required_scope = ""  # each admin endpoint checks its own scope
            dev = None
            key_file = cfg.auth.jwt_private_key_file
            admin_host = private_host(cfg, cfg.api.admin_host)
            pem = _read_key(key_file) if admin_host.startswith("127.") else b""
            if pem:
                from appliance.token import mint

                def dev() -> str:
                    return mint(pem, sub="console", audience=cfg.auth.audience, issuer=cfg.auth.issuer,
                                scope=" ".join(SCOPES), ttl_seconds=min(600, cfg.auth.max_ttl_seconds))
            app = create_admin_app(verifier, _AdminControl(self), db, prices=prices, dev_token=dev,
                                   keyring=keyring, recordings=self.recordings,
                                   audit=self.sessions.records.audit if cfg.records.dsn else None)
            config = uvicorn.Config(app, host=admin_host, port=cfg.api.admin_port, log_config=None,
                                    access_log=False, lifespan="off", server_header=False,
                                    proxy_headers=False)
            self.admin_server = _Server.wrap(config)
            task = asyncio.create_task(self.admin_server.serve(), name="admin-api")
            self._tasks.append(task)
            while not self.admin_server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("admin API server exited during start-up")
                await asyncio.sleep(0.02)

    def _status(self) -> str:
        p = self.placement
        state = "draining" if p.draining else "serving"
        return f"{state}: {p.active}/{p.capacity} sessions on {self.plan.shard_count} shard(s)"

    async def _purge_loop(self, db: Any, signer: Any) -> None:
        """Retention (appliance/compliance/retention.py) every ``compliance.purge_interval_seconds``;
        this box's live calls are never touched."""
        from appliance.compliance.retention import Policy, purge

        policy = Policy.from_config(self.cfg)
        while True:
            await asyncio.sleep(self.cfg.compliance.purge_interval_seconds)
            live = list(self.sessions.live) if self.sessions is not None else []
            try:
                async with db.connection() as conn:
                    counts = await purge(conn, policy, live=live, signer=signer,
                                         recordings=self.recordings)
                if any(counts.values()):
                    log.info("retention purge", extra={"deleted": counts})
            except Exception as exc:  # the next round retries; a purge never takes the box down
                log.warning("retention purge failed", extra={"error": str(exc)[:200]})

    async def _housekeeping(self) -> None:
        """Metrics gauges, sd_notify WATCHDOG/STATUS."""
        interval = 1.0
        if self.notifier.watchdog_seconds:
            interval = min(interval, self.notifier.watchdog_seconds / 3)
        last_status = ""
        while True:
            if self.arbiter is not None:
                for w in self.arbiter.workers:
                    age = self.arbiter.heartbeat_age(w)
                    if age is not None:
                        self.metrics.heartbeat_age.labels(role=w.spec.role, shard=str(w.spec.shard)).set(age)
            self.notifier.watchdog()
            status = self._status()
            if status != last_status:
                self.notifier.status(status)
                last_status = status
            await asyncio.sleep(interval)

    # -- signals --------------------------------------------------------------------------------
    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, True)
        loop.add_signal_handler(signal.SIGINT, self.request_stop, False)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self.set_draining, True)
        loop.add_signal_handler(signal.SIGUSR2, self.set_draining, False)

    def request_stop(self, graceful: bool) -> None:
        if self._stop.is_set():
            if not graceful:
                self._graceful = False  # a second Ctrl-C during a drain: stop now
            return
        log.info("stop requested", extra={"graceful": graceful})
        self._graceful = graceful
        self._stop.set()

    async def _control(self, cmd: str) -> dict[str, Any]:
        """A control-socket request (``appliance.control``): act, then the status."""
        match cmd:
            case "drain":
                if not self.placement.draining:
                    self.set_draining(True)
            case "undrain":
                if self.placement.draining:
                    self.set_draining(False)
                if self.agent is not None:
                    self.agent.force_ready()
            case "migrate":
                if self.sessions is not None:
                    await self.sessions.migrate_all()
            case "restart":
                self.request_restart()
        return {"draining": self.placement.draining, "active": self.placement.active,
                "migrating": self.sessions.migrating if self.sessions is not None else 0}

    def request_restart(self) -> None:
        """Restart this supervisor in place, keeping every call (``voice-appliance restart``): stop the
        API and control plane, leave workers, segments, Janus sessions and Redis records as they are, and
        exec the same command line; the new image adopts them (same PID, so systemd sees a reload)."""
        if self._stop.is_set():
            return
        log.warning("restart in place requested: calls keep running", extra={"active": self.placement.active})
        self._restart_in_place = True
        self._stop.set()

    def set_draining(self, on: bool) -> None:
        self.placement.draining = on
        log.warning("draining" if on else "drain ended", extra={"active": self.placement.active})
        self.notifier.status(self._status())

    async def reload(self) -> None:
        log.info("SIGHUP: rolling restart of workers")
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
        if self.arbiter is not None:
            await self.arbiter.rolling_restart()
        self.notifier.ready(self._status())

    # -- stop -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop."""
        try:
            await self.start()
            self.install_signals()
            await self._stop.wait()
        finally:
            await self.stop()

    async def _drain(self, limit: float) -> None:
        """Wait until live calls end (or ``limit`` seconds pass, or a second Ctrl-C)."""
        log.info("draining before stop", extra={"active": self.placement.active, "timeout_seconds": limit})
        deadline = time.monotonic() + limit
        while self.placement.active and self._graceful and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.25)

    async def _stop_probes(self) -> None:
        """Before the sessions close: the Janus probe uses their Janus client."""
        if self._probes is not None:
            self._probes.cancel()
            await asyncio.gather(self._probes, return_exceptions=True)
            self._probes = None

    async def stop(self) -> None:
        await self._stop_probes()
        if self._restart_in_place:
            await self._handoff()
            return
        self.notifier.stopping()
        self.placement.draining = True
        if self.sessions is not None:
            self.sessions.accepting = False
            if self._graceful and self.placement.active:
                await self._drain(self.cfg.api.drain_timeout_seconds)
            await self.sessions.close()
        await self._stop_services()
        if self.arbiter is not None:
            await self.arbiter.stop()
        self.metrics.stop()
        for seg in self.segments.values():
            seg.close()
            seg.unlink()
        self.segments.clear()
        log.info("supervisor stopped")

    async def _stop_services(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.admin_server is not None:
            self.admin_server.should_exit = True
        if self.record_writer is not None:  # ship what the calls just spooled (bounded)
            with contextlib.suppress(Exception):  # the rest waits in the spool for the next start
                await asyncio.wait_for(self.record_writer.drain(3.0), 4.0)
        for t in self._tasks:
            if t.get_name() not in ("uvicorn", "admin-api"):
                t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.webhooks is not None:
            await self.webhooks.aclose()
        for db in self._record_dbs:
            await db.close()
        if self.agent is not None:
            await self.agent.stop()
        if self.control is not None:
            await self.control.stop()

    async def _handoff(self) -> None:
        """The in-place restart (``request_restart``): release everything that keeps calls, then exec."""
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
        if self.sessions is not None:
            await self.sessions.release()
        await self._stop_services()
        if self.arbiter is not None:
            await self.arbiter.release()
        self.metrics.stop()
        from appliance import tracing

        tracing.shutdown()
        if self.janus_events is not None:
            self.janus_events.stop()
        for seg in self.segments.values():
            seg.close()  # unmapped here; the name (and the workers' mappings) stay
        self.segments.clear()
        logging.shutdown()
        argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
        os.execv(sys.executable, [sys.executable, *argv[1:]])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: $VA_CONFIG or /etc/voice-appliance/...)")
    parser.add_argument("--no-workers", action="store_true", help="do not spawn workers (API-only tests)")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config) if args.config else load_config()
        for problem in production_problems(cfg):  # `config check` (the package, Ansible) refuses these
            log.error("config problem", extra={"problem": problem})
        sup = Supervisor(cfg, args.config or os.environ.get("VA_CONFIG"), with_workers=not args.no_workers)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(sup.run())
    except OSError as exc:  # e.g. the API port is taken
        log.error("supervisor failed", extra={"error": str(exc)})
        return 1
    return 0
