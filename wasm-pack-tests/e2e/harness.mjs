// Shared setup for the end-to-end tests: a real Shoal server on a free loopback port and
// Debian's Chromium driven by Playwright. `cargo xtask test` runs these inside a network
// namespace whose only interface is loopback.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import http from 'node:http';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const root = process.env.SHOAL_ROOT ?? new URL('../..', import.meta.url).pathname;
const serverBin = process.env.SHOAL_SERVER_BIN ?? join(root, 'target/release/shoal-signaling-server');

const made = [];
// Node runs each test file in a process of its own: what a file made is removed when it
// ends, passed or failed (the ledgers, keys and task files of every run piled up in /tmp).
process.on('exit', () => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

/** A fresh folder under the system's temporary one, removed when this test file ends. */
export function tempDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}

/** Every server started, killed when this test process exits however it ends (with
 *  `--test-force-exit`, a failed test's server would otherwise outlive the run). */
const servers = new Set();
process.on('exit', () => {
  for (const child of servers) child.kill('SIGKILL');
});

/** Starts the server on 127.0.0.1:0 and resolves once it prints its address. */
export async function startServer(extraArgs = []) {
  // Each server remembers its own pauses: a test never inherits another's.
  const dir = tempDir('shoal-e2e-');
  const state = join(dir, 'state.json');
  const ledgerDir = join(dir, 'ledger');
  const child = spawn(serverBin, ['--bind', '127.0.0.1', '--port', '0',
    '--www', join(root, 'www'), '--data', join(root, 'data'),
    '--task-file', join(root, 'tasks/digits.toml'), '--state-file', state,
    '--ledger-dir', ledgerDir,
    // Every browser and the tests themselves connect from 127.0.0.1: one address, as
    // behind a reverse proxy, so no per-address share of the ledger's read places.
    ...(extraArgs.includes('--ledger-reads-per-address') ? [] : ['--ledger-reads-per-address', '0']),
    ...extraArgs],
  { stdio: ['ignore', 'pipe', 'inherit'] });
  servers.add(child);
  child.on('exit', () => servers.delete(child));
  let out = '';
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`server did not start: ${out}`));
    }, 30_000);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const m = out.match(/listening on (http:\/\/[0-9.:]+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited with ${code}: ${out}`)); });
  });
  return {
    url,
    /** Where each task's ledger is (`{task}.ledger`). */
    ledgerDir,
    ws: `${url.replace('http://', 'ws://')}/ws/digits?v=2`,
    /** Kills the server abruptly (SIGKILL), as a crash would. */
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGKILL');
      await once(child, 'exit');
    },
    /** Stops the server (SIGTERM; SIGKILL if it has not exited 10 s later). */
    async stop() {
      if (child.exitCode !== null) return child.exitCode;
      child.kill('SIGTERM');
      const late = setTimeout(() => child.kill('SIGKILL'), 10_000);
      const [code] = await once(child, 'exit');
      clearTimeout(late);
      return code;
    },
  };
}

/** Flags every test browser needs: headless, WebGPU on, no background network chatter,
 *  and loopback ICE candidates for the WebRTC tests. */
export const CHROMIUM_ARGS = [
  '--no-sandbox', '--enable-unsafe-webgpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage', '--allow-loopback-in-peer-connection',
  // Every site of these tests is on loopback, which no deployment is: Chromium's Local
  // Network Access checks would block the cross-site widget frame's websocket to the
  // loopback server (ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS). On the internet both
  // the host page and the Shoal server are public, where those checks do not apply.
  '--disable-features=LocalNetworkAccessChecks',
];

export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_ARGS,
  });
}

/** Serves the demo article that embeds Shoal (`examples/embed-host`), its script tag
 *  pointing at `shoalUrl`, on a free loopback port; resolves to the HTTP server. */
export async function startEmbedHost(shoalUrl) {
  const page = readFileSync(join(root, 'examples/embed-host/index.html'), 'utf8').replaceAll('{{SHOAL}}', shoalUrl);
  const host = http.createServer((req, res) => {
    res.writeHead(req.url === '/' ? 200 : 404, { 'content-type': 'text/html; charset=utf-8' });
    res.end(req.url === '/' ? page : 'not found');
  });
  host.listen(0, '127.0.0.1');
  await once(host, 'listening');
  return host;
}

/** A Shoal server, the demo site that embeds it and a browser; `stop()` ends all three
 *  and resolves to the server's exit code. */
export async function startSites(serverArgs = []) {
  const server = await startServer(serverArgs);
  const host = await startEmbedHost(server.url);
  const browser = await launchBrowser();
  return {
    server, host, browser,
    async stop() {
      await browser.close();
      host.close();
      return server.stop();
    },
  };
}

/** A visitor: a browser context of its own (1200x900) with the media permission that
 *  Chromium wants before it gathers loopback ICE candidates (a test-harness need: Shoal
 *  never asks for media), granted for every origin so that it covers the widget's
 *  cross-origin frame too. Page errors are logged. */
export async function visitorPage(browser) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  await context.grantPermissions(['microphone', 'camera']);
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[page error] ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') console.error(`[page console] ${m.text()}`); });
  return page;
}

/** A visitor without WebGPU: the worker's navigator has no `gpu` (the CPU backend, and
 *  the page's words for it). */
export async function withoutWebGpu(page) {
  await page.route('**/worker.js', async (route) => {
    const res = await route.fetch();
    const body = `Object.defineProperty(WorkerNavigator.prototype, 'gpu', { get: () => undefined });\n${await res.text()}`;
    await route.fulfill({ response: res, body });
  });
}

/** A fresh browser context with the media permission Chromium requires before it will
 *  gather loopback ICE candidates (a test-harness need only: Shoal never asks for media). */
export async function webrtcPage(browser, url) {
  const context = await browser.newContext();
  await context.grantPermissions(['microphone', 'camera']);
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[page error] ${e.message}`));
  await page.goto(url);
  return page;
}

