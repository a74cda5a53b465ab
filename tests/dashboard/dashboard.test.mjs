// Browser test of the sipwarden dashboard, against a running node (see run.sh, which starts one,
// makes a scanner attack from 127.0.0.7 and a manual block, then runs this).
//
//   SIPWARDEN_URL=http://127.0.0.1:8080 [SIPWARDEN_TOKEN=...] node dashboard.test.mjs
//
// Drives Debian's /usr/bin/chromium (CHROMIUM to override) with playwright-core. Prints
// "N passed, M failed" and exits non-zero on any failure; leaves screenshots in $ARTIFACTS.

import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const base = (process.env.SIPWARDEN_URL || process.argv[2] || "http://127.0.0.1:8080").replace(/\/$/, "");
const token = process.env.SIPWARDEN_TOKEN || "";
const artifacts = process.env.ARTIFACTS || "artifacts";
const scannerIp = process.env.SCANNER_IP || "127.0.0.7";
const xssIp = process.env.XSS_IP || "127.0.0.8";
const manualIp = process.env.MANUAL_IP || "192.0.2.10";
const guesserIp = process.env.GUESSER_IP || "127.0.0.9";
const sipListen = process.env.SIP_LISTEN || "";
const pbxAddr = process.env.PBX_ADDR || "";
const expectCountry = process.env.EXPECT_COUNTRY || "";
mkdirSync(artifacts, { recursive: true });

