// Drives the operator console (/admin/) in headless Chromium: the live call shows up with its model
// state, clicking it shows the transcript, "Hang up" ends it. Prints one JSON line with what it saw.
// Then drain/undrain the box and find the ended call by its sub.
// usage: node console_check.js URL TOKEN CALL_ID SUB
const { chromium } = require("playwright-core");

(async () => {
  const [url, token, callId, sub] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage();
    await page.goto(url);
    await page.fill("#token", token);
    const row = page.locator(`#live tr[data-id="${callId}"]`);
    await row.waitFor({ timeout: 30000 });
    const cells = await row.locator("td").allTextContents();
    if (cells[4] !== "live") throw new Error("model state shown: " + cells[4]);
    await row.locator("td").first().click();
    await page.waitForFunction(() => document.querySelectorAll("#transcript li").length >= 4, null,
                               { timeout: 30000 });
    const lines = await page.locator("#transcript li").count();
    const first = await page.locator("#transcript li").first().getAttribute("class");
    await row.locator("button.hangup").click();
    await page.waitForFunction((id) => !document.querySelector(`#live tr[data-id="${id}"]`), callId,
                               { timeout: 30000 });
    await page.click("#drain");
    await page.waitForFunction(() => document.querySelector("#box-state").textContent === "draining");
    await page.click("#undrain");
    await page.waitForFunction(() => document.querySelector("#box-state").textContent === "serving");
    await page.fill("#sub", sub);
    let found = false;
    for (let i = 0; i < 30 && !found; i++) {  // the end reaches the database within a second or so
      await page.click("#search button");
      await page.waitForTimeout(500);
      const cells = await page.locator("#ended tbody tr td").allTextContents();
      found = cells.includes(callId) && cells.includes("admin_hangup");
    }
    if (!found) throw new Error("ended call not found by sub");
    console.log(JSON.stringify({ transcript_lines: lines, first_speaker: first, hung_up: true,
                                 drained: true, found_ended: found }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
