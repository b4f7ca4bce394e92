// Demo caller: plain WebRTC against the appliance's session API (no Janus JS needed).
// Flow: dev token -> GET /v1/ice-servers (TURN credentials before the offer, so relay candidates are
// gathered) -> getUserMedia -> offer (ICE gathered) -> POST /v1/sessions -> answer ->
// poll GET /v1/sessions/{id} for state and transcripts -> DELETE on hang-up.
// `?relay=1` in the page URL forces relay-only ICE (iceTransportPolicy "relay": media only via TURN).
// "Line" shows the appliance's view of this call's network leg (details.quality: E-model MOS, loss both
// ways, jitter, RTT; docs/architecture.md "Observability"); "Round trip per turn" is measured here, from
// the WebRTC stats' audio levels: end of the caller's speech -> first loud answer audio.
// Resume (docs/architecture.md "Fleet"): on state "migrating" (the box drains; GET carries a fresh
// resume_token), on ICE/connection failure, or when the box stops answering (box loss), the page
// re-offers with its resume token through the same origin (the load balancer picks a live box). The
// session may come back under a new id (`resumed_from`): every later request uses the new one.
// Session credentials (docs/security.md): requests about the session (poll, DELETE, refresh) carry its
// own session token, refreshed with POST /v1/sessions/{id}/refresh in its last two minutes, so a call
// may outlive any token; creating or resuming a session uses the JWT.
// Janus restart (docs/architecture.md "Client resume protocol"): the media path breaks; the page resumes
// when ICE stays "disconnected" for ICE_DISCONNECTED_MS, when the session reads "disconnected" (the box
// saw its Janus leg end), or on "failed"; a 502/503 while Janus is still down is retried quickly.
"use strict";

const $ = (id) => document.getElementById(id);
const JITTER_TARGET_MS = 50; // receiver jitterBufferTarget: 40-60 ms keeps latency low on good networks
const SPEECH_LEVEL = 0.02, MIN_SPEECH_MS = 300, END_SILENCE_MS = 250; // audioLevel is 0..1
const RESUME_ATTEMPTS = 12; // 503 (full/draining): ~0.5+1+2+4+8+8… s; 502 (Janus restarting): every 1 s
const ICE_DISCONNECTED_MS = 2000; // ICE "disconnected" this long = the media path is gone (Janus died)
const BOX_LOSS_POLLS = 2; // consecutive failed polls (network error / 5xx) that mean the box is gone
let pc = null, stream = null, session = null, token = null, poller = null, lastLine = "";
let resuming = false, failedPolls = 0;
let meter = null, turn = { speaking: 0, lastLoud: 0, waiting: 0 };
const REFRESH_BEFORE_MS = 90 * 1000; // the API accepts a refresh in the token's last 120 s
let sessionToken = null, refresher = null;

function show(id, text) { $(id).textContent = text; }
function fail(msg) { show("error", msg); console.error(msg); }

async function devToken() {
  const r = await fetch("/dev/token", { method: "POST", cache: "no-store" });
  if (!r.ok) throw new Error("no dev token (" + r.status + "): mint one with `voice-appliance token`");
  return (await r.json()).token;
}

function iceGathered(conn, ms) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { conn.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (conn.iceGatheringState === "complete") done(); };
    conn.addEventListener("icegatheringstatechange", check);
    setTimeout(done, ms);
  });
}

async function iceServers() {
  const r = await api("/v1/ice-servers");
  if (!r.ok) throw new Error("no ICE servers (" + r.status + ")");
  return (await r.json()).ice_servers || [];
}

function api(path, opts = {}, ownSession = path.startsWith("/v1/sessions/")) {
  // the session's own token for /v1/sessions/{id}… and for resuming it (a call may outlive the page's
  // JWT); the JWT for creating a new call and for ICE servers
  const bearer = ownSession && sessionToken ? sessionToken : token;
  return fetch(path, {
    ...opts,
    cache: "no-store",
    headers: { "Authorization": "Bearer " + bearer, "Content-Type": "application/json", ...(opts.headers || {}) },
  });
}

function scheduleRefresh(expiresAt) {
  clearTimeout(refresher);
  const wait = Math.max(1000, Date.parse(expiresAt) - Date.now() - REFRESH_BEFORE_MS);
  refresher = setTimeout(refreshToken, wait);
}

