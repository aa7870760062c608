// `cargo xtask bench swarm`: how much of its volunteers' compute the real swarm uses.
// Run inside a network namespace with only loopback (xtask does that). Native peers
// (`shoal-peer`, WebRTC on the `webrtc` crate, CPU backend) and contributor pages in
// headless Chromium (the visitor's page after one consent click: the wasm peer in its
// worker, CPU backend, WebRTC in the browser) on a task file:
//   1. solo: each peer alone with its own signaling server, all training at once for a
//      fixed time (same batch, same contention for the machine's cores);
//   2. swarm: the same peers on one server, training together for the same time.
// Prints one JSON line: per phase each peer's samples/s (after a warm-up), the time to
// the task's target accuracy, bytes sent per hour; and the ratios
// `swarm-utilization` (swarm samples/s over solo samples/s, all peers),
// `swarm-utilization-browser` (the contributor pages' alone) and `time-to-target` (solo
// time over the swarm's: above 1, the swarm is faster).
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { launchWebrtcBrowser } from './chromium.mjs';

const root = process.env.SHOAL_ROOT ?? new URL('../..', import.meta.url).pathname;
const serverBin = join(root, 'target/release/shoal-signaling-server');
const peerBin = join(root, 'target/release/shoal-peer');
const taskFile = process.env.SHOAL_BENCH_TASK ?? join(root, 'tasks/digits.toml');
const PEERS = Number(process.env.SHOAL_BENCH_PEERS ?? 3);
const BROWSERS = Number(process.env.SHOAL_BENCH_BROWSERS ?? 2);
const SECONDS = Number(process.env.SHOAL_BENCH_SECONDS ?? 150);
const WARMUP_S = 10;

