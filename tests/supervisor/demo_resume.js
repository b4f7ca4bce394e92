// Drive the demo page in headless Chromium through a force-migrate: click Call, wait for "connected",
// then wait until the page has resumed by itself (window.demoResumes) and is connected again; hang up.
// Usage: NODE_PATH=tests/e2e/node_modules node demo_resume.js URL [HOLD_MS]
// (HOLD_MS: stay on the call that long after the resume before hanging up; default 0)
// Prints one JSON line per step on stdout (connected, resumed, hungup).
"use strict";
const { chromium } = require("playwright-core");

(async () => {
  const [url, holdArg] = process.argv.slice(2);
  const holdMs = Number(holdArg || 0);
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
      "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
      "--autoplay-policy=no-user-gesture-required",
    ],
  });
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(90000);
    page.on("console", (m) => console.error("page:", m.text()));
    // which credential each POST /v1/sessions carried: a JWT for the new call, the session token to resume
    const posts = [];
    page.on("request", (r) => {
      if (r.method() === "POST" && new URL(r.url()).pathname === "/v1/sessions") {
        const bearer = (r.headers()["authorization"] || "").replace(/^Bearer /, "");
        posts.push(bearer.startsWith("vst1.") ? "session_token" : "jwt");
      }
    });
    await page.goto(url);
    await page.click("#call");
    await page.waitForFunction(
      () => (window.demoPc && window.demoPc.connectionState === "connected") ||
            document.getElementById("error").textContent !== "");
    const error = await page.textContent("#error");
    if (error) throw new Error("page error: " + error);
    console.log(JSON.stringify({ event: "connected", session_id: await page.evaluate(() => window.demoSession.session_id) }));
    await page.waitForFunction(
      () => (window.demoResumes >= 1 && window.demoPc.connectionState === "connected") ||
            document.getElementById("error").textContent !== "");
    const error2 = await page.textContent("#error");
    if (error2) throw new Error("page error after migrate: " + error2);
    console.log(JSON.stringify({ event: "resumed", ...await page.evaluate(() => ({
      session_id: window.demoSession.session_id, resumes: window.demoResumes })), posts }));
    if (holdMs) await page.waitForTimeout(holdMs);
    await page.click("#hangup");
    await page.waitForFunction(() => document.getElementById("conn").textContent === "idle");
    console.log(JSON.stringify({ event: "hungup" }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