async function refreshToken() {
  if (!session) return;
  if (resuming) { refresher = setTimeout(refreshToken, 1000); return; }
  try {
    const r = await api("/v1/sessions/" + session.session_id + "/refresh", { method: "POST" });
    if (!r.ok) { refresher = setTimeout(refreshToken, 5000); return; } // poll() notices an ended call
    const data = await r.json();
    sessionToken = data.session_token;
    window.demoTokenRefreshes = (window.demoTokenRefreshes || 0) + 1;
    scheduleRefresh(data.session_token_expires_at);
  } catch (e) { refresher = setTimeout(refreshToken, 5000); } // transient; try again soon
}

// One peer connection + POST /v1/sessions (a new call, or a resume when resumeToken is set).
async function connect(resumeToken) {
  const servers = await iceServers();
  const relayOnly = new URLSearchParams(location.search).get("relay") === "1";
  const conn = new RTCPeerConnection({
    bundlePolicy: "max-bundle",
    iceServers: servers,
    iceTransportPolicy: relayOnly ? "relay" : "all",
  });
  stream.getAudioTracks().forEach((t) => conn.addTrack(t, stream));
  conn.ontrack = (ev) => {
    try { ev.receiver.jitterBufferTarget = JITTER_TARGET_MS; } catch (e) { /* older browsers */ }
    $("remote").srcObject = ev.streams[0] || new MediaStream([ev.track]);
  };
  conn.onconnectionstatechange = () => {
    if (conn !== pc) return; // an old leg closing after a resume
    show("conn", conn.connectionState);
    if (conn.connectionState === "failed") resume("connection failed");
  };
  conn.oniceconnectionstatechange = () => {
    if (conn !== pc) return;
    show("ice", conn.iceConnectionState);
    if (conn.iceConnectionState === "disconnected") {
      setTimeout(() => {
        if (conn === pc && conn.iceConnectionState === "disconnected") resume("media path lost");
      }, ICE_DISCONNECTED_MS);
    }
  };
  show("conn", resumeToken ? "resuming…" : "offering…");
  await conn.setLocalDescription(await conn.createOffer());
  await iceGathered(conn, 2000);
  const body = { type: "offer", sdp: conn.localDescription.sdp };
  if ($("voice").value.trim()) body.voice = $("voice").value.trim();
  if (resumeToken) body.resume_token = resumeToken;
  const post = (own) => api("/v1/sessions", { method: "POST", body: JSON.stringify(body) }, own);
  let r = await post(Boolean(resumeToken));
  if (r.status === 401 && resumeToken && sessionToken) r = await post(false); // session token lapsed
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    conn.close();
    const retry = r.headers.get("Retry-After");
    const err = new Error((data.detail || r.statusText) + (retry ? " — retry in " + retry + " s" : ""));
    err.status = r.status;
    err.retryAfter = Number(retry) || 0;
    throw err;
  }
  await conn.setRemoteDescription({ type: "answer", sdp: data.sdp });
  const old = pc;
  pc = conn;
  window.demoPc = conn; // for tests and curious people
  session = data;
  sessionToken = data.session_token; // a resumed session (maybe a new id) gets its own
  scheduleRefresh(data.session_token_expires_at);
  window.demoSession = data;
  show("session", data.session_id + (data.resumed_from ? " (resumed from " + data.resumed_from + ")" : ""));
  if (old) old.close(); // the old box ends its leg itself once it sees the session moved
}

// Move the call: re-offer with the resume token (the newest one: migrating hands out a fresh one).
async function resume(why, freshToken) {
  if (!session || resuming) return;
  if (freshToken) session.resume_token = freshToken;
  resuming = true;
  show("error", "");
  show("model", "resuming (" + why + ")");
  try {
    for (let attempt = 0; attempt < RESUME_ATTEMPTS && session; attempt++) {
      try {
        await connect(session.resume_token);
        failedPolls = 0;
        window.demoResumes = (window.demoResumes || 0) + 1;
        return;
      } catch (e) {
        if (e.status && e.status < 500 && e.status !== 429) throw e; // token spent/expired: give up
        // 502: this box's Janus is restarting (back within seconds): retry every second, not slower
        const backoff = e.status === 502 ? 1 : 0.5 * 2 ** attempt;
        const wait = Math.min(8, Math.max(e.retryAfter || 0, backoff)); // seconds, capped
        await new Promise((r) => setTimeout(r, 1000 * wait));
      }
    }
    throw new Error("could not resume the call");
  } catch (e) {
    fail(String(e.message || e));
    session = null; // nothing left to DELETE: the token is spent or the call is gone
    await hangup();
  } finally {
    resuming = false;
  }
}

