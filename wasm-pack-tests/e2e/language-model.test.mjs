// The text task end to end: the server offers tasks/fortunes.toml beside the digits, two
// native peers train its byte-level transformer together over real WebRTC, and the
// researcher's dashboard (headless Chromium) evaluates the swarm's model in its worker:
// it shows the held-out loss in bits per byte, against the task's target, and a text the
// current model wrote, updating as new versions arrive.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, launchBrowser, visitorPage } from './harness.mjs';

const root = process.env.SHOAL_ROOT ?? new URL('../..', import.meta.url).pathname;
const peerBin = process.env.SHOAL_PEER_BIN ?? join(root, 'target/release/shoal-peer');
const taskFile = join(root, 'tasks/fortunes.toml');

let server;
let browser;
const peers = [];

before(async () => {
  server = await startServer(['--task-file', taskFile]);
  browser = await launchBrowser();
});

function startPeers() {
  const keys = mkdtempSync(join(tmpdir(), 'shoal-lm-'));
  for (const name of ['a', 'b']) {
    const child = spawn(peerBin, ['--server', server.url.replace('http://', 'ws://'), '--task', 'fortunes',
      '--task-file', taskFile, '--data', join(root, 'data'), '--bind', '127.0.0.1', '--cpu',
      '--identity', join(keys, `${name}.key`)], { stdio: ['ignore', 'pipe', 'inherit'] });
    child.out = '';
    child.stdout.on('data', (d) => { child.out += d; });
    peers.push(child);
  }
}

after(async () => {
  await browser?.close();
  // The peers' own shutdown is tested elsewhere; here they only need to be gone.
  for (const p of peers) {
    if (p.exitCode === null && p.signalCode === null) {
      p.kill('SIGKILL');
      await once(p, 'exit');
    }
  }
  await server?.stop();
});

test('native peers train the text task and the dashboard shows bits per byte and a sample', async () => {
  // A context with the media permission Chromium wants before it gathers loopback ICE
  // candidates (a harness need only).
  const page = await visitorPage(browser);
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`${server.url}/dashboard/?task=fortunes`);
  await page.waitForFunction(() => document.getElementById('task-title').textContent.includes('bits per byte'),
    null, { timeout: 30_000 });
  const title = await page.$eval('#task-title', (e) => e.textContent);
  assert.match(title, /target held-out loss 2\.60 bits per byte/);
  assert.equal(await page.$eval('#l-accuracy', (e) => e.textContent), 'Held-out bits per byte');
  // The dashboard first, so that it watches from the beginning; then the peers.
  await page.waitForFunction(() => document.getElementById('state').dataset.state !== 'connecting',
    null, { timeout: 30_000 });
  startPeers();
  // Two evaluations of different versions, each with a sample.
  const read = () => page.evaluate(() => ({
    bits: Number(document.getElementById('n-accuracy').textContent),
    state: document.getElementById('state').textContent,
    version: Number(document.getElementById('n-version').textContent),
    prompt: document.getElementById('sample-prompt').textContent,
    text: document.getElementById('sample-text').textContent,
    sampleVersion: Number(document.getElementById('sample-version').textContent),
    hidden: document.getElementById('sample-card').hidden,
  }));
  await page.waitForFunction(() => Number(document.getElementById('n-version').textContent) >= 1,
    null, { timeout: 120_000, polling: 500 }).catch(async (e) => {
    throw new Error(`${e.message}; dashboard: ${JSON.stringify(await read())}; peers: ${peers.map((p) => p.out.slice(-300)).join(' | ')}`);
  });
  const first = await read();
  await page.waitForFunction((v) => Number(document.getElementById('n-version').textContent) > v,
    first.version, { timeout: 120_000, polling: 500 });
  const later = await read();
  console.log(`dashboard: version ${first.version} at ${first.bits} bits/byte, version ${later.version} at ${later.bits}`);
  console.log(`sample at version ${later.sampleVersion}: ${JSON.stringify(later.prompt)} -> ${JSON.stringify(later.text)}`);
  for (const s of [first, later]) {
    assert.ok(s.bits > 0 && s.bits < 8, `bits per byte is a held-out loss: ${s.bits}`);
    assert.equal(s.hidden, false, 'the sample card shows');
    assert.equal(s.sampleVersion, s.version, 'the sample comes from the version shown');
    assert.equal(s.prompt.length, 48, 'the prompt is the start of the held-out text');
    assert.ok(s.text.length >= 100, `the model wrote its sample: ${JSON.stringify(s.text)}`);
  }
  assert.ok(later.bits < 8, 'an untrained byte model is at 8 bits per byte; the swarm trained');
  assert.notEqual(later.text, first.text, 'the sample follows the model');
  // The native peers trained together: each used the other's updates.
  for (const p of peers) assert.match(p.out, /round \d+ .* used [1-9]/, p.out.slice(-400));
  assert.deepEqual(errors, []);
});
