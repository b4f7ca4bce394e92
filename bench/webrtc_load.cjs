// Real WebRTC callers for `voice-appliance bench box`: N peer connections (ICE, DTLS-SRTP, Opus RTP)
// from one Node.js process through libdatachannel (npm node-datachannel: C++ peers, ~1 thread pool for
// all calls — cheap enough that the load generator does not cost more than what it measures, unlike
// aiortc). Each caller POSTs its offer to the session API, sends the pre-encoded Opus payloads from
// PAYLOADS (one 20 ms frame each, on one shared drift-free 20 ms clock) and records what comes back.
//
// stdin: one JSON object {api, tokens: [..], payloads: path, seconds, out_dir, bind?}
// stdout: JSON lines {"event": "up"|"answer_ms"|"done"|"error", ...}
// out_dir/call<i>.rx: records [u64 arrival ns][u16 seq][u32 ts][u16 len][payload]
// out_dir/call<i>.tx: records [u64 send ns][u32 frame index]
'use strict';
const fs = require('fs');
const path = require('path');
const nodeDataChannel = require('node-datachannel');

function emit(obj) { process.stdout.write(JSON.stringify(obj) + '\n'); }
function nowNs() { return process.hrtime.bigint(); }

function readPayloads(file) {
  const buf = fs.readFileSync(file);
  const out = [];
  let off = 0;
  while (off + 2 <= buf.length) {
    const n = buf.readUInt16LE(off); off += 2;
    out.push(buf.subarray(off, off + n)); off += n;
  }
  return out;
}

async function post(url, token, body) {
  const res = await fetch(url, {
    method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify(body),
  });
  return { status: res.status, json: await res.json().catch(() => ({})) };
}

function gatherOffer(pc) {
  return new Promise((resolve) => {
    pc.onGatheringStateChange((state) => {
      if (state === 'complete') resolve(pc.localDescription().sdp);
    });
    pc.setLocalDescription();
  });
}

async function startCall(i, cfg, payloads, attempt = 0) {
  const pc = new nodeDataChannel.PeerConnection(`c${i}`, { iceServers: [], ...(cfg.bind ? { bindAddress: cfg.bind } : {}) });
  const ssrc = 0x1000 + i;
  const audio = new nodeDataChannel.Audio('0', 'SendRecv');
  audio.addOpusCodec(111);
  audio.addSSRC(ssrc, `c${i}`, `s${i}`, `t${i}`);
  const track = pc.addTrack(audio);
  const rx = fs.openSync(path.join(cfg.out_dir, `call${i}.rx`), 'w');
  const call = { i, pc, track, ssrc, rx, tx: [], open: false, seq: (i * 7919) & 0xffff, ts: i * 104729,
                 sid: null, started: null };
  track.onOpen(() => { call.open = true; });
  track.onMessage((msg) => {
    const t = nowNs();
    if (msg.length < 12 || (msg[1] & 0x7f) >= 72 && (msg[1] & 0x7f) <= 79) return; // RTCP (rtcp-mux)
    const csrc = msg[0] & 0x0f;
    let off = 12 + 4 * csrc;
    if (msg[0] & 0x10) { if (msg.length < off + 4) return; off += 4 + 4 * msg.readUInt16BE(off + 2); }
    let end = msg.length;
    if (msg[0] & 0x20) end -= msg[msg.length - 1];
    if (end < off) return;
    const head = Buffer.alloc(16);
    head.writeBigUInt64LE(t, 0);
    head.writeUInt16LE(msg.readUInt16BE(2), 8);
    head.writeUInt32LE(msg.readUInt32BE(4), 10);
    head.writeUInt16LE(end - off, 14);
    fs.writeSync(rx, head);
    fs.writeSync(rx, msg.subarray(off, end));
  });
  const t0 = nowNs();
  const sdp = await gatherOffer(pc);
  const res = await post(`${cfg.api}/v1/sessions`, cfg.tokens[i % cfg.tokens.length], { type: 'offer', sdp });
  if (res.status !== 201) {
    emit({ event: 'error', call: i, status: res.status, body: res.json });
    pc.close();
    return null;
  }
  call.sid = res.json.session_id;
  call.token = cfg.tokens[i % cfg.tokens.length];
  try {
    pc.setRemoteDescription(res.json.sdp, 'answer');
  } catch (e) {
    // Seen once on a loaded 2-core box: libdatachannel's "remote candidate without ICE transport".
    // The caller hangs up and dials again, as a browser user would; retries are reported.
    await fetch(`${cfg.api}/v1/sessions/${call.sid}`, { method: 'DELETE', headers: { authorization: `Bearer ${call.token}` } }).catch(() => {});
    pc.close();
    fs.closeSync(rx);
    if (attempt >= 2) throw e;
    emit({ event: 'retry', call: i, message: String(e.message || e) });
    return startCall(i, cfg, payloads, attempt + 1);
  }
  emit({ event: 'answer_ms', call: i, ms: Number(nowNs() - t0) / 1e6 });
  return call;
}

