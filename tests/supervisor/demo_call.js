// Drive the demo page in headless Chromium: click Call, wait for "connected", hold, hang up.
// Usage: NODE_PATH=tests/e2e/node_modules node demo_call.js URL HOLD_MS [SPEECH.wav]
// With a WAV the fake microphone plays it (looped); the script then waits for a transcript line and
// measures the loudness of what the page hears. Prints one JSON line per step on stdout.
"use strict";
const { chromium } = require("playwright-core");

(async () => {
  const [url, holdMs, wav] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
      "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
      "--autoplay-policy=no-user-gesture-required",
      ...(wav ? ["--use-file-for-fake-audio-capture=" + wav] : []),
      // mDNS host candidates stay on (as for real callers): Janus learns the browser's address as a
      // peer-reflexive candidate from its connectivity checks.
    ],
  });
  try {
    const page = await browser.newPage();
    // generous: a loaded 2-core CI box can take tens of seconds for what takes ~1 s idle
    page.setDefaultTimeout(60000);
    page.on("console", (m) => console.error("page:", m.text()));
    await page.goto(url);
    await page.click("#call");
    await page.waitForFunction(
      () => (window.demoPc && window.demoPc.connectionState === "connected") ||
            document.getElementById("error").textContent !== "",
      null, { timeout: 60000 });
    const error = await page.textContent("#error");
    if (error) throw new Error("page error: " + error);
    const info = await page.evaluate(() => ({
      session_id: window.demoSession.session_id,
      jitterBufferTarget: window.demoPc.getReceivers()[0].jitterBufferTarget,
      conn: document.getElementById("conn").textContent,
    }));
    console.log(JSON.stringify({ event: "connected", ...info }));
    if (wav) {
      // loudness of the remote audio, sampled every 50 ms by an AnalyserNode
      await page.evaluate(() => {
        const ctx = new AudioContext();
        const an = ctx.createAnalyser();
        ctx.createMediaStreamSource(document.getElementById("remote").srcObject).connect(an);
        const buf = new Float32Array(an.fftSize);
        window.maxRms = 0;
        setInterval(() => {
          an.getFloatTimeDomainData(buf);
          let s = 0;
          for (const v of buf) s += v * v;
          window.maxRms = Math.max(window.maxRms, Math.sqrt(s / buf.length));
        }, 50);
      });
      await page.waitForFunction(() => document.querySelectorAll("#transcript li").length > 0, null,
                                 { timeout: 60000 });
    }
    await page.waitForTimeout(Number(holdMs));
    if (process.env.DEMO_WAIT_QUALITY) {  // the call's line quality and a measured round trip shown
      await page.waitForFunction(() => document.getElementById("quality").textContent.startsWith("MOS") &&
                                        document.querySelectorAll("#turns li").length > 0, null,
                                 { timeout: 30000 });
    }
    const heard = await page.evaluate(() => ({
      transcript: [...document.querySelectorAll("#transcript li")].map((li) => li.textContent),
      maxRms: window.maxRms || 0,
      quality: document.getElementById("quality").textContent,
      turns: [...document.querySelectorAll("#turns li")].map((li) => li.textContent),
    }));
    console.log(JSON.stringify({ event: "heard", ...heard }));
    const model = await page.textContent("#model");
    const deleted = page.waitForResponse((r) => r.request().method() === "DELETE", { timeout: 30000 });
    await page.click("#hangup");
    await page.waitForFunction(() => document.getElementById("conn").textContent === "idle", null,
                               { timeout: 30000 });
    const refreshes = await page.evaluate(() => window.demoTokenRefreshes || 0);
    console.log(JSON.stringify({ event: "hungup", model, refreshes, deleted: (await deleted).status() }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
