// Demo caller: plain WebRTC against the appliance's session API (no Janus JS needed).
// Flow: dev token -> GET /v1/ice-servers (TURN credentials before the offer, so relay candidates are
// gathered) -> getUserMedia -> offer (ICE gathered) -> POST /v1/sessions -> answer ->
// poll GET /v1/sessions/{id} for state and transcripts -> DELETE on hang-up.
// `?relay=1` in the page URL forces relay-only ICE (iceTransportPolicy "relay": media only via TURN).
// "Line" shows the appliance's view of this call's network leg (details.quality: E-model MOS, loss both
// ways, jitter, RTT; docs/architecture.md "Observability"); "Round trip per turn" is measured here, from
// the WebRTC stats' audio levels: end of the caller's speech -> first loud answer audio.
"use strict";

const $ = (id) => document.getElementById(id);
const JITTER_TARGET_MS = 50; // receiver jitterBufferTarget: 40-60 ms keeps latency low on good networks
const SPEECH_LEVEL = 0.02, MIN_SPEECH_MS = 300, END_SILENCE_MS = 250; // audioLevel is 0..1
let pc = null, stream = null, session = null, token = null, poller = null, lastLine = "";
let meter = null, turn = { speaking: 0, lastLoud: 0, waiting: 0 };

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
  return fetch(path, {
    ...opts,
    cache: "no-store",
    headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json", ...(opts.headers || {}) },
  });
}

async function call() {
  show("error", "");
  $("call").disabled = true;
  $("transcript").innerHTML = "";
  $("turns").innerHTML = "";
  show("quality", "–");
  lastLine = "";
  try {
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
    window.demoSession = data;
    show("session", data.session_id);
    await pc.setRemoteDescription({ type: "answer", sdp: data.sdp });
    $("hangup").disabled = false;
    poller = setInterval(poll, 1000);
    meter = setInterval(measureTurns, 20);
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
  poller = null;
  meter = null;
  turn = { speaking: 0, lastLoud: 0, waiting: 0 };
  const s = session;
  session = null;
  if (s && token) { try { await api("/v1/sessions/" + s.session_id, { method: "DELETE" }); } catch (e) {} }
  if (pc) { pc.close(); pc = null; }
  if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
  show("conn", "idle");
  $("call").disabled = false;
  $("hangup").disabled = true;
}

$("call").addEventListener("click", call);
$("hangup").addEventListener("click", hangup);
window.addEventListener("pagehide", () => { if (session) hangup(); });
