// Operator console: polls the admin API (same origin); the token comes from /admin/dev-token on a dev
// box, else from the field (kept in sessionStorage only).
"use strict";
const $ = (s) => document.querySelector(s);
let selected = null;

async function token() {
  if ($("#token").value) return $("#token").value;
  const saved = sessionStorage.getItem("va-admin-token");
  if (saved) { $("#token").value = saved; return saved; }
  const r = await fetch("/admin/dev-token", { method: "POST" });
  if (!r.ok) throw new Error("paste an admin token");
  const t = (await r.json()).token;
  $("#token").value = t;
  return t;
}

async function api(method, path) {
  const r = await fetch(path, { method, headers: { Authorization: "Bearer " + await token() } });
  const body = r.status === 204 ? {} : await r.json();
  if (r.status === 401) { $("#token").value = ""; sessionStorage.removeItem("va-admin-token"); }
  if (!r.ok) throw new Error(`${r.status} ${body.error || ""}: ${body.detail || ""}`);
  sessionStorage.setItem("va-admin-token", $("#token").value);
  return body;
}

function cell(tr, text) { const td = document.createElement("td"); td.textContent = text ?? ""; tr.appendChild(td); return td; }

function select(id) { selected = id; $("#call-id").textContent = id; showCall(); }

async function refreshLive() {
  const { calls } = await api("GET", "/v1/admin/calls?state=live");
  const tb = $("#live tbody");
  tb.replaceChildren();
  for (const c of calls) {
    const tr = document.createElement("tr");
    tr.dataset.id = c.id;
    if (c.id === selected) tr.className = "sel";
    cell(tr, c.id).onclick = () => select(c.id);
    cell(tr, c.sub); cell(tr, c.webrtc === "up" ? "active" : "connecting");
    cell(tr, Math.round(c.duration_seconds) + " s"); cell(tr, c.model_state);
    cell(tr, c.quality ? (100 * c.quality.loss_ratio).toFixed(1) + " %" : "");
    cell(tr, c.quality ? c.quality.jitter_ms + " ms" : "");
    const b = document.createElement("button");
    b.textContent = "Hang up"; b.className = "hangup";
    b.onclick = () => api("POST", `/v1/admin/calls/${encodeURIComponent(c.id)}/hangup`).then(refreshLive, showError);
    cell(tr, "").appendChild(b);
    tb.appendChild(tr);
  }
}

async function showCall() {
  if (!selected) return;
  const rec = await api("GET", `/v1/admin/calls/${encodeURIComponent(selected)}`);
  const u = rec.usage;
  $("#call-meta").textContent = `${rec.state}` + (u ? ` · ${u.total_tokens} tokens · $${u.cost_usd ?? "?"}` : "");
  const ol = $("#transcript");
  ol.replaceChildren();
  for (const line of rec.transcript) {
    const li = document.createElement("li");
    li.className = line.speaker;
    li.textContent = line.text;
    ol.appendChild(li);
  }
}

async function search(ev) {
  if (ev) ev.preventDefault();
  const q = new URLSearchParams({ state: "ended" });
  if ($("#since").value) q.set("since", new Date($("#since").value).toISOString());
  if ($("#sub").value) q.set("sub", $("#sub").value);
  const { calls } = await api("GET", "/v1/admin/calls?" + q);
  const tb = $("#ended tbody");
  tb.replaceChildren();
  for (const c of calls) {
    const tr = document.createElement("tr");
    cell(tr, c.id).onclick = () => select(c.id);
    cell(tr, c.sub); cell(tr, c.created_at); cell(tr, c.ended_at); cell(tr, c.end_reason);
    tb.appendChild(tr);
  }
}

function showError(e) { $("#error").textContent = String(e.message || e); }

async function drain(on) {
  const r = await api("POST", on ? "/v1/admin/drain" : "/v1/admin/undrain");
  $("#box-state").textContent = r.draining ? "draining" : "serving";
}

$("#drain").onclick = () => drain(true).catch(showError);
$("#undrain").onclick = () => drain(false).catch(showError);
$("#search").onsubmit = (e) => search(e).catch(showError);

async function tick() {
  try { await refreshLive(); await showCall(); $("#error").textContent = ""; } catch (e) { showError(e); }
  setTimeout(tick, 1000);
}
tick();
