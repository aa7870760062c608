// The text task end to end: the server offers tasks/fortunes.toml beside the digits; two
// native peers and a contributor page in headless Chromium (the wasm peer in its worker)
// train its byte-level transformer together over real WebRTC until every one of them holds
// the same model version, and that version's held-out loss is below the task's target (in
// bits per byte). Meanwhile the researcher's dashboard evaluates the swarm's model in its
// own worker: it shows the held-out loss against the target and a text the current model
// wrote, updating as new versions arrive; and the visitor tries the model in a prompt box.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, launchBrowser, visitorPage, webrtcPage, tempDir, pressConsent } from './harness.mjs';

const root = process.env.SHOAL_ROOT ?? new URL('../..', import.meta.url).pathname;
const peerBin = process.env.SHOAL_PEER_BIN ?? join(root, 'target/release/shoal-peer');
const taskFile = join(root, 'tasks/fortunes.toml');
// The version every peer must reach. The swarm here passes the task's target around
// version 50-55 (runs vary with the keys' data orders and the machine's load), and
// `scenarios/lm-4.toml` shows the curve; 65 leaves a margin (in ten full runs, native
// peer a held 3.10-3.13 bits per byte at version 60, against the target's 3.2).
const ROUNDS = Number(process.env.SHOAL_LM_ROUNDS ?? 65);
const TARGET = Number(readFileSync(taskFile, 'utf8').match(/^target_bits_per_byte = ([0-9.]+)/m)[1]);

let server;
let browser;
const peers = [];

before(async () => {
  server = await startServer(['--task-file', taskFile]);
  browser = await launchBrowser();
});

/** Parses a native peer's `round R ... bits/byte B`. */
function roundLine(line) {
  const m = line.match(/^round (\d+) .* peers (\d+) .* used (\d+) .* bits\/byte ([0-9.]+)$/);
  return m ? { round: Number(m[1]), peers: Number(m[2]), used: Number(m[3]), bits: Number(m[4]) } : null;
}

function startPeers() {
  const keys = tempDir('shoal-lm-');
  for (const name of ['a', 'b']) {
    const child = spawn(peerBin, ['--server', server.url.replace('http://', 'ws://'), '--task', 'fortunes',
      '--task-file', taskFile, '--data', join(root, 'data'), '--bind', '127.0.0.1', '--cpu',
      '--rounds', String(ROUNDS), '--identity', join(keys, `${name}.key`)], { stdio: ['ignore', 'pipe', 'inherit'] });
    const n = { name, child, rounds: [], tail: '', rest: '' };
    child.stdout.on('data', (d) => {
      const lines = (n.rest + d).split('\n');
      n.rest = lines.pop();
      for (const l of lines) {
        n.tail = (n.tail + l + '\n').slice(-600);
        const r = roundLine(l);
        if (r) n.rounds.push(r);
      }
    });
    peers.push(n);
  }
}

after(async () => {
  await browser?.close();
  for (const { child } of peers) {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await once(child, 'exit');
    }
  }
  await server?.stop();
});