/** In the page: loads the bundle, joins the swarm at `ws`, and records every event in
 *  `window.shoalEvents`. */
export async function joinSwarm(page, ws) {
  await page.evaluate(async (ws) => {
    const shoal = await import('/pkg/shoal_web_client.js');
    // The module's exports, its memory among them (a test measures what a peer holds).
    window.shoalWasm = await shoal.default();
    window.shoalEvents = [];
    window.swarm = shoal.Swarm.connect(ws);
    (async () => {
      for (;;) {
        const e = await window.swarm.next();
        window.shoalEvents.push(e);
      }
    })();
  }, ws);
}

/** In the page, before it joins: records each connection Shoal makes and its channel
 *  (`window.connections`, `window.channels`), for a test to act as a hostile neighbour
 *  on them. */
export async function recordConnections(page) {
  await page.evaluate(() => {
    const make = RTCPeerConnection.prototype.createDataChannel;
    window.connections = [];
    window.channels = [];
    RTCPeerConnection.prototype.createDataChannel = function (...args) {
      const dc = make.apply(this, args);
      window.connections.push(this);
      window.channels.push(dc);
      return dc;
    };
  });
}

/** In a page whose connections are recorded: opens a data channel of its own on each
 *  (Shoal's one channel is negotiated, so the other side's `ondatachannel` fires) and
 *  sends 300 messages of 16 KiB on it as it opens. Returns how many it opened. */
export async function openChannelsOfItsOwn(page) {
  return page.evaluate(() => {
    const connections = [...window.connections];
    for (const pc of connections) {
      const x = pc.createDataChannel('x');
      x.onopen = () => {
        const junk = new Uint8Array(16 << 10);
        for (let i = 0; i < 300; i++) x.send(junk);
      };
    }
    return connections.length;
  });
}

/** Waits until `peer` is reported down in the page. */
export async function peerDown(page, peer, timeout = 15_000) {
  await page.waitForFunction((p) => window.shoalEvents.some((e) => e.type === 'peer_down' && e.peer === p),
    peer, { timeout, polling: 100 });
}

/** Waits until the page's swarm has an open channel and returns that peer's id. */
export async function firstPeer(page, timeout = 60_000) {
  const handle = await page.waitForFunction(() => {
    const up = window.shoalEvents.find((e) => e.type === 'peer_up');
    return up ? up.peer : false;
  }, null, { timeout, polling: 100 });
  return handle.jsonValue();
}

/** Clicks the contributor page's consent button as a visitor does: the pointer comes onto
 *  it and moves across it before the press (the page refuses a press where the pointer
 *  rests on the button without having moved there: another site's window closed at the
 *  first click of a "double-click" leaves it so). */
export async function pressConsent(page) {
  const button = page.locator('#consent');
  await button.hover();
  await button.click({ position: { x: 12, y: 10 } });
}

/** Clicks "Contribute" in the widget's frame (`frame`: a FrameLocator) until the frame
 *  takes it as consent. Chromium drops input to a cross-origin frame that moved or
 *  painted only just now (its own guard against clickjacking), as a visitor's first click
 *  can be; a visitor clicks again, and so does this. Like a visitor, it looks at the
 *  button before it clicks: the frame refuses a click on a button shown for less than
 *  half a second, and moves the pointer onto it before pressing. */
export async function consentInFrame(frame) {
  const given = frame.locator('body[data-consent="given"]');
  const button = frame.getByRole('button', { name: 'Contribute' });
  for (let i = 0; i < 10; i++) {
    await button.waitFor({ state: 'visible' });
    // Onto the button, and across it (a press counts once the pointer moved over it).
    await button.hover();
    await new Promise((r) => setTimeout(r, 800));
    await button.click({ position: { x: 12, y: 10 } });
    if (await given.waitFor({ state: 'attached', timeout: 2_000 }).then(() => true, () => false)) return;
  }
  const consent = await frame.locator('body').getAttribute('data-consent').catch(() => '?');
  throw new Error(`ten clicks in the widget's frame were not taken as consent (${consent})`);
}