const taskText = readFileSync(taskFile, 'utf8');
const taskName = taskText.match(/^name\s*=\s*"([^"]+)"/m)?.[1] ?? 'digits';
const target = Number(taskText.match(/^target_accuracy\s*=\s*([0-9.]+)/m)?.[1] ?? 0.95);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function startServer(dir, i) {
  const child = spawn(serverBin, ['--bind', '127.0.0.1', '--port', '0', '--www', join(root, 'www'),
    '--data', join(root, 'data'), '--task-file', taskFile, '--state-file', join(dir, `state${i}.json`),
    '--ledger-dir', join(dir, `ledger${i}`)],
  { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start: ${out}`)), 30_000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/[0-9.:]+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
  });
  return { child, url };
}

/** Parses `round R loss L acc A% peers N up U down D used K rejected J samples S`. */
function roundLine(line) {
  const m = line.match(/^round (\d+) .* acc ([0-9.]+|-)%? peers (\d+) up (\d+) down (\d+) .* samples (\d+)/);
  if (!m) return null;
  return {
    round: Number(m[1]), accuracy: m[2] === '-' ? null : Number(m[2]) / 100, peers: Number(m[3]),
    up: Number(m[4]), down: Number(m[5]), samples: Number(m[6]),
  };
}

function startPeer(server, dir, name) {
  const child = spawn(peerBin, ['--server', server.url.replace('http://', 'ws://'), '--task', taskName,
    '--task-file', taskFile, '--bind', '127.0.0.1', '--cpu', '--data', join(root, 'data'),
    '--identity', join(dir, `${name}.key`)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const p = { child, started: performance.now(), lines: [], out: '' };
  child.stdout.on('data', (d) => {
    p.out += d;
    const lines = p.out.split('\n');
    p.out = lines.pop();
    for (const l of lines) {
      const r = roundLine(l);
      if (r) p.lines.push({ t: (performance.now() - p.started) / 1e3, ...r });
    }
  });
  return p;
}

/** A contributor page on `server`, loaded up to the visitor's consent. */
async function loadPage(browser, server) {
  const context = await browser.newContext();
  // Chromium gathers loopback candidates only with a media permission (a harness need).
  await context.grantPermissions(['microphone', 'camera']);
  const page = await context.newPage();
  page.on('pageerror', (e) => process.stderr.write(`[page error] ${e.message}\n`));
  const p = { context, page, started: 0, lines: [], origin: 0, seen: 0, browser: true };
  await page.goto(`${server.url}/?backend=cpu`);
  // The page's clock against this script's: progress entries carry the page's time.
  p.origin = await page.evaluate(() => performance.timeOrigin);
  await page.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  return p;
}

/** The visitor consents (at `t0`, when the native peers start too); the page's closed
 *  rounds are read from it (`window.shoalProgress`) twice a second. */
async function startPage(p, t0) {
  p.started = t0;
  // Onto the button and across it: the page refuses a press where the pointer never moved.
  await p.page.hover('#consent');
  await p.page.click('#consent', { position: { x: 12, y: 10 } });
  p.poll = setInterval(async () => {
    try {
      const fresh = await p.page.evaluate((n) => window.shoalProgress.slice(n), p.seen);
      p.seen += fresh.length;
      for (const e of fresh) {
        p.lines.push({ t: (p.origin + e.at - performance.timeOrigin - p.started) / 1e3, round: e.round,
          accuracy: e.accuracy ?? null, peers: e.peers, up: e.bytes_up, down: e.bytes_down, samples: e.samples });
      }
    } catch {
      // The page is closing.
    }
  }, 500);
}

async function stopPage(p) {
  clearInterval(p.poll);
  await p.context.close();
}

async function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGINT');
  await Promise.race([once(child, 'exit'), sleep(5_000).then(() => child.kill('SIGKILL'))]);
}

/** Bytes per hour between the first and the last of `lines` (`key`: up or down). */
function perHour(lines, key) {
  const [a, b] = [lines[0], lines.at(-1)];
  return a && b && b.t > a.t ? ((b[key] - a[key]) / (b.t - a.t)) * 3600 : 0;
}

/** One peer's numbers over the phase. */
function measure(p) {
  const late = p.lines.filter((l) => l.t >= SECONDS / 2);
  // Samples trained by time t: the count of its last line (a closed round) at or before t.
  // Over one window for every peer and both phases: between its own first and last lines
  // after the warm-up, a peer that stalled, or joined late, kept the rate of the rounds it
  // did close.
  const trainedBy = (t) => p.lines.reduce((s, l) => (l.t <= t ? l.samples : s), 0);
  const rate = (trainedBy(SECONDS) - trainedBy(WARMUP_S)) / (SECONDS - WARMUP_S);
  const hit = p.lines.find((l) => l.accuracy !== null && l.accuracy >= target);
  const last = p.lines.at(-1);
  return {
    samples_per_s: rate,
    rounds: last?.round ?? 0,
    accuracy: last?.accuracy ?? null,
    time_to_target_s: hit ? hit.t : null,
    // Over the phase's second half: what a peer sends while it trains, once joining,
    // its first keyframe, the models it hands joiners and the upload budget's burst
    // allowance are behind it.
    bytes_up_per_hour: perHour(late, 'up'),
    bytes_down_per_hour: perHour(late, 'down'),
    // The whole phase, from start.
    bytes_up_per_hour_from_start: last && last.t > 0 ? (last.up / last.t) * 3600 : 0,
    neighbours: Math.max(0, ...p.lines.map((l) => l.peers)),
    kind: p.browser ? 'browser' : 'native',
    accuracy_by_time: p.lines.filter((l) => l.accuracy !== null)
      .map((l) => [Math.round(l.t * 10) / 10, l.accuracy]),
  };
}

async function phase(kind, dir, browser) {
  const servers = [];
  const n = PEERS + BROWSERS;
  for (let i = 0; i < (kind === 'solo' ? n : 1); i++) servers.push(await startServer(dir, `${kind}${i}`));
  const serverOf = (i) => servers[kind === 'solo' ? i : 0];
  // Every page loaded up to its consent first; then all start at once, natives and
  // pages, on one clock.
  const pages = [];
  for (let i = 0; i < BROWSERS; i++) pages.push(await loadPage(browser, serverOf(PEERS + i)));
  const t0 = performance.now();
  await Promise.all(pages.map((p) => startPage(p, t0)));
  const peers = [];
  for (let i = 0; i < PEERS; i++) peers.push(startPeer(serverOf(i), dir, `${kind}${i}`));
  await sleep(SECONDS * 1e3);
  for (const p of peers) await stop(p.child);
  for (const p of pages) await stopPage(p);
  for (const s of servers) await stop(s.child);
  return [...peers, ...pages].map(measure);
}

const median = (xs) => {
  const s = xs.filter((x) => x !== null).sort((a, b) => a - b);
  return s.length ? s[(s.length - 1) >> 1] : null;
};
/** The median peer's time, a peer that never got there counted as never (null when the
 *  median peer did not): dropped, the peers that did were the median. */
const medianTime = (xs) => {
  const s = xs.map((x) => x ?? Infinity).sort((a, b) => a - b);
  const m = s.length ? s[(s.length - 1) >> 1] : Infinity;
  return Number.isFinite(m) ? m : null;
};

const dir = mkdtempSync(join(tmpdir(), 'shoal-bench-swarm-'));
const browser = BROWSERS > 0 ? await launchWebrtcBrowser() : null;
try {
  const solo = await phase('solo', dir, browser);
  const swarm = await phase('swarm', dir, browser);
  const sum = (ps) => ps.reduce((s, p) => s + p.samples_per_s, 0);
  const pagesOf = (ps) => ps.filter((p) => p.kind === 'browser');
  const soloT = medianTime(solo.map((p) => p.time_to_target_s));
  const swarmT = medianTime(swarm.map((p) => p.time_to_target_s));
  console.log(JSON.stringify({
    task: taskName, peers: PEERS, browsers: BROWSERS, seconds: SECONDS, warmup_s: WARMUP_S, target,
    solo, swarm,
    solo_samples_per_s: sum(solo), swarm_samples_per_s: sum(swarm),
    solo_time_to_target_s: soloT, swarm_time_to_target_s: swarmT,
    swarm_bytes_up_per_hour: median(swarm.map((p) => p.bytes_up_per_hour)),
    browser_solo_samples_per_s: sum(pagesOf(solo)), browser_swarm_samples_per_s: sum(pagesOf(swarm)),
    browser_bytes_up_per_hour: median(pagesOf(swarm).map((p) => p.bytes_up_per_hour)),
    ratios: {
      'swarm-utilization': sum(solo) > 0 ? sum(swarm) / sum(solo) : 0,
      'swarm-utilization-browser': sum(pagesOf(solo)) > 0 ? sum(pagesOf(swarm)) / sum(pagesOf(solo)) : null,
      'time-to-target': soloT !== null && swarmT !== null ? soloT / swarmT : null,
    },
  }));
} finally {
  await browser?.close();
  rmSync(dir, { recursive: true, force: true });
}