async function main() {
  const cfg = JSON.parse(fs.readFileSync(0, 'utf8'));
  const payloads = readPayloads(cfg.payloads);
  const calls = [];
  // Set up calls a few at a time (like callers arriving), not all in one burst.
  for (let i = 0; i < cfg.tokens.length * 0 + cfg.calls; i += 4) {
    const batch = [];
    for (let j = i; j < Math.min(cfg.calls, i + 4); j++) batch.push(startCall(j, cfg, payloads));
    calls.push(...(await Promise.all(batch)));
  }
  const live = calls.filter(Boolean);
  const deadline = Date.now() + 20000;
  while (live.some((c) => !c.open) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  emit({ event: 'up', calls: live.length, open: live.filter((c) => c.open).length });
  // One 20 ms clock for every caller: frame n of every call goes out at t0 + n*20 ms.
  const t0 = nowNs();
  const frames = Math.min(payloads.length, Math.round(cfg.seconds * 50));
  const txFiles = live.map((c) => fs.openSync(path.join(cfg.out_dir, `call${c.i}.tx`), 'w'));
  for (let n = 0; n < frames; n++) {
    const due = t0 + BigInt(n) * 20000000n;
    let wait = Number(due - nowNs()) / 1e6;
    if (wait > 1) await new Promise((r) => setTimeout(r, wait - 0.5));
    while (nowNs() < due) { /* spin the last ms */ }
    const p = payloads[n];
    live.forEach((c, k) => {
      if (!c.open) return;
      const pkt = Buffer.alloc(12 + p.length);
      pkt[0] = 0x80; pkt[1] = 111 | (n === 0 ? 0x80 : 0);
      pkt.writeUInt16BE(c.seq, 2); pkt.writeUInt32BE(c.ts >>> 0, 4); pkt.writeUInt32BE(c.ssrc, 8);
      p.copy(pkt, 12);
      c.track.sendMessageBinary(pkt);
      const rec = Buffer.alloc(12);
      rec.writeBigUInt64LE(nowNs(), 0); rec.writeUInt32LE(n, 8);
      fs.writeSync(txFiles[k], rec);
      c.seq = (c.seq + 1) & 0xffff; c.ts = (c.ts + 960) >>> 0;
    });
  }
  await new Promise((r) => setTimeout(r, (cfg.tail_seconds || 3) * 1000));
  for (const c of live) {
    try {
      await fetch(`${cfg.api}/v1/sessions/${c.sid}`, { method: 'DELETE', headers: { authorization: `Bearer ${c.token}` } });
    } catch (e) { /* the box may be gone */ }
    c.pc.close();
    fs.closeSync(c.rx);
  }
  txFiles.forEach((f) => fs.closeSync(f));
  emit({ event: 'done', calls: live.length, sessions: live.map((c) => c.sid) });
  nodeDataChannel.cleanup();
  process.exit(0);
}

main().catch((e) => { emit({ event: 'error', message: String(e && e.stack || e) }); process.exit(1); });
