// The real swarm: the signaling server, three native peers (`shoal-peer`, WebRTC on the
// `webrtc` crate) and two contributor pages in headless Chromium (the wasm peer in its Web
// Worker, WebRTC in the browser) train the demo digits together after one consent click
// each. Every peer must end above the accuracy target on the same model version.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, launchBrowser, webrtcPage, pressConsent } from './harness.mjs';

const root = process.env.SHOAL_ROOT ?? new URL('../..', import.meta.url).pathname;
const peerBin = process.env.SHOAL_PEER_BIN ?? join(root, 'target/release/shoal-peer');
// The demo task's learning rate settles over 30 rounds (of a second's training each);
// a few more to finish there.
const ROUNDS = Number(process.env.SHOAL_SWARM_ROUNDS ?? 35);
const TARGET = 0.95;

let server;
let browser;
let dir;
const natives = [];

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
  dir = mkdtempSync(join(tmpdir(), 'shoal-swarm-'));
});

after(async () => {
  await browser?.close();
  for (const n of natives) {
    if (n.child.exitCode === null) {
      n.child.kill('SIGINT');
      await once(n.child, 'exit');
    }
  }
  await server?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Parses `round R loss L acc A% peers N ... used U rejected X samples S ...`. */
function roundLine(line) {
  const m = line.match(/^round (\d+) .* acc ([0-9.]+)% peers (\d+) .* used (\d+) rejected (\d+) samples (\d+)/);
  return m ? { round: Number(m[1]), accuracy: Number(m[2]) / 100, peers: Number(m[3]), used: Number(m[4]),
    rejected: Number(m[5]), samples: Number(m[6]) } : null;
}

function startNative(i) {
  const child = spawn(peerBin, ['--server', server.url.replace('http://', 'ws://'), '--task', 'digits',
    '--bind', '127.0.0.1', '--cpu', '--rounds', String(ROUNDS), '--data', join(root, 'data'),
    '--identity', join(dir, `native${i}.key`)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const n = { child, rounds: [], out: '' };
  child.stdout.on('data', (d) => {
    n.out += d;
    const lines = n.out.split('\n');
    n.out = lines.pop();
    for (const l of lines) {
      const r = roundLine(l);
      if (r) n.rounds.push(r);
    }
  });
  natives.push(n);
  return n;
}

test('three native and two browser peers train the digits past the target on one version', async () => {
  const pages = [];
  for (let i = 0; i < 2; i++) {
    // The CPU backend: SwiftShader, the software WebGPU adapter here, is too slow to train
    // 100+ rounds in a test (the WebGPU backend has its own browser tests).
    const page = await webrtcPage(browser, `${server.url}/?backend=cpu`);
    await page.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
    await pressConsent(page);
    pages.push(page);
  }
  for (let i = 0; i < 3; i++) startNative(i);

  const exits = natives.map((n) => once(n.child, 'exit'));
  const [codes] = await Promise.all([
    Promise.all(exits),
    ...pages.map((p) => p.waitForFunction((r) => window.shoalProgress.some((e) => e.round >= r), ROUNDS,
      { timeout: 900_000, polling: 500 })),
  ]);
  for (const [code] of codes) assert.equal(code, 0, 'native peers exit cleanly');

  const finals = [];
  for (const [i, n] of natives.entries()) {
    const last = n.rounds.at(-1);
    finals.push({ who: `native ${i}`, ...last, maxPeers: Math.max(...n.rounds.map((r) => r.peers)),
      usage: `used ${last.used} in its last round, rejected ${last.rejected}, ${last.samples} samples` });
  }
  for (const [i, page] of pages.entries()) {
    const history = await page.evaluate(() => window.shoalProgress);
    const at = history.find((e) => e.round === ROUNDS);
    const end = history.at(-1);
    finals.push({ who: `browser ${i}`, ...at, maxPeers: Math.max(...history.map((e) => e.peers)),
      usage: `used ${end.used}, rejected ${JSON.stringify(end.rejected)}, ${Math.round(end.samples_per_s)} samples/s` });
    const shown = await page.textContent('#stats dd[data-key="held-out accuracy"]');
    assert.match(shown, /^\d+\.\d\d%$/, 'the page shows the accuracy');
  }
  console.log(finals.map((f) => `${f.who}: version ${f.round}, ${(f.accuracy * 100).toFixed(2)}%, up to ${f.maxPeers} neighbours; ${f.usage}`).join('\n'));
  for (const f of finals) {
    assert.equal(f.round, ROUNDS, `${f.who} holds the swarm's model version`);
    assert.ok(f.maxPeers >= 3, `${f.who} trained with the swarm (${f.maxPeers} neighbours)`);
    assert.ok(f.accuracy >= TARGET, `${f.who} ended at ${f.accuracy}`);
  }

  // The ledger: every peer, native or browser, was credited by the receipts its
  // neighbours signed, the browsers (slower here than the native peers, so their updates
  // are the noisier ones the screen judges) for at least a quarter of the rounds.
  const credits = await (await fetch(`${server.url}/api/tasks/digits/credits`)).json();
  const browserKeys = await Promise.all(pages.map((p) => p.evaluate(() => window.shoalKey)));
  const credited = (pub) => credits.keys.find((k) => k.key === pub);
  const rows = [];
  for (const [i, page] of pages.entries()) rows.push([`browser ${i}`, credited(browserKeys[i])]);
  console.log(`ledger: ${credits.count} receipts; ${rows.map(([w, c]) => `${w}: ${c?.credit ?? 0} samples over ${c?.rounds ?? 0} rounds`).join(', ')}; keys ${JSON.stringify(credits.keys.map((k) => [k.key.slice(0, 8), k.credit, k.rounds]))}`);
  assert.equal(credits.ranked, 5, 'every peer has credit');
  for (const [who, c] of rows) assert.ok(c && c.rounds >= ROUNDS / 4, `${who} credited for ${c?.rounds ?? 0} rounds`);
});