async function call() {
  show("error", "");
  $("call").disabled = true;
  $("transcript").innerHTML = "";
  $("turns").innerHTML = "";
  show("quality", "–");
  lastLine = "";
  try {
    sessionToken = null;
    token = await devToken();
    show("conn", "microphone…");
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    await connect(null);
    $("hangup").disabled = false;
    poller = setInterval(poll, 1000);
    meter = setInterval(measureTurns, 20);
  } catch (e) {
    fail(String(e.message || e));
    await hangup();
  }
}

async function poll() {
  if (!session || resuming) return;
  let r;
  try {
    r = await api("/v1/sessions/" + session.session_id);
  } catch (e) {
    r = null; // network error: the box (or the way to it) is gone
  }
  if (!session || resuming) return;
  if (!r || r.status >= 500) {
    if (++failedPolls >= BOX_LOSS_POLLS) resume("box lost");
    return;
  }
  failedPolls = 0;
  try {
    if (r.status === 404) { show("model", "ended"); return hangup(); }
    if (!r.ok) return;
    const info = await r.json();
    const d = info.details || {};
    if (info.state === "migrating" && d.resume_token) return resume("box draining", d.resume_token);
    if (info.state === "disconnected") return resume("media path lost");
    show("model", (d.model_state || info.state) + (d.shard !== undefined ? " (shard " + d.shard + ")" : ""));
    showQuality(d.quality);
    const line = d.transcript || "";
    if (line && line !== lastLine) {
      lastLine = line;
      const li = document.createElement("li");
      li.textContent = line;
      $("transcript").appendChild(li);
    }
  } catch (e) { /* transient; keep polling */ }
}

function pct(x) { return (100 * x).toFixed(1) + " %"; }

function showQuality(q) {
  if (!q) return;
  show("quality", "MOS " + q.mos.toFixed(2) + " · loss " + pct(q.loss_up_ratio) + " up / " +
       pct(q.loss_down_ratio) + " down · jitter " + Math.round(1000 * Math.max(q.jitter_up_seconds,
       q.jitter_down_seconds)) + " ms · RTT " + Math.round(1000 * q.rtt_seconds) + " ms");
}

async function levels() {
  let mic = 0, remote = 0;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "media-source" && s.kind === "audio" && s.audioLevel !== undefined) mic = s.audioLevel;
    if (s.type === "inbound-rtp" && s.kind === "audio" && s.audioLevel !== undefined) remote = s.audioLevel;
  });
  return { mic, remote };
}

// a turn: >= MIN_SPEECH_MS of loud microphone, then END_SILENCE_MS quiet; its round trip ends at the
// first loud remote audio after the speech ended
async function measureTurns() {
  if (!pc) return;
  let l;
  try { l = await levels(); } catch (e) { return; }
  const now = performance.now();
  if (l.mic >= SPEECH_LEVEL) {
    if (!turn.speaking) turn.speaking = now;
    turn.lastLoud = now;
    turn.waiting = 0;
  } else if (turn.speaking && now - turn.lastLoud >= END_SILENCE_MS) {
    if (turn.lastLoud - turn.speaking >= MIN_SPEECH_MS) turn.waiting = turn.lastLoud;
    turn.speaking = 0;
  }
  if (turn.waiting && l.remote >= SPEECH_LEVEL) {
    const li = document.createElement("li");
    li.textContent = Math.round(now - turn.waiting) + " ms";
    $("turns").appendChild(li);
    turn.waiting = 0;
  }
}

async function hangup() {
  clearInterval(poller);
  clearInterval(meter);
  clearTimeout(refresher);
  poller = null;
  meter = null;
  turn = { speaking: 0, lastLoud: 0, waiting: 0 };
  const s = session;
  session = null;
  if (s && token) { try { await api("/v1/sessions/" + s.session_id, { method: "DELETE" }); } catch (e) {} }
  sessionToken = null;
  if (pc) { pc.close(); pc = null; }
  if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
  show("conn", "idle");
  $("call").disabled = false;
  $("hangup").disabled = true;
}

$("call").addEventListener("click", call);
$("hangup").addEventListener("click", hangup);
window.addEventListener("pagehide", () => { if (session) hangup(); });
