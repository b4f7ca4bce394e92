// Demo caller: plain WebRTC against the appliance's session API (no Janus JS needed).
// Flow: dev token -> GET /v1/ice-servers (TURN credentials before the offer, so relay candidates are
// gathered) -> getUserMedia -> offer (ICE gathered) -> POST /v1/sessions -> answer ->
// poll GET /v1/sessions/{id} for state and transcripts -> DELETE on hang-up. After the create, every
// request uses the session's own token (it works for this session only), refreshed with
// POST /v1/sessions/{id}/refresh in its last two minutes, so a call may outlive any token.
// `?relay=1` in the page URL forces relay-only ICE (iceTransportPolicy "relay": media only via TURN).
"use strict";

const $ = (id) => document.getElementById(id);
const JITTER_TARGET_MS = 50; // receiver jitterBufferTarget: 40-60 ms keeps latency low on good networks
const REFRESH_BEFORE_MS = 90 * 1000; // the API accepts a refresh in the token's last 120 s
let pc = null, stream = null, session = null, token = null, poller = null, lastLine = "";
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

function api(path, opts = {}) {
  const bearer = sessionToken || token;
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
  try {
    const r = await api("/v1/sessions/" + session.session_id + "/refresh", { method: "POST" });
    if (r.status === 404) { show("model", "ended"); return hangup(); }
    if (!r.ok) { refresher = setTimeout(refreshToken, 5000); return; }
    const data = await r.json();
    sessionToken = data.session_token;
    window.demoTokenRefreshes = (window.demoTokenRefreshes || 0) + 1;
    scheduleRefresh(data.session_token_expires_at);
  } catch (e) { refresher = setTimeout(refreshToken, 5000); } // transient; try again soon
}

async function call() {
  show("error", "");
  $("call").disabled = true;
  $("transcript").innerHTML = "";
  lastLine = "";
  try {
    sessionToken = null;
    token = await devToken();
    const servers = await iceServers();
    const relayOnly = new URLSearchParams(location.search).get("relay") === "1";
    show("conn", "microphone…");
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    pc = new RTCPeerConnection({
      bundlePolicy: "max-bundle",
      iceServers: servers,
      iceTransportPolicy: relayOnly ? "relay" : "all",
    });
    window.demoPc = pc; // for tests and curious people
    stream.getAudioTracks().forEach((t) => pc.addTrack(t, stream));
    pc.ontrack = (ev) => {
      try { ev.receiver.jitterBufferTarget = JITTER_TARGET_MS; } catch (e) { /* older browsers */ }
      $("remote").srcObject = ev.streams[0] || new MediaStream([ev.track]);
    };
    pc.onconnectionstatechange = () => {
      show("conn", pc.connectionState);
      if (pc.connectionState === "failed") { fail("connection failed"); hangup(); }
    };
    pc.oniceconnectionstatechange = () => show("ice", pc.iceConnectionState);
    show("conn", "offering…");
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, 2000);
    const body = { type: "offer", sdp: pc.localDescription.sdp };
    if ($("voice").value.trim()) body.voice = $("voice").value.trim();
    const r = await api("/v1/sessions", { method: "POST", body: JSON.stringify(body) });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      const retry = r.headers.get("Retry-After");
      throw new Error((data.detail || r.statusText) + (retry ? " — retry in " + retry + " s" : ""));
    }
    session = data;
    sessionToken = data.session_token;
    scheduleRefresh(data.session_token_expires_at);
    window.demoSession = data;
    show("session", data.session_id);
    await pc.setRemoteDescription({ type: "answer", sdp: data.sdp });
    $("hangup").disabled = false;
    poller = setInterval(poll, 1000);
  } catch (e) {
    fail(String(e.message || e));
    await hangup();
  }
}

async function poll() {
  if (!session) return;
  try {
    const r = await api("/v1/sessions/" + session.session_id);
    if (r.status === 404) { show("model", "ended"); return hangup(); }
    if (!r.ok) return;
    const info = await r.json();
    const d = info.details || {};
    show("model", (d.model_state || info.state) + (d.shard !== undefined ? " (shard " + d.shard + ")" : ""));
    const line = d.transcript || "";
    if (line && line !== lastLine) {
      lastLine = line;
      const li = document.createElement("li");
      li.textContent = line;
      $("transcript").appendChild(li);
    }
  } catch (e) { /* transient; keep polling */ }
}

async function hangup() {
  clearInterval(poller);
  clearTimeout(refresher);
  poller = null;
  const s = session;
  session = null;
  if (s && (sessionToken || token)) {
    try { await api("/v1/sessions/" + s.session_id, { method: "DELETE" }); } catch (e) {}
  }
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