let passed = 0, failed = 0;
async function test(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   - ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL - ${name}\n       ${String(e && e.stack || e).split("\n").slice(0, 3).join("\n       ")}`);
  }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }

async function apiGet(path) {
  const r = await fetch(base + path, { headers: token ? { Authorization: "Bearer " + token } : {} });
  assert(r.ok, `GET ${path}: HTTP ${r.status}`);
  return r.json();
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const pageErrors = [];
const row = (page, ip, port = "") => page.locator(`#blocks-body tr.block-row[data-ip="${ip}"][data-port="${port}"]`);

try {
  if (token) {
    await test("asks for the token once and keeps it for the session", async () => {
      const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
      const page = await ctx.newPage();
      await page.goto(base + "/");
      const dialog = page.locator("#token-dialog");
      await dialog.waitFor({ state: "visible", timeout: 5000 });
      await page.fill("#token-input", "wrong-" + token);
      await page.click("#token-submit");
      await page.locator("#token-error").filter({ hasText: "refused" }).waitFor({ timeout: 5000 });
      await page.fill("#token-input", token);
      await page.click("#token-submit");
      await row(page, scannerIp).waitFor({ timeout: 5000 });
      await page.reload();
      await row(page, scannerIp).waitFor({ timeout: 5000 });
      assert(!(await dialog.isVisible()), "asked again after a reload");
      await ctx.close();
    });
  }

  const ctx = await browser.newContext({ viewport: { width: 1440, height: 1000 } });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => pageErrors.push(e.message));
  page.on("dialog", (d) => d.accept());
  await page.goto(base + "/" + (token ? "#token=" + encodeURIComponent(token) : ""));

  await test("loads live, with the token from the URL fragment", async () => {
    assert((await page.title()).startsWith("sipwarden"), "title");
    await page.locator("#status.live").waitFor({ timeout: 5000 });
    assert(!page.url().includes("token="), "token left in the address bar");
    assert(!(await page.locator("#token-dialog").isVisible()), "token dialog shown");
  });

  await test("scanner block listed with type, device and country", async () => {
    const r = row(page, scannerIp);
    await r.waitFor({ timeout: 5000 });
    assert((await r.getAttribute("data-type")) === "SCANNER", "type attribute");
    const type = await r.locator('[data-col="type"]').innerText();
    assert(type.includes("SCANNER"), `type cell ${type}`);
    const device = await r.locator('[data-col="device"]').innerText();
    assert(device.toLowerCase().includes("friendly-scanner"), `device cell ${device}`);
    const country = await r.locator('[data-col="country"]').innerText();
    if (expectCountry) assert(country === expectCountry, `country ${country}, want ${expectCountry}`);
    else assert(country.length > 0, "country cell empty");
    const hits = Number(await r.locator('[data-col="hits"]').innerText());
    assert(hits >= 1, `hits ${hits}`);
  });

  await test("unblock countdown ticks down every second", async () => {
    const cell = row(page, scannerIp).locator('[data-col="countdown"]');
    const first = Number(await cell.getAttribute("data-secs"));
    const text1 = await cell.innerText();
    assert(first > 0, `countdown ${first} (${text1})`);
    await page.waitForTimeout(2300);
    const second = Number(await cell.getAttribute("data-secs"));
    const text2 = await cell.innerText();
    assert(second < first && first - second <= 4, `countdown ${first} (${text1}) then ${second} (${text2})`);
    assert(text1 !== text2, "text did not change");
  });

  await test("expanding a row shows the reason and the evidence", async () => {
    await row(page, scannerIp).click();
    const detail = page.locator("#blocks-body tr.detail");
    await detail.waitFor({ timeout: 3000 });
    const reason = await detail.locator(".reason").innerText();
    assert(/scanner/i.test(reason), `reason ${reason}`);
    const evidence = await detail.locator(".evidence").innerText();
    assert(/OPTIONS sip:/.test(evidence), `evidence ${evidence}`);
    // Survives the next refresh.
    await page.waitForTimeout(2300);
    assert(await detail.isVisible(), "detail closed by the refresh");
    await row(page, scannerIp).click();
  });

  await test("a REGISTER block's packets are drawn as a ladder: source, sipwarden, PBX", async () => {
    const r = row(page, guesserIp);
    await r.waitFor({ timeout: 5000 });
    assert((await r.getAttribute("data-type")) === "REGISTER", "type attribute");
    await r.click();
    const detail = page.locator("#blocks-body tr.detail");
    await detail.waitFor({ timeout: 3000 });
    const svg = detail.locator("svg.ladder");
    await svg.waitFor({ timeout: 5000 });
    const cols = await svg.locator("g.col").evaluateAll((gs) => gs.map((g) => [g.dataset.role, g.dataset.addr, g.querySelector(".col-title").textContent]));
    assert(cols.length === 3, `columns ${JSON.stringify(cols)}`);
    assert(cols[0][0] === "source" && cols[0][1].startsWith(guesserIp + ":"), `first column ${cols[0]}`);
    assert(cols[1][0] === "us" && cols[1][2] === "sipwarden" && (!sipListen || cols[1][1] === sipListen), `middle column ${cols[1]}`);
    assert(cols[2][0] === "pbx" && cols[2][2] === "PBX" && (!pbxAddr || cols[2][1] === pbxAddr), `last column ${cols[2]}`);
    const [src, us, pbx] = cols.map((c) => c[1]);
    const arrows = await svg.locator("g.arrow").evaluateAll((gs) => gs.map((g) => ({ from: g.dataset.from, to: g.dataset.to, label: g.dataset.label, cls: g.getAttribute("class"), t: g.querySelector("text.t").textContent })));
    assert(arrows.length === 8, `arrows ${arrows.length}: ${JSON.stringify(arrows)}`);
    // Two whole transactions, in order: request in, relayed, 403 in, 403 out.
    for (let i = 0; i < 8; i += 4) {
      const want = [[src, us, /^REGISTER sip:/], [us, pbx, /^REGISTER sip:/], [pbx, us, /^403 Forbidden/], [us, src, /^403 Forbidden/]];
      want.forEach(([from, to, re], j) => {
        const a = arrows[i + j];
        assert(a.from === from && a.to === to && re.test(a.label), `arrow ${i + j}: ${JSON.stringify(a)}, want ${from} -> ${to} ${re}`);
      });
    }
    assert(arrows[2].cls.includes("rx") && arrows[0].cls.includes("req"), "arrow colours by kind");
    assert(arrows[0].t === "+0.000s" && arrows.every((a) => /^\+\d+\.\d{3}s$/.test(a.t)), `relative times ${arrows.map((a) => a.t)}`);
    // run.sh waits 200 ms between guesses: the second transaction starts later than the first.
    assert(parseFloat(arrows[4].t.slice(1)) >= 0.2, `second transaction at ${arrows[4].t}`);
    const end = await svg.locator("g.end text").textContent();
    assert(end.includes("blocked: REGISTER"), `end marker ${end}`);
    const box = await svg.boundingBox();
    assert(box && box.width > 600 && box.height > 250, `ladder size ${JSON.stringify(box)}`);
    await detail.locator("dd.packets").screenshot({ path: `${artifacts}/ladder.png` });
    console.log(`screenshot: ${artifacts}/ladder.png`);
    // The list view stays available.
    await detail.locator("button.view-list").click();
    const list = await detail.locator("table.packets").innerText();
    assert(list.includes("403 Forbidden") && list.includes("guess-1001@127.0.0.9"), `list view ${list}`);
    await detail.locator("button.view-ladder").click();
    await detail.locator("svg.ladder").waitFor({ timeout: 3000 });
    await r.click();
  });

  await test("a scanner block's ladder: one OPTIONS from the source, dropped", async () => {
    await row(page, scannerIp).click();
    const detail = page.locator("#blocks-body tr.detail");
    const svg = detail.locator("svg.ladder");
    await svg.waitFor({ timeout: 5000 });
    const roles = await svg.locator("g.col").evaluateAll((gs) => gs.map((g) => g.dataset.role));
    assert(JSON.stringify(roles) === '["source","us"]', `columns ${roles}`);
    const labels = await svg.locator("g.arrow").evaluateAll((gs) => gs.map((g) => g.dataset.label));
    assert(labels.length === 1 && labels[0].startsWith("OPTIONS sip:100@"), `arrows ${labels}`);
    assert((await svg.locator("g.end text").textContent()).includes("blocked: SCANNER"), "end marker");
    await row(page, scannerIp).click();
  });

  await test("attacker text is shown as text, never run", async () => {
    const r = row(page, xssIp);
    await r.waitFor({ timeout: 5000 });
    const device = await r.locator('[data-col="device"]').innerText();
    assert(device.includes("<img"), `device cell ${device}`);
    assert((await page.evaluate(() => window.__xss)) === undefined, "injected script ran");
    assert((await page.locator("#blocks-body img").count()) === 0, "an <img> element was created");
  });

  await test("counters, drops by reason and the attack chart", async () => {
    const packets = Number((await page.locator("#stat-packets-in").innerText()).replace(/,/g, ""));
    assert(packets >= 2, `packets in ${packets}`);
    const blocks = Number((await page.locator("#stat-blocks").innerText()).replace(/,/g, ""));
    assert(blocks >= 3, `active blocks ${blocks}`);
    await page.locator('#drops-list .drop[data-reason="scanner"]').waitFor({ timeout: 3000 });
    const legend = await page.locator("#chart-legend").innerText();
    assert(legend.includes("SCANNER"), `chart legend: ${legend}`);
    const painted = await page.evaluate(() => {
      const c = document.getElementById("attack-chart");
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] === 0xa3 && d[i + 1] === 0x71 && d[i + 2] === 0xf7) n++;
      return n;
    });
    assert(painted > 0, "no SCANNER-coloured bar on the chart");
  });

  await test("filter box narrows the table", async () => {
    await page.fill("#filter", "friendly");
    await page.waitForTimeout(100);
    const types = await page.locator("#blocks-body tr.block-row").evaluateAll((rs) => rs.map((r) => r.dataset.type));
    assert(types.length >= 1 && types.every((t) => t === "SCANNER"), `rows after filter: ${types}`);
    await page.fill("#filter", "");
    await page.waitForTimeout(100);
  });

  await test("columns sort", async () => {
    await page.click('#blocks-table th[data-sort="ip"]');
    const ips = await page.locator("#blocks-body tr.block-row").evaluateAll((rs) => rs.map((r) => r.dataset.ip));
    const asc = [...ips].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
    assert(JSON.stringify(ips) === JSON.stringify(asc), `order ${ips}`);
    await page.click('#blocks-table th[data-sort="ip"]');
    const desc = await page.locator("#blocks-body tr.block-row").evaluateAll((rs) => rs.map((r) => r.dataset.ip));
    assert(JSON.stringify(desc) === JSON.stringify([...asc].reverse()), `reverse order ${desc}`);
    await page.click('#blocks-table th[data-sort="blocked"]');
  });

  await test("Unblock button lifts a block", async () => {
    const r = row(page, manualIp);
    await r.waitFor({ timeout: 5000 });
    assert((await r.getAttribute("data-type")) === "MANUAL", "manual block type");
    await r.locator("button.unblock").click();
    await r.waitFor({ state: "detached", timeout: 5000 });
    await page.waitForTimeout(2300);
    assert((await r.count()) === 0, "row came back after a refresh");
    const rows = await apiGet("/api/blocks");
    assert(!rows.some((b) => b.ip === manualIp), "still blocked according to the API");
  });

  await test("manual block form adds a block", async () => {
    await page.fill("#block-ip", "192.0.2.55:5062");
    await page.selectOption("#block-duration", "10m");
    await page.fill("#block-reason", "blocked from the dashboard");
    await page.click("#block-submit");
    const r = row(page, "192.0.2.55", "5062");
    await r.waitFor({ timeout: 5000 });
    assert((await r.getAttribute("data-type")) === "MANUAL", "type");
    const secs = Number(await r.locator('[data-col="countdown"]').getAttribute("data-secs"));
    assert(secs > 590 && secs <= 600, `countdown ${secs}`);
  });

  await test("whitelist form adds an entry", async () => {
    await page.fill("#whitelist-cidr", "198.51.100.0/24");
    await page.fill("#whitelist-comment", "branch office");
    await page.click("#whitelist-submit");
    const r = page.locator('#whitelist-body tr[data-cidr="198.51.100.0/24"]');
    await r.waitFor({ timeout: 5000 });
    assert((await r.innerText()).includes("branch office"), "comment");
    const list = await apiGet("/api/whitelist");
    assert(list.some((e) => e.cidr === "198.51.100.0/24" && e.source === "api"), "not in the API's whitelist");
  });

  await test("bad input is reported, not applied", async () => {
    await page.fill("#blacklist-cidr", "10.0.0.0/99");
    await page.click("#blacklist-submit");
    await page.locator(".toast.err").filter({ hasText: "not an IP address or CIDR" }).waitFor({ timeout: 5000 });
    const list = await apiGet("/api/blacklist");
    assert(list.length === 0, "blacklist changed");
  });

  await test("no script errors", async () => {
    assert(pageErrors.length === 0, pageErrors.join("; "));
  });

  await page.evaluate(() => document.getElementById("toast").replaceChildren());
  await row(page, scannerIp).click();
  await page.locator("#blocks-body tr.detail").waitFor({ timeout: 3000 }).catch(() => {});
  await page.screenshot({ path: `${artifacts}/dashboard.png`, fullPage: true });
  console.log(`screenshot: ${artifacts}/dashboard.png`);
  await ctx.close();
} finally {
  await browser.close();
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
