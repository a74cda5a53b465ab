// JsSIP in headless Debian chromium (playwright-core), for tests/interop/ws.sh.
//
//   node jssip.test.mjs PHONES...     PHONE = name,url,user,password   e.g. ws,ws://127.0.0.1:5765,1001,secret1001
//
// Serves a test page on http://127.0.0.1:8790 (PAGE_PORT; a localhost page is a secure context,
// so WebSocket and getUserMedia work), opens one page per phone, registers each with JsSIP and
// answers every incoming call. Prints one line per event on stdout, "<name> <EVENT> [details]":
// REGISTERED, REGFAILED, DISCONNECTED, INCOMING, ACCEPTED, CONFIRMED, ENDED, FAILED, and for
// the probe below OVERSIZED_CLOSED <code>. Runs until the file named by $DONE_FILE exists or
// $MAX_SECONDS (default 170) pass; the shell drives the calls meanwhile.
// A file $OVERSIZE_FILE appearing makes the first phone's page open a second WebSocket (with the
// "sip" subprotocol) and send one frame of 70000 bytes: sipwarden must close it.

import { createServer } from "node:http";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const bundle = readFileSync(process.env.JSSIP_BUNDLE || join(here, "jssip.bundle.js"));
const port = Number(process.env.PAGE_PORT || 8790);
const maxSeconds = Number(process.env.MAX_SECONDS || 170);
const doneFile = process.env.DONE_FILE || "";
const oversizeFile = process.env.OVERSIZE_FILE || "";
const phones = process.argv.slice(2).map((a) => {
  const [name, url, user, password] = a.split(",");
  return { name, url, user, password };
});

const page = `<!doctype html><meta charset="utf-8"><title>sipwarden ws interop</title>
<script src="/jssip.js"></script>
<script>
window.events = [];
function ev(s) { window.events.push(s); }
window.startPhone = function (url, user, password) {
  const socket = new JsSIP.WebSocketInterface(url);
  const ua = new JsSIP.UA({
    sockets: [socket], uri: "sip:" + user + "@sipwarden.test", password: password,
    register: true, register_expires: 300, session_timers: false,
    connection_recovery_min_interval: 2, connection_recovery_max_interval: 4,
    user_agent: "JsSIP-interop",
  });
  ua.on("registered", () => ev("REGISTERED"));
  ua.on("registrationFailed", (e) => ev("REGFAILED " + (e.cause || "")));
  ua.on("disconnected", () => ev("DISCONNECTED"));
  ua.on("newRTCSession", (e) => {
    if (e.originator !== "remote") return;
    const s = e.session;
    ev("INCOMING " + (e.request.call_id || ""));
    s.on("accepted", () => ev("ACCEPTED"));
    s.on("confirmed", () => ev("CONFIRMED"));
    s.on("ended", (x) => ev("ENDED " + (x.cause || "")));
    s.on("failed", (x) => ev("FAILED " + (x.cause || "")));
    s.answer({ mediaConstraints: { audio: true, video: false }, pcConfig: { iceServers: [] } });
  });
  ua.start();
  window.ua = ua;
};
window.oversize = function (url) {
  const ws = new WebSocket(url, "sip");
  ws.onopen = () => ws.send("x".repeat(70000));
  ws.onclose = (e) => ev("OVERSIZED_CLOSED " + e.code);
};
</script>`;

const server = createServer((req, res) => {
  if (req.url === "/jssip.js") {
    res.writeHead(200, { "content-type": "text/javascript" });
    res.end(bundle);
  } else {
    res.writeHead(200, { "content-type": "text/html" });
    res.end(page);
  }
});
await new Promise((ok) => server.listen(port, "127.0.0.1", ok));

// An empty profile of our own (playwright takes it as userDataDir, not as a flag).
const ctx = await chromium.launchPersistentContext(process.env.USER_DATA_DIR || "/tmp/sw-ws-chromium", {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  ignoreHTTPSErrors: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--ignore-certificate-errors",
  ],
});
const pages = [];
for (const p of phones) {
  const pg = await ctx.newPage();
  pg.on("console", (m) => { if (m.type() === "error") console.log(`${p.name} CONSOLE ${m.text().slice(0, 200)}`); });
  await pg.goto(`http://127.0.0.1:${port}/`);
  await pg.evaluate(([u, user, pw]) => window.startPhone(u, user, pw), [p.url, p.user, p.password]);
  pages.push({ p, pg, seen: 0 });
}

const started = Date.now();
let oversized = false;
for (;;) {
  for (const x of pages) {
    const evs = await x.pg.evaluate(() => window.events);
    for (const e of evs.slice(x.seen)) console.log(`${x.p.name} ${e}`);
    x.seen = evs.length;
  }
  if (!oversized && oversizeFile && existsSync(oversizeFile) && pages.length) {
    oversized = true;
    await pages[0].pg.evaluate((u) => window.oversize(u), pages[0].p.url);
  }
  if ((doneFile && existsSync(doneFile)) || Date.now() - started > maxSeconds * 1000) break;
  await new Promise((ok) => setTimeout(ok, 200));
}
await ctx.close();
server.close();