test('native and browser peers train the text task to its target on one version; the dashboard follows', async () => {
  // The dashboard first, so that it watches from the beginning. (A context with the media
  // permission Chromium wants before it gathers loopback ICE candidates: a harness need.)
  const dash = await visitorPage(browser);
  const errors = [];
  dash.on('pageerror', (e) => errors.push(String(e)));
  await dash.goto(`${server.url}/dashboard/?task=fortunes`);
  await dash.waitForFunction(() => document.getElementById('task-title').textContent.includes('bits per byte'),
    null, { timeout: 30_000 });
  const title = await dash.$eval('#task-title', (e) => e.textContent);
  assert.match(title, new RegExp(`target held-out loss ${TARGET.toFixed(2)} bits per byte`));
  assert.equal(await dash.$eval('#l-accuracy', (e) => e.textContent), 'Held-out bits per byte');
  await dash.waitForFunction(() => document.getElementById('state').dataset.state !== 'connecting',
    null, { timeout: 30_000 });

  // A visitor contributes from the contributor page of the text task (the CPU backend:
  // SwiftShader's WebGPU is too slow for many rounds; the WGSL kernels have their own
  // browser conformance tests).
  const visitor = await webrtcPage(browser, `${server.url}/?task=fortunes&backend=cpu`);
  visitor.on('pageerror', (e) => errors.push(String(e)));
  await visitor.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  // The task has no upload budget: the page still says what model answers may take.
  assert.match(await visitor.locator('#cost').textContent(),
    /models your device sends to neighbours and dashboards that ask are held to \d+(\.\d+)? MB an hour more/);
  await pressConsent(visitor);
  startPeers();

  const read = () => dash.evaluate(() => ({
    bits: Number(document.getElementById('n-accuracy').textContent),
    version: Number(document.getElementById('n-version').textContent),
    prompt: document.getElementById('sample-prompt').textContent,
    text: document.getElementById('sample-text').textContent,
    sampleVersion: Number(document.getElementById('sample-version').textContent),
    hidden: document.getElementById('sample-card').hidden,
  }));
  const state = async () => `dashboard ${JSON.stringify(await read())}; ${peers.map((p) => `${p.name}: ${p.tail}`).join(' | ')}`;
  await dash.waitForFunction(() => Number(document.getElementById('n-version').textContent) >= 1,
    null, { timeout: 120_000, polling: 500 }).catch(async (e) => { throw new Error(`${e.message}; ${await state()}`); });
  const first = await read();

  // Every peer reaches the version; the natives stop there.
  const exits = peers.map((p) => once(p.child, 'exit'));
  const [codes] = await Promise.all([
    Promise.all(exits),
    visitor.waitForFunction((r) => window.shoalProgress.some((e) => e.round >= r), ROUNDS,
      { timeout: 600_000, polling: 1000 }).catch(async (e) => { throw new Error(`${e.message}; ${await state()}`); }),
  ]);
  for (const [code] of codes) assert.equal(code, 0, 'native peers exit cleanly');

  const finals = peers.map((p) => ({ who: `native ${p.name}`, ...p.rounds.at(-1),
    maxPeers: Math.max(...p.rounds.map((r) => r.peers)), used: p.rounds.reduce((s, r) => s + r.used, 0),
    roundsUsing: p.rounds.filter((r) => r.used >= 1).length }));
  const history = await visitor.evaluate(() => window.shoalProgress);
  const at = history.find((e) => e.round === ROUNDS);
  assert.ok(at, `the browser peer closed round ${ROUNDS}: ${JSON.stringify(history.slice(-3))}`);
  finals.push({ who: 'browser', round: at.round, bits: at.test_loss / Math.LN2,
    maxPeers: Math.max(...history.map((e) => e.peers)) });
  // The worker's wasm memory only grows: its last size is its peak.
  const peak = Math.max(...history.map((e) => e.wasm_memory_bytes));
  console.log(`the browser peer's worker: wasm memory peak ${(peak / 2 ** 20).toFixed(1)} MiB`);
  assert.ok(peak > 0 && peak < 256 * 2 ** 20, `the worker stays under 256 MiB of wasm memory: ${peak}`);
  const shown = await visitor.textContent('#stats dd[data-key="held-out bits per byte"]');
  assert.match(shown, /^\d\.\d{3}$/, 'the contributor page shows the held-out loss in bits per byte');

  // The visitor tries the model their browser holds: a prompt box, answered in the worker.
  assert.equal(await visitor.$eval('#try-image', (e) => e.hidden), true, 'a text task offers no drawing pad');
  await visitor.fill('#try-prompt', 'The secret of a happy life is');
  await visitor.click('#try-go');
  await visitor.waitForFunction(() => document.getElementById('try-output-text').textContent.length > 0, null,
    { timeout: 60_000 });
  const tried = await visitor.evaluate(() => ({
    prompt: document.getElementById('try-output-prompt').textContent,
    text: document.getElementById('try-output-text').textContent,
    status: document.getElementById('try-status').textContent,
  }));
  console.log(`the visitor's try: ${JSON.stringify(tried)}`);
  assert.equal(tried.prompt, 'The secret of a happy life is');
  assert.ok(tried.text.length >= 200, `the model wrote its 240 bytes: ${JSON.stringify(tried.text)}`);
  const version = Number(tried.status.match(/^Model version (\d+), answered in \d+ ms in the worker\.$/)?.[1]);
  assert.ok(version >= ROUNDS, `the swarm's trained model answered: ${tried.status}`);

  // The dashboard catches up with the final version.
  await dash.waitForFunction((v) => Number(document.getElementById('n-version').textContent) >= v, ROUNDS,
    { timeout: 120_000, polling: 500 }).catch(async (e) => { throw new Error(`${e.message}; ${await state()}`); });
  const last = await read();
  console.log(finals.map((f) => `${f.who}: version ${f.round}, ${f.bits.toFixed(3)} bits/byte, up to ${f.maxPeers} neighbours`
    + (f.used === undefined ? '' : `, ${f.used} updates used`)).join('\n'));
  console.log(`native a's held-out bits/byte by version: ${peers[0].rounds.filter((r) => r.round % 10 === 0).map((r) => `${r.round}: ${r.bits}`).join(', ')}`);
  console.log(`dashboard: version ${first.version} at ${first.bits} bits/byte ... version ${last.version} at ${last.bits}`);
  console.log(`sample at version ${last.sampleVersion}: ${JSON.stringify(last.prompt)} -> ${JSON.stringify(last.text)}`);
  for (const f of finals) {
    assert.equal(f.round, ROUNDS, `${f.who} holds the swarm's model version`);
    assert.ok(f.maxPeers >= 2, `${f.who} trained with the swarm (${f.maxPeers} neighbours)`);
    assert.ok(f.bits <= TARGET, `${f.who} ended at ${f.bits} bits/byte, target ${TARGET}`);
  }
  // Each native peer aggregated its neighbours' updates in most rounds (a late one is
  // left for the next round, so not in every round).
  for (const f of finals.filter((f) => f.used !== undefined)) {
    assert.ok(f.roundsUsing >= ROUNDS / 2, `${f.who} used its neighbours' updates in ${f.roundsUsing} of ${ROUNDS} rounds`);
  }
  // The dashboard measures the whole held-out split, the peers a fixed subset of it.
  assert.ok(last.bits <= TARGET + 0.1, `the dashboard's held-out loss of version ${last.version}: ${last.bits}`);
  assert.ok(first.bits > last.bits, 'the dashboard follows the swarm down');
  for (const s of [first, last]) {
    assert.equal(s.hidden, false, 'the sample card shows');
    assert.equal(s.sampleVersion, s.version, 'the sample comes from the version shown');
    assert.equal(s.prompt.length, 48, 'the prompt is the start of the held-out text');
    assert.ok(s.text.length >= 100, `the model wrote its sample: ${JSON.stringify(s.text)}`);
  }
  assert.notEqual(last.text, first.text, 'the sample follows the model');
  assert.deepEqual(errors, []);
});
